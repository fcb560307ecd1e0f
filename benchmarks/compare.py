"""Compare two benchmark runs (`medc compare A.json B.json`): which metrics moved beyond the runs' own spread.

Rows of the two results are matched on `Row.key()` (kind, bundle, backend, params). For every metric both rows carry,
the line shows the medians and their ratio B/A, and a verdict judged from the raw samples rather than a fixed
percentage, because a 5 % change is noise on one machine and a real regression on another:

    changed  =  one-sided Mann-Whitney U p < 0.01                (the shift is statistically clear)
            and |median_B - median_A| > (IQR_A + IQR_B) / 4      (and larger than the runs' own spread)

The spread is the pooled half inter-quartile range: the mean of the two runs' half-IQRs, i.e. how far a typical
sample of either run sits from its own median. The test alone would flag a 1 % drift once there are enough samples;
the spread alone would flag one unlucky outlier-heavy run. Both together flag what a person would call a change.
A change in the direction `Metric.lower_is_better` calls worse is "regressed", the other way "improved".

The same rule holds for every metric: timing (ms, s, …/s) is what regresses in practice; memory (MiB) and counts are
shown with their ratio, and flagged only when their own samples show it (a single peak-RSS reading never does).
With fewer than MIN_SAMPLES samples on either side (results converted from files that kept only statistics) the
verdict is "unknown", never a regression: a statistic without its spread cannot tell a change from noise.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from medc.benchmarks.schema import Metric, Result, Row
from medc.errors import MedcError

ALPHA = 0.01  # one-sided significance of the Mann-Whitney test
MIN_SAMPLES = 5  # below this the normal approximation cannot reach p < 0.01 (5 vs 5 at best gives p ~ 0.006)

REGRESSED, IMPROVED, SAME, UNKNOWN = "regressed", "improved", "same", "unknown"


# -- the test -------------------------------------------------------------------------------------------------------
def _ranks(a: np.ndarray) -> np.ndarray:
    """1-based ranks of `a`, ties given the average of the ranks they span."""
    order = np.argsort(a, kind="mergesort")
    _, first, counts = np.unique(a[order], return_index=True, return_counts=True)
    ranks = np.empty(a.size)
    ranks[order] = np.repeat(first + (counts + 1) / 2, counts)
    return ranks


def mann_whitney_greater(x, y) -> tuple[float, float]:
    """(U, p): U counts the pairs (x_i, y_j) with y_j > x_i (ties one half); p is the one-sided p-value that y tends
    to be larger than x, by the normal approximation with tie correction and continuity correction.

    Written out here because scipy is not a dependency of medc; it matches
    scipy.stats.mannwhitneyu(y, x, alternative="greater", method="asymptotic")."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    nx, ny = x.size, y.size
    both = np.concatenate([x, y])
    u = float(_ranks(both)[nx:].sum() - ny * (ny + 1) / 2)
    n = nx + ny
    ties = np.unique(both, return_counts=True)[1].astype(np.float64)
    var = nx * ny / 12 * ((n + 1) - float((ties**3 - ties).sum()) / (n * (n - 1)))
    if var <= 0:  # every sample equal: nothing to tell apart
        return u, 1.0
    z = (u - nx * ny / 2 - 0.5) / math.sqrt(var)
    return u, 0.5 * math.erfc(z / math.sqrt(2))


def _iqr(samples: np.ndarray) -> float:
    q1, q3 = np.percentile(samples, [25, 75])
    return float(q3 - q1)


# -- the records ----------------------------------------------------------------------------------------------------
def _params(params: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in params.items()) or "-"


def _row_ref(r: Row) -> dict:
    return {"kind": r.kind, "bundle": r.bundle, "backend": r.backend, "params": dict(r.params)}


