"""One result record for every benchmark medc runs: encoder latency, generation, server load, plan checks.

    Result
      run: RunInfo      where and with what it ran (commit, versions, CPU and its flags, GPU, the host probe, bundles)
      rows: [Row]       kind + bundle + backend + params (what was varied) + metrics (what was measured) + floor

Each `Metric` carries its raw samples and the statistics AIPerf writes (`avg min max std p50 p90 p99 count`), so a
comparison can judge a change against the runs' own spread (benchmarks/compare.py) rather than a fixed percentage.
Results converted from older files may hold statistics without samples (`samples: []`), or only some statistics.

The JSON Schema of the file is `result.schema.json` beside this module; `validate` checks a document against it.
Writers: `to_json` (the document), `to_jsonl` (one line per row, the run header repeated as `run`), `to_csv` (one line
per row and metric) and `to_markdown` (the environment, then one table per kind).
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from medc.errors import MedcError

SCHEMA_ID = "medc-bench/1"
SCHEMA_FILE = Path(__file__).with_name("result.schema.json")
FORMATS = ("md", "json", "jsonl", "csv")

# Units where a smaller number is better; everything else (…/s, fractions, counts of successes) is larger-is-better.
LOWER_IS_BETTER = frozenset({"us", "µs", "ms", "s", "MiB", "GiB", "bytes"})
# Counts are larger-is-better (requests served) except these, whose growth is a regression.
LOWER_IS_BETTER_COUNTS = frozenset({"errors", "rejected", "failed", "timeouts", "dropped"})


def _r(x: float | None, nd: int = 4) -> float | None:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return None
    return float(round(x, nd)) if abs(x) >= 1e-3 else float(f"{x:.4g}")


@dataclass
class Metric:
    """One measured quantity of a row: raw samples and their statistics (AIPerf's field names)."""

    name: str
    unit: str
    samples: list[float] = field(default_factory=list)
    avg: float | None = None
    min: float | None = None
    max: float | None = None
    std: float | None = None
    p50: float | None = None
    p90: float | None = None
    p99: float | None = None
    count: int = 0

    @classmethod
    def of(cls, name: str, unit: str, samples) -> Metric:
        """Statistics of `samples` (a non-empty sequence of numbers)."""
        a = np.asarray([float(s) for s in samples], dtype=np.float64)
        if a.size == 0:
            raise MedcError(f"metric {name!r} has no samples.")
        p50, p90, p99 = np.percentile(a, [50, 90, 99])
        return cls(name, unit, [_r(float(v), 6) for v in a], _r(a.mean()), _r(a.min()), _r(a.max()), _r(a.std()),
                   _r(p50), _r(p90), _r(p99), int(a.size))

    @classmethod
    def summary(cls, name: str, unit: str, count: int = 1, **stats) -> Metric:
        """A metric known only by its statistics (results converted from files that kept no raw samples)."""
        return cls(name, unit, [], count=count, **{k: _r(v) for k, v in stats.items() if v is not None})

    @property
    def value(self) -> float | None:
        """The number a table shows: the median where known, else the mean, else whatever statistic there is."""
        for v in (self.p50, self.avg, self.max, self.min):
            if v is not None:
                return v
        return None

    @property
    def lower_is_better(self) -> bool:
        return self.unit in LOWER_IS_BETTER or self.name in LOWER_IS_BETTER_COUNTS

    @classmethod
    def from_dict(cls, d: dict) -> Metric:
        return cls(**{k: d.get(k) for k in ("name", "unit", "samples", "avg", "min", "max", "std", "p50", "p90",
                                            "p99")}, count=d.get("count", 0))


@dataclass
class Floor:
    """The roofline floor of a row's workload on the hardware it ran on, and how close the measurement came."""

    metric: str  # the metric the floor bounds, e.g. "latency_ms" or "tpot_ms"
    ms: float  # the floor, in the metric's unit (ms)
    bound: str  # "compute" | "memory"
    work: float  # FLOPs (compute) or bytes (memory) of one unit of the metric
    peak: float  # the peak it is divided by: FLOP/s or bytes/s
    peak_source: str  # e.g. "probe fp32 GEMM (max of 6)" or "datasheet h100 fp16"
    fraction: float | None  # floor / measured p50: 1.0 is the hardware limit

    @classmethod
    def from_dict(cls, d: dict) -> Floor:
        return cls(**d)


@dataclass
class Row:
    kind: str  # "encoder" | "generation" | "load" | "plan" | "check" | ...: what the params and metrics mean
    bundle: str  # the bundle's name (its folder), or what the baseline ran (a GGUF, an HF model)
    backend: str  # "onnxruntime" | "torch-eager" | "llama.cpp" | "ort-genai" | "openvino" | "server" | ...
    params: dict = field(default_factory=dict)  # what was varied: component, batch, threads, prompt_tokens, ...
    metrics: list[Metric] = field(default_factory=list)
    floor: Floor | None = None
    notes: list[str] = field(default_factory=list)

    def metric(self, name: str) -> Metric | None:
        return next((m for m in self.metrics if m.name == name), None)

    def key(self) -> tuple:
        """What `compare` matches rows of two runs on."""
        return self.kind, self.bundle, self.backend, json.dumps(self.params, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> Row:
        return cls(d["kind"], d["bundle"], d["backend"], dict(d.get("params") or {}),
                   [Metric.from_dict(m) for m in d.get("metrics", [])],
                   Floor.from_dict(d["floor"]) if d.get("floor") else None, list(d.get("notes") or []))


@dataclass
class BundleInfo:
    """A bundle (or baseline model) a run measured, and what its fidelity record says."""

    name: str
    model: str
    precision: str  # e.g. "int8", or "image_encoder=int8,text_encoder=fp32"
    weights: str  # "real" | "random": random-weight fidelity says nothing clinical
    target: str | None = None
    sha256: str | None = None  # of the bundle's manifest
    fidelity: dict = field(default_factory=dict)  # worst cosine, perplexity increase, greedy agreement, passed

    @classmethod
    def from_dict(cls, d: dict) -> BundleInfo:
        return cls(**d)


@dataclass
class RunInfo:
    date: str
    commit: str | None
    medc: str
    toolchain: dict  # package -> version (onnxruntime, numpy, torch, llama_cpp_python, ...)
    host: dict  # cpu model, flags (the ones that matter to kernels), cores, threads, memory GiB, os
    providers: list[str] = field(default_factory=list)
    gpu: dict | None = None  # name, driver, memory_mib, where one was present
    probe: list[Metric] = field(default_factory=list)  # host probe: fp32 GEMM GFLOP/s, int8 GOP/s, memory GB/s
    bundles: list[BundleInfo] = field(default_factory=list)
    command: str | None = None
    notes: list[str] = field(default_factory=list)

    def probe_metric(self, name: str) -> Metric | None:
        return next((m for m in self.probe if m.name == name), None)

    @classmethod
    def from_dict(cls, d: dict) -> RunInfo:
        d = dict(d)
        d["probe"] = [Metric.from_dict(m) for m in d.get("probe", [])]
        d["bundles"] = [BundleInfo.from_dict(b) for b in d.get("bundles", [])]
        return cls(**d)


@dataclass
class Result:
    run: RunInfo
    rows: list[Row] = field(default_factory=list)
    title: str | None = None  # what the run was for, e.g. "MedSigLIP-448 on this CPU: fp32 vs int8 vs PyTorch"

    def to_dict(self) -> dict:
        return {"schema": SCHEMA_ID, "title": self.title, "run": asdict(self.run), "rows": [asdict(r) for r in self.rows]}

    @classmethod
    def from_dict(cls, d: dict) -> Result:
        if d.get("schema") != SCHEMA_ID:
            raise MedcError(f"not a medc benchmark result (schema {d.get('schema')!r}, expected {SCHEMA_ID!r}).")
        return cls(RunInfo.from_dict(d["run"]), [Row.from_dict(r) for r in d["rows"]], d.get("title"))

    def bundle(self, name: str) -> BundleInfo | None:
        return next((b for b in self.run.bundles if b.name == name), None)


# -- reading and checking -----------------------------------------------------------------------------------------------
def load(path: Path | str) -> Result:
    """A result file, checked against the schema; a clear error for anything else."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise MedcError(f"{path}: no such result file.") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MedcError(f"{path} is not JSON ({e}); pass a file written by `medc bench --format json` or --json.") \
            from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA_ID:
        raise MedcError(f"{path} is not a medc benchmark result (no \"schema\": \"{SCHEMA_ID}\"); results of older "
                        "medc versions were converted in benchmarks/results/, rerun `medc bench` for new ones.")
    problems = validate(doc)
    if problems:
        raise MedcError(f"{path} does not match the result schema: {problems[0]}")
    return Result.from_dict(doc)


def validate(doc: dict) -> list[str]:
    """Schema violations of `doc` (empty: valid). Needs jsonschema (the test extra); without it, only the basics."""
    try:
        import jsonschema
    except ImportError:
        need = ("schema", "run", "rows")
        return [f"missing {k!r}" for k in need if k not in doc]
    schema = json.loads(SCHEMA_FILE.read_text())
    v = jsonschema.Draft202012Validator(schema)
    return [f"{'/'.join(str(p) for p in e.absolute_path) or '(top)'}: {e.message}" for e in v.iter_errors(doc)]


# -- writers ------------------------------------------------------------------------------------------------------------
def to_json(result: Result) -> str:
    return json.dumps(result.to_dict(), indent=1)


def to_jsonl(result: Result) -> str:
    run = asdict(result.run)
    return "".join(json.dumps({"schema": SCHEMA_ID, "run": run, **asdict(r)}) + "\n" for r in result.rows)


CSV_COLUMNS = ("kind", "bundle", "backend", "params", "metric", "unit", "count", "avg", "std", "min", "p50", "p90",
               "p99", "max", "floor_ms", "fraction_of_floor")


def to_csv(result: Result) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for r in result.rows:
        params = ";".join(f"{k}={v}" for k, v in r.params.items())
        for m in r.metrics:
            on_floor = r.floor is not None and r.floor.metric == m.name
            w.writerow([r.kind, r.bundle, r.backend, params, m.name, m.unit, m.count, m.avg, m.std, m.min, m.p50,
                        m.p90, m.p99, m.max, r.floor.ms if on_floor else "",
                        r.floor.fraction if on_floor and r.floor.fraction is not None else ""])
    return buf.getvalue()


def cell(v, thousands: str = "") -> str:
    """A table cell: 3 significant digits below 10, one decimal above (`thousands`="," groups the digits)."""
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 10 else f"{v:{thousands}.1f}"
    return str(v)


def environment_lines(run: RunInfo) -> list[str]:
    h = run.host
    lines = [f"- date {run.date}, commit {run.commit or '-'}, medc {run.medc}",
             f"- CPU: {h.get('cpu', '?')}, {h.get('cores', '?')} cores, {h.get('threads', '?')} threads used"
             + (f", flags {' '.join(h['flags'])}" if h.get("flags") else ""),
             "- " + (", ".join(f"{k} {v}" for k, v in sorted(run.toolchain.items())) or "toolchain not recorded")]
    if run.providers:
        lines.append(f"- providers: {', '.join(run.providers)}")
    if run.gpu:
        lines.append(f"- GPU: {', '.join(f'{k} {v}' for k, v in run.gpu.items())}")
    if run.probe:
        lines.append("- host probe (max of the probes interleaved with the runs): "
                     + ", ".join(f"{m.name} {cell(m.max)} {m.unit}" for m in run.probe))
    for b in run.bundles:
        fid = ", ".join(f"{k} {cell(v)}" for k, v in b.fidelity.items())
        lines.append(f"- bundle {b.name}: {b.model}, {b.precision}, {b.weights} weights"
                     + (f", target {b.target}" if b.target else "") + (f"; fidelity: {fid}" if fid else ""))
    if run.command:
        lines.append(f"- command: `{run.command}`")
    lines += [f"- note: {n}" for n in run.notes]
    return lines


def table(rows: list[Row]) -> list[str]:
    """One Markdown table: params as columns, then each metric's median (p50) and p99, then the floor."""
    pcols = list(dict.fromkeys(k for r in rows for k in r.params))
    mcols = list(dict.fromkeys((m.name, m.unit) for r in rows for m in r.metrics))
    with_p99 = {m.name for r in rows for m in r.metrics if m.count > 1 and m.p99 is not None and m.lower_is_better}
    has_floor = any(r.floor for r in rows)
    head = ["bundle", "backend", *pcols]
    for name, unit in mcols:
        head.append(f"{name} ({unit})")
        if name in with_p99:
            head.append(f"{name} p99")
    if has_floor:
        head += ["floor ms", "of floor"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.bundle, r.backend, *(cell(r.params.get(k)) for k in pcols)]
        for name, _ in mcols:
            m = r.metric(name)
            cells.append(cell(m.value if m else None))
            if name in with_p99:
                cells.append(cell(m.p99 if m else None))
        if has_floor:
            cells += [cell(r.floor.ms if r.floor else None),
                      f"{r.floor.fraction:.0%}" if r.floor and r.floor.fraction is not None else "-"]
        out.append("| " + " | ".join(cells) + " |")
    return out


def to_markdown(result: Result) -> str:
    lines = [f"# {result.title}" if result.title else "# medc benchmark", "", *environment_lines(result.run)]
    for kind in dict.fromkeys(r.kind for r in result.rows):
        rows = [r for r in result.rows if r.kind == kind]
        lines += ["", f"## {kind}", "", "Medians (p50) over the samples; p99 of the latencies where there is more than one.", ""]
        lines += table(rows)
        notes = list(dict.fromkeys(n for r in rows for n in r.notes))
        lines += [""] + [f"- {n}" for n in notes] if notes else []
    return "\n".join(lines) + "\n"


WRITERS = {"md": to_markdown, "json": to_json, "jsonl": to_jsonl, "csv": to_csv}


def write(result: Result, fmt: str) -> str:
    if fmt not in WRITERS:
        raise MedcError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}.")
    return WRITERS[fmt](result)


def save(result: Result, stem: Path | str) -> tuple[Path, Path]:
    """Write `stem`.json and `stem`.md (the committed form of a benchmark's results; a `stem` given with either
    suffix means the same pair), creating its folder; returns both paths."""
    stem = Path(stem)
    stem = stem.with_suffix("") if stem.suffix in (".json", ".md") else stem
    stem.parent.mkdir(parents=True, exist_ok=True)
    doc = result.to_dict()
    problems = validate(json.loads(json.dumps(doc)))
    if problems:
        raise MedcError(f"result for {stem.name} does not match the schema: {problems[0]}")
    j, m = Path(f"{stem}.json"), Path(f"{stem}.md")
    j.write_text(to_json(result) + "\n")
    m.write_text(to_markdown(result))
    return j, m
