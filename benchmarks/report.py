"""`medc report`: one self-contained HTML page from benchmark results (benchmarks/schema.py).

The page holds the environment of each result file; then one section per model (the bundle's model, else the row's
params.model, else "other"): a legend of its bundles (precision, real or random weights, fidelity), a compact table
per kind of row (the params that vary, the key metrics as p50 with p99 small beside) and the model's own figures
(benchmarks/report_plots.py); and at the end the figures across models: speed vs fidelity, the picture a user picks a
bundle from, and planned vs measured memory. No external CSS or JS: the file opens offline and can be attached to a
ticket.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from html import escape

from medc.benchmarks import report_plots as plots
from medc.benchmarks.report_plots import FIGURE_TAG, RANDOM_LABEL  # noqa: F401  (FIGURE_TAG: the CLI counts with it)
from medc.benchmarks.schema import BundleInfo, Result, Row, cell
from medc.errors import MedcError

# the metrics a table shows for each kind of row; other kinds show their first four
KEY_METRICS = {"encoder": ("latency_ms", "items_per_s"),
               "generation": ("ttft_ms", "tpot_ms", "decode_tok_s", "prefill_tok_s"),
               "plan": ("planned_mib", "measured_mib"), "load": ("latency_ms", "throughput_rps")}
FLOOR_KINDS = frozenset({"encoder", "generation"})  # their tables always have an "of floor" column
CSS = """body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1200px;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.4em 0 1.2em}th,td{border:1px solid #ccc;padding:3px 8px;text-align:left}
th{background:#f3f3f3}td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.n small{color:#777}figure{margin:1.2em 0}figure img{max-width:100%;border:1px solid #eee}
figcaption{color:#555;font-size:13px}.wide{overflow-x:auto}.const{color:#555;font-size:13px;margin:.2em 0}
.rnd{background:#fff3cd;color:#7a5300;border:1px solid #e6c46a;border-radius:3px;padding:0 4px;font-size:12px;white-space:nowrap}
table.legend td{font-size:13px}section{border-top:2px solid #ddd;margin-top:2em}h4{margin:.8em 0 .2em}"""


@dataclass
class Section:
    """One model's rows: (file tag, row, its result); the tag ("#2 ") only where the section mixes files."""

    model: str
    slug: str
    items: list[tuple[str, Row, Result]] = field(default_factory=list)

    def bundles(self) -> dict[str, BundleInfo | None]:
        return {tag + r.bundle: res.bundle(r.bundle) for tag, r, res in self.items}


def _slug(text: str, taken: set[str]) -> str:
    """A figure-id-safe name for a model, unique on the page and the same for the same model every time."""
    base = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "model"
    slug, n = base, 1
    while slug in taken:
        n += 1
        slug = f"{base}-{n}"
    taken.add(slug)
    return slug


def sections(results: list[Result]) -> list[Section]:
    by_model: dict[str, list[tuple[int, Row, Result]]] = {}
    for i, res in enumerate(results):
        for r in res.rows:
            b = res.bundle(r.bundle)
            model = b.model if b else str(r.params.get("model") or "other")
            by_model.setdefault(model, []).append((i, r, res))
    order = sorted(by_model, key=lambda m: m == "other")  # "other" last, the rest as they came
    taken: set[str] = set()
    out = []
    for model in order:
        rows = by_model[model]
        many = len({i for i, _, _ in rows}) > 1
        out.append(Section(model, _slug(model, taken), [(f"#{i + 1} " if many else "", r, res) for i, r, res in rows]))
    return out


def _num(v) -> str:
    return cell(v, ",")


def _param(v, cut: int = 40) -> str:
    """A param's value for a cell: a long one (a recipe) cut short, whole in the tooltip."""
    text = str(v)
    return escape(text) if len(text) <= cut else f'<span title="{escape(text)}">{escape(text[:cut - 1])}…</span>'


def _rnd(b: BundleInfo | None) -> str:
    return f'<span class="rnd">{escape(RANDOM_LABEL)}</span>' if b and b.weights == "random" else ""


# -- the environment ---------------------------------------------------------------------------------------------------
def _environment(i: int, res: Result) -> str:
    run, h = res.run, res.run.host
    items = [("date", run.date), ("commit", run.commit or "-"), ("medc", run.medc),
             ("CPU", f"{h.get('cpu', '?')}, {h.get('cores', '?')} cores, {h.get('threads', '?')} threads used, "
                     f"{h.get('memory_gib', '?')} GiB, {h.get('os', '?')}"),
             ("CPU flags", " ".join(h.get("flags") or []) or "-"),
             ("toolchain", ", ".join(f"{k} {v}" for k, v in sorted(run.toolchain.items()))),
             ("providers", ", ".join(run.providers) or "-"),
             ("GPU", ", ".join(f"{k} {v}" for k, v in run.gpu.items()) if run.gpu else "none"),
             ("probe peaks", ", ".join(f"{m.name} {_num(m.max if m.max is not None else m.value)} {m.unit}"
                                       for m in run.probe) or "-"),
             ("bundles", ", ".join(f"{b.name} ({b.model})" for b in run.bundles) or "-")]
    if run.command:
        items.append(("command", run.command))
    items += [("note", n) for n in run.notes]
    rows = "".join(f"<tr><th>{escape(k)}</th><td>{escape(str(v))}</td></tr>" for k, v in items)
    head = f"#{i + 1} {res.title}" if res.title else f"#{i + 1}"
    return f"<h3>{escape(head)}</h3>\n<table>{rows}</table>"


# -- a model's tables --------------------------------------------------------------------------------------------------
def _value(k: str, v) -> str:
    if isinstance(v, float) and "cosine" in k and 0 < 1 - v < 5e-7:  # as close as 1 - 1e-13: say how close
        return f"{k} 1 - {1 - v:.2g}"
    return f"{k} {v:.6g}" if isinstance(v, float) else f"{k} {v}"  # cosines need their digits


def _fidelity(fid: dict) -> str:
    parts = []
    for k, v in fid.items():
        if isinstance(v, dict):  # per component: its cosine, where it has one
            parts += [_value(f"{c} cosine", d["cosine"]) for c, d in v.items() if isinstance(d, dict) and "cosine" in d]
        else:
            parts.append(_value(k, v))
    return ", ".join(parts) or "no fidelity record"


def _legend(sec: Section) -> str:
    body = []
    for name, b in sec.bundles().items():
        if b is None:
            body.append(f"<tr><td>{escape(name)}</td><td colspan=\"3\">no bundle record (a baseline or a row without "
                        f"one)</td></tr>")
            continue
        target = f", target {b.target}" if b.target else ""
        body.append(f"<tr><td>{escape(name)}</td><td>{escape(b.precision + target)}</td>"
                    f"<td>{_rnd(b) or escape(b.weights)}</td><td>{escape(_fidelity(b.fidelity))}</td></tr>")
    return ('<table class="legend"><tr><th>bundle</th><th>precision</th><th>weights</th><th>fidelity</th></tr>'
            + "".join(body) + "</table>")


def _cell(m) -> str:
    if m is None or m.value is None:
        return '<td class="n">-</td>'
    p99 = f" <small>{_num(m.p99)}</small>" if m.p99 is not None and m.count > 1 and m.p99 != m.value else ""
    return f'<td class="n">{_num(m.value)}{p99}</td>'


def _table(kind: str, items: list[tuple[str, Row, Result]]) -> str:
    names = KEY_METRICS.get(kind) or list(dict.fromkeys(m.name for _, r, _ in items for m in r.metrics))[:4]
    units = {m.name: m.unit for _, r, _ in reversed(items) for m in r.metrics}

    def shown(k: str) -> bool:  # the model and precision (plan rows' recipe) are in the section head and the legend
        return not all((b := res.bundle(r.bundle)) and str(r.params.get(k)) in (b.model, b.precision)
                       for _, r, res in items if k in r.params)

    keys = [k for k in dict.fromkeys(k for _, r, _ in items for k in r.params) if shown(k)]
    varying = [k for k in keys if len({str(r.params.get(k)) for _, r, _ in items}) > 1]
    same = [f"{escape(k)}={_param(items[0][1].params[k])}" for k in keys
            if k not in varying and k in items[0][1].params]
    floor = kind in FLOOR_KINDS or any(r.floor for _, r, _ in items)
    head = ["bundle", "backend", *varying, *(f"{n} ({units[n]})" if n in units else n for n in names)]
    head = "".join(f"<th>{escape(h)}</th>" for h in head) + ("<th>of floor</th>" if floor else "")
    body = []
    for tag, r, _ in items:
        cells = f"<td>{escape(tag + r.bundle)}</td><td>{escape(r.backend)}</td>"
        cells += "".join(f"<td>{_param(r.params.get(k, '-'))}</td>" for k in varying)
        cells += "".join(_cell(r.metric(n)) for n in names)
        if floor:
            frac = r.floor.fraction if r.floor else None
            cells += f'<td class="n">{f"{frac:.0%}" if frac is not None else "-"}</td>'
        body.append(f"<tr>{cells}</tr>")
    const = f'<p class="const">every row: {", ".join(same)}</p>' if same else ""
    return f"<h4>{escape(kind)}</h4>{const}<div class=\"wide\"><table><tr>{head}</tr>{''.join(body)}</table></div>"


def _section(sec: Section, Figure) -> str:
    kinds = dict.fromkeys(r.kind for _, r, _ in sec.items)
    tables = "".join(_table(k, [it for it in sec.items if it[1].kind == k]) for k in kinds)
    files = sorted({tag.strip() for tag, _, _ in sec.items if tag})
    where = f'<p class="const">rows from {", ".join(files)} (see Environment)</p>' if files else ""
    warn = (f'<p><span class="rnd">{escape(RANDOM_LABEL)}</span> for the bundles marked so below: their speed is '
            "real, their outputs are not.</p>" if any(b and b.weights == "random" for b in sec.bundles().values()) else "")
    notes = list(dict.fromkeys(n for _, r, _ in sec.items for n in r.notes))
    note_html = "<ul>" + "".join(f"<li>{escape(n)}</li>" for n in notes) + "</ul>" if notes else ""
    figs = plots.model_figures(Figure, [(t, r) for t, r, _ in sec.items], sec.model, sec.slug)
    return (f'<section id="model-{sec.slug}">\n<h2>{escape(sec.model)}</h2>\n{where}{warn}{_legend(sec)}\n'
            f"{tables}\n{note_html}\n" + "\n".join(figs) + "\n</section>")


def render(results: list[Result], title: str | None = None) -> str:
    """One self-contained HTML page (no network needed to view it) for `results`."""
    if not results:
        raise MedcError("medc report needs at least one result file.")
    Figure = plots.figure_class()
    title = title or results[0].title or "medc benchmark report"
    secs = sections(results)
    envs = "\n".join(_environment(i, r) for i, r in enumerate(results))
    toc = " · ".join([*(f'<a href="#model-{s.slug}">{escape(s.model)}</a>' for s in secs),
                      '<a href="#across">across models</a>', '<a href="#environment">environment</a>'])
    index = {id(res): i for i, res in enumerate(results)}  # by identity: two files may hold equal results
    plan_rows = [(s.model, index[id(res)], r) for s in secs for _, r, res in s.items]
    across = [f for f in (plots.speed_fidelity(Figure, results), plots.plan(Figure, plan_rows)) if f]
    across_html = "\n".join(across) if across else "<p>Nothing to compare across models in these results.</p>"
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f"<style>{CSS}</style></head>\n<body>\n<h1>{escape(title)}</h1>\n<p>{toc}</p>\n"
            "<p>Tables: p50 of each metric over its samples, p99 small beside it; "
            "of floor: the roofline floor / measured p50 (1.0 = the hardware limit).</p>\n"
            + "\n".join(_section(s, Figure) for s in secs)
            + f'\n<section id="across">\n<h2>Across models</h2>\n{across_html}\n</section>\n'
            f'<section id="environment">\n<h2>Environment</h2>\n{envs}\n</section>\n</body></html>\n')