@dataclass
class MetricChange:
    """One metric of one matched row: A's and B's medians, their ratio and the verdict."""

    kind: str
    bundle: str
    backend: str
    params: dict
    metric: str
    unit: str
    a: float | None  # median of A (p50, or the metric's `.value` without samples)
    b: float | None
    ratio: float | None  # b / a
    lower_is_better: bool
    n_a: int  # raw samples each side (0: only statistics were kept)
    n_b: int
    p: float | None  # one-sided Mann-Whitney p-value in the direction the median moved
    spread: float | None  # pooled half IQR the change must exceed, in the metric's unit
    verdict: str  # regressed | improved | same | unknown
    why: str  # what decided it, e.g. "no samples" or "p 3e-08, |Δ| 9.1 > spread 1.2"

    @property
    def label(self) -> str:
        return f"{self.bundle}/{self.backend} {_params(self.params)} {self.metric}"

    @property
    def shown_verdict(self) -> str:
        return f"{self.verdict} ({self.why})" if self.verdict == UNKNOWN else self.verdict


@dataclass
class Comparison:
    a: str  # what A and B are (file names)
    b: str
    lines: list[MetricChange] = field(default_factory=list)
    missing_in_b: list[dict] = field(default_factory=list)  # rows only in A: kind, bundle, backend, params
    new_in_b: list[dict] = field(default_factory=list)  # rows only in B
    notes: list[str] = field(default_factory=list)  # different hosts, duplicate rows, metrics on one side only

    def of(self, verdict: str) -> list[MetricChange]:
        return [m for m in self.lines if m.verdict == verdict]

    @property
    def regressed(self) -> list[MetricChange]:
        return self.of(REGRESSED)

    def summary(self) -> str:
        bad, n = self.regressed, len(self.lines)
        s = f"{len(bad)} of {n} metrics regressed beyond the runs' spread"
        if bad:
            s += ": " + ", ".join(f"{m.label} x{m.ratio:.2f}" if m.ratio is not None else m.label for m in bad)
        rest = [f"{len(self.of(v))} {v}" for v in (IMPROVED, UNKNOWN) if self.of(v)]
        return s + (f" ({', '.join(rest)})" if rest else "") + "."

    def to_dict(self) -> dict:
        return {"a": self.a, "b": self.b, "alpha": ALPHA, "min_samples": MIN_SAMPLES,
                "regressed": len(self.regressed), "summary": self.summary(),
                "lines": [asdict(m) for m in self.lines], "missing_in_b": self.missing_in_b,
                "new_in_b": self.new_in_b, "notes": self.notes}

    def to_markdown(self) -> str:
        out = [f"# medc compare: {self.a} -> {self.b}", "",
               (f"Medians of A and B and their ratio B/A; a change counts when a one-sided Mann-Whitney test "
                f"gives p < {ALPHA} and it exceeds the runs' spread (pooled half IQR); fewer than {MIN_SAMPLES} "
                "samples on a side: unknown."), "",
               "| kind | bundle | backend | params | metric | A | B | B/A | p | verdict |", "|" + "---|" * 10]
        for m in self.lines:
            out.append(f"| {m.kind} | {m.bundle} | {m.backend} | {_params(m.params)} | {m.metric} ({m.unit}) | "
                       f"{_num(m.a)} | {_num(m.b)} | {_num(m.ratio, ratio=True)} | "
                       f"{'-' if m.p is None else f'{m.p:.2g}'} | {m.shown_verdict} |")
        for title, refs in (("Only in A (missing in B)", self.missing_in_b), ("Only in B (new in B)", self.new_in_b)):
            if refs:
                out += ["", f"{title}:", ""]
                out += [f"- {r['kind']} {r['bundle']} {r['backend']} {_params(r['params'])}" for r in refs]
        if self.notes:
            out += [""] + [f"- note: {n}" for n in self.notes]
        return "\n".join([*out, "", self.summary()]) + "\n"


def _num(v: float | None, ratio: bool = False) -> str:
    if v is None:
        return "-"
    if ratio:
        return f"{v:.2f}"
    return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"


# -- the comparison -------------------------------------------------------------------------------------------------
def judge(ma: Metric, mb: Metric) -> tuple[str, str, float | None, float | None]:
    """(verdict, why, p, spread) of one metric's change from A to B, by the rule in the module docstring."""
    na, nb = len(ma.samples), len(mb.samples)
    if na < MIN_SAMPLES or nb < MIN_SAMPLES:
        return UNKNOWN, "no samples" if 0 in (na, nb) else f"{na} vs {nb} samples, need {MIN_SAMPLES}", None, None
    sa, sb = np.asarray(ma.samples, dtype=np.float64), np.asarray(mb.samples, dtype=np.float64)
    delta = float(np.median(sb) - np.median(sa))
    spread = (_iqr(sa) + _iqr(sb)) / 4
    if delta == 0:
        return SAME, "equal medians", 1.0, spread
    _, p = mann_whitney_greater(sa, sb) if delta > 0 else mann_whitney_greater(sb, sa)
    why = f"p {p:.2g}, |Δ| {abs(delta):.4g} {'>' if abs(delta) > spread else '<='} spread {spread:.4g}"
    if p >= ALPHA or abs(delta) <= spread:
        return SAME, why, p, spread
    worse = (delta > 0) == ma.lower_is_better
    return (REGRESSED if worse else IMPROVED), why, p, spread


def _first_by_key(rows: list[Row], side: str, notes: list[str]) -> dict[tuple, Row]:
    out: dict[tuple, Row] = {}
    for r in rows:
        if r.key() in out:
            notes.append(f"{side} has the row {r.kind} {r.bundle} {r.backend} {_params(r.params)} twice; "
                         "the first one is compared.")
            continue
        out[r.key()] = r
    return out


def compare(a: Result, b: Result, metrics: list[str] | None = None, labels: tuple[str, str] = ("A", "B")) -> Comparison:
    """Match A's and B's rows and judge each metric both carry (only `metrics`, when given, by name)."""
    if metrics:
        known = {m.name for r in (*a.rows, *b.rows) for m in r.metrics}
        unknown = [m for m in metrics if m not in known]
        if unknown:
            raise MedcError(f"no metric named {', '.join(unknown)} in either result; they have "
                            f"{', '.join(sorted(known)) or 'no metrics'}.")
    cmp = Comparison(*labels)
    ha, hb = a.run.host, b.run.host
    for what in ("cpu", "threads"):
        if ha.get(what) != hb.get(what):
            cmp.notes.append(f"A ran with {what} {ha.get(what)!r}, B with {hb.get(what)!r}: the comparison "
                             "measures that difference too.")
    rows_a, rows_b = _first_by_key(a.rows, "A", cmp.notes), _first_by_key(b.rows, "B", cmp.notes)
    cmp.missing_in_b = [_row_ref(r) for k, r in rows_a.items() if k not in rows_b]
    cmp.new_in_b = [_row_ref(r) for k, r in rows_b.items() if k not in rows_a]
    for key, ra in rows_a.items():
        rb = rows_b.get(key)
        if rb is None:
            continue
        for ma in ra.metrics:
            if metrics and ma.name not in metrics:
                continue
            mb = rb.metric(ma.name)
            if mb is None:
                cmp.notes.append(f"{ra.kind} {ra.bundle} {_params(ra.params)}: {ma.name} only in A.")
                continue
            if mb.unit != ma.unit:
                cmp.notes.append(f"{ra.kind} {ra.bundle} {_params(ra.params)}: {ma.name} is in {ma.unit} in A but "
                                 f"{mb.unit} in B; not compared.")
                continue
            va, vb = ma.value, mb.value
            ratio = vb / va if va not in (None, 0) and vb is not None else None
            verdict, why, p, spread = judge(ma, mb)
            cmp.lines.append(MetricChange(ra.kind, ra.bundle, ra.backend, dict(ra.params), ma.name, ma.unit, va, vb,
                                          ratio, ma.lower_is_better, len(ma.samples), len(mb.samples), p, spread,
                                          verdict, why))
    if not cmp.lines and a.rows and b.rows:
        raise MedcError(f"{labels[0]} and {labels[1]} have no row (kind, bundle, backend, params) and metric in "
                        "common, so there is nothing to compare; were they run with the same bundle and settings?")
    return cmp
