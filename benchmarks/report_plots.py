"""The figures of `medc report` (benchmarks/report.py lays out the page around them).

Per model: the latency distribution, throughput vs batch, TTFT / TPOT vs prompt and past length, and the fraction of
the roofline floor reached. Across models: speed vs fidelity and planned vs measured memory. Each is drawn only when
its data can show something (a throughput-vs-batch plot needs two batch sizes). Labels are short: bundle and backend,
plus only the params that vary inside that plot; encoder components get their own panels (an image encoder is 100x
slower than a text encoder, one axis would flatten the faster). Figures are PNGs inlined as base64.
matplotlib is an optional extra (medc[report]); it is imported only when a page is drawn.
"""

from __future__ import annotations

import base64
import io
import math
from html import escape

from medc.benchmarks.schema import Result, Row
from medc.errors import MedcError

FIGURE_TAG = '<figure class="plot"'  # how the CLI counts the figures of a page
BASELINES = frozenset({"torch-eager", "llama.cpp", "ort-genai"})  # what a bundle is compared against
RANDOM_LABEL = "random weights: fidelity not clinical"
SPAN_LOG = 30.0  # values spanning more than this factor get a log axis
INLINE_LEGEND = 5  # a legend with more lines than this goes below its axes

Item = tuple[str, Row]  # a row and the tag of its file ("#2 " where a section mixes files, else "")


def figure_class():
    """matplotlib's Figure on the Agg backend (no display needed); a clear error without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        raise MedcError("medc report needs matplotlib: pip install 'medc[report]'") from None
    matplotlib.use("Agg")
    from matplotlib.figure import Figure  # not pyplot: no global figure registry to leak into

    return Figure


def _t(s) -> str:
    """Text from the results, safe for matplotlib (a '$' would start mathtext)."""
    return str(s).replace("$", r"\$")


def _figure(fig_id: str, fig, caption: str) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", facecolor="white")
    png = base64.b64encode(buf.getvalue()).decode("ascii")
    return (f'{FIGURE_TAG} id="fig-{fig_id}"><img alt="{escape(caption)}" src="data:image/png;base64,{png}">'
            f"<figcaption>{escape(caption)}</figcaption></figure>")


def labels(items: list[Item], skip=()) -> list[str]:
    """Short labels: bundle and backend, plus only the params that differ between these rows (not those in skip)."""
    keys = list(dict.fromkeys(k for _, r in items for k in r.params if k not in skip))
    varying = [k for k in keys if len({str(r.params.get(k)) for _, r in items}) > 1]
    one_file = len({tag for tag, _ in items}) == 1  # then its tag says nothing
    return [" ".join([f"{'' if one_file else tag}{r.bundle} {r.backend}", *(f"{k}={r.params[k]}" for k in varying if k in r.params)])
            for tag, r in items]


def colours(items: list[Item]) -> dict[tuple, str]:
    """One colour per bundle + backend, the same in every figure of a model."""
    keys = dict.fromkeys((tag, r.bundle, r.backend) for tag, r in items)
    return {k: f"C{i % 10}" for i, k in enumerate(keys)}


def _log_if_wide(ax, values, axis: str = "y") -> None:
    vals = [v for v in values if v is not None and v > 0]
    if vals and len(vals) == len([v for v in values if v is not None]) and max(vals) > SPAN_LOG * min(vals):
        from matplotlib.ticker import FuncFormatter

        (ax.set_yscale if axis == "y" else ax.set_xscale)("log")
        (ax.yaxis if axis == "y" else ax.xaxis).set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))  # not 10^2


def _legend(ax, n: int) -> None:
    if n > INLINE_LEGEND:  # inside, it would cover the lines
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2 if n > 10 else 1,
                  frameon=False)
    elif n:
        ax.legend(fontsize=7)


def _label_width(names: list[str]) -> float:
    """Inches the y tick labels (fontsize 8) take left of the axes."""
    return 0.065 * max((len(s) for s in names), default=0)


def _x_axis(ax, xs: list[float]) -> None:
    """batch 1..64, prompts 64..4096: powers of two read best on a log2 axis; ticks at the values measured (a batch
    of 1.5 does not exist), as plain numbers."""
    if min(xs) > 0 and max(xs) >= 4 * min(xs):
        ax.set_xscale("log", base=2)
        ax.minorticks_off()
    ticks = sorted(set(xs))
    if len(ticks) <= 12:
        ax.set_xticks(ticks, [f"{v:g}" for v in ticks])


def _grid(Figure, n: int, w: float, h: float, cols: int = 2):
    cols = min(n, cols)
    fig = Figure(figsize=(w * cols, h * math.ceil(n / cols)), layout="constrained")
    axes = fig.subplots(math.ceil(n / cols), cols, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _split(items: list[Item]) -> list[tuple[str | None, list[Item]]]:
    """The rows per encoder component (None: rows without one)."""
    comps = dict.fromkeys(r.params.get("component") for _, r in items)
    return [(c, [(t, r) for t, r in items if r.params.get("component") == c]) for c in comps]


def _hbox(ax, data):
    import matplotlib

    major, minor = (int(p) for p in matplotlib.__version__.split(".")[:2])
    orient = {"orientation": "horizontal"} if (major, minor) >= (3, 10) else {"vert": False}  # vert= is deprecated
    return ax.boxplot(data, patch_artist=True, showfliers=True, flierprops={"markersize": 3}, **orient)


# -- per model ---------------------------------------------------------------------------------------------------------
def latency(Figure, items: list[Item], model: str, slug: str, colour: dict) -> str | None:
    """Horizontal boxes (long labels read left of them), one panel per metric and encoder component."""
    panels = []
    for metric in ("latency_ms", "tpot_ms"):
        have = [(t, r) for t, r in items if r.metric(metric) and r.metric(metric).samples]
        panels += [(metric, comp, sub) for comp, sub in _split(have)]
    if not panels:
        return None
    heights = [0.3 * len(sub) + 1.4 for *_, sub in panels]
    width = 5.5 + _label_width([s for *_, sub in panels for s in labels(sub, ("component",))])
    fig = Figure(figsize=(width, sum(heights)), layout="constrained")
    axes = fig.subplots(len(panels), 1, squeeze=False, height_ratios=heights)[:, 0]
    for ax, (metric, comp, sub) in zip(axes, panels):
        box = _hbox(ax, [r.metric(metric).samples for _, r in sub])
        for patch, (t, r) in zip(box["boxes"], sub):
            patch.set_facecolor(colour[(t, r.bundle, r.backend)])
            patch.set_alpha(0.6)
        ax.set_yticks(range(1, len(sub) + 1), [_t(s) for s in labels(sub, ("component",))], fontsize=8)
        ax.invert_yaxis()  # the first row on top, as in the table
        _log_if_wide(ax, [v for _, r in sub for v in (r.metric(metric).p50, r.metric(metric).p99)], "x")
        ax.set_xlabel(f"{metric} (ms)")
        ax.set_title(_t(f"{metric}" + (f", {comp}" if comp else "")), fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    return _figure(f"latency-{slug}", fig, f"{model}: distribution of the timed runs (box: p25-p75, line: median, "
                                           "whiskers: 1.5 IQR; tpot_ms: every inter-token latency).")


def lines(Figure, items: list[Item], model: str, slug: str, colour: dict, kind: str, x: str, metrics: tuple,
          caption: str, keep=lambda r: True, skip=()) -> str | None:
    """metric vs params[x], one line per bundle + backend + the other params that vary (not those in skip); a panel
    per metric and encoder component; none where no line has two x values (nothing to show)."""
    panels = []
    for metric in metrics:
        have = [(t, r) for t, r in items if x in r.params and keep(r) and r.metric(metric)
                and r.metric(metric).value is not None]
        for comp, sub in _split(have):
            series: dict[str, tuple] = {}
            for label, (t, r) in zip(labels(sub, (x, "component", *skip)), sub):
                series.setdefault(label, ((t, r.bundle, r.backend), []))[1].append(
                    (float(r.params[x]), float(r.metric(metric).value)))
            if any(len({p[0] for p in pts}) > 1 for _, pts in series.values()):
                panels.append((metric, comp, series))
    if not panels:
        return None
    fig, axes = _grid(Figure, len(panels), 6.0, 4.4)
    for ax, (metric, comp, series) in zip(axes, panels):
        styles: dict[tuple, int] = {}
        for label, (key, pts) in series.items():
            pts.sort()
            n = styles[key] = styles.get(key, -1) + 1  # the same bundle's lines: one colour, other dashes
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color=colour[key], linestyle=("-", "--", ":", "-.")[n % 4],
                    marker="osD^v"[n % 5], label=_t(label))
        _x_axis(ax, [p[0] for _, pts in series.values() for p in pts])
        _log_if_wide(ax, [p[1] for _, pts in series.values() for p in pts])
        ax.set_xlabel(x)
        ax.set_ylabel(metric)
        ax.set_title(_t(f"{metric}" + (f", {comp}" if comp else "")), fontsize=10)
        ax.grid(alpha=0.3)
        _legend(ax, len(series))
    return _figure(f"{kind}-{slug}", fig, f"{model}: {caption}")


def floor(Figure, items: list[Item], model: str, slug: str, colour: dict) -> str | None:
    """Bars of floor / measured p50, a panel per encoder component (like the latency panels)."""
    have = [(t, r) for t, r in items if r.floor and r.floor.fraction is not None]
    if not have:
        return None
    panels = []
    for comp, sub in _split(have):
        names = labels(sub, ("component",))
        if len({r.floor.metric for _, r in sub}) > 1:
            names = [f"{s} ({r.floor.metric})" for s, (_, r) in zip(names, sub)]
        panels.append((comp, sub, names))
    heights = [0.3 * len(sub) + 1.3 for _, sub, _ in panels]
    fig = Figure(figsize=(5.5 + _label_width([s for *_, names in panels for s in names]), sum(heights)),
                 layout="constrained")
    axes = fig.subplots(len(panels), 1, squeeze=False, sharex=True, height_ratios=heights)[:, 0]
    fracs = [r.floor.fraction for _, r in have]
    for n, (ax, (comp, sub, names)) in enumerate(zip(axes, panels)):
        ax.barh(range(len(sub)), [r.floor.fraction for _, r in sub],
                color=[colour[(t, r.bundle, r.backend)] for t, r in sub])
        ax.set_yticks(range(len(sub)), [_t(s) for s in names], fontsize=8)
        ax.invert_yaxis()
        ax.axvline(1.0, color="k", linestyle="--", linewidth=1)
        _log_if_wide(ax, fracs, "x")  # one scale for all panels: fractions compare across components
        ax.set_xlim(right=1.1)
        if comp:
            ax.set_title(_t(comp), fontsize=10)
        if n == len(panels) - 1:  # the panels share their x axis
            ax.set_xlabel("floor / measured p50 (1.0 = the hardware limit)")
        ax.grid(axis="x", alpha=0.3)
    return _figure(f"floor-{slug}", fig, f"{model}: achieved fraction of the roofline floor per row.")


# -- across models -----------------------------------------------------------------------------------------------------
def _speed(res: Result, name: str) -> tuple[str, float] | None:
    """A bundle's speed for the speed-vs-fidelity picture: encoders by items/s at their smallest batch (the slowest
    component there: it bounds the pipeline), generation by decode tok/s (smallest batch, then shortest past). Only
    the bundle's own rows: a baseline timed beside it is not its speed."""
    own = [r for r in res.rows if r.bundle == name and r.backend not in BASELINES]
    enc = [r for r in own if r.kind == "encoder" and r.metric("items_per_s") and r.metric("items_per_s").value]
    if enc:
        b = min(r.params.get("batch", 1) for r in enc)
        return "items/s (smallest batch, slowest component)", min(
            r.metric("items_per_s").value for r in enc if r.params.get("batch", 1) == b)
    gen = [r for r in own if r.kind == "generation" and r.metric("decode_tok_s") and r.metric("decode_tok_s").value]
    if gen:
        r = min(gen, key=lambda r: (r.params.get("batch") or 1, r.params.get("past") or 0))
        return "decode tok/s", r.metric("decode_tok_s").value
    return None


def speed_fidelity(Figure, results: list[Result]) -> str | None:
    """One panel per model (and fidelity measure): right is faster, down is closer to the reference."""
    pts = []  # (panel key, x, y, label, random, file index)
    for i, res in enumerate(results):
        for b in res.run.bundles:
            sp = _speed(res, b.name)
            if sp is None:
                continue
            short = b.precision if len(b.precision) <= 16 and b.precision not in b.name else ""
            label, rnd = b.name + (f" ({short})" if short else ""), b.weights == "random"
            if b.fidelity.get("worst_cosine") is not None:  # 1 - cos, floored so an exact match stays on a log axis
                y = max(1.0 - float(b.fidelity["worst_cosine"]), 1e-9)
                pts.append(((b.model, sp[0], "1 - worst cosine (lower is closer)"), sp[1], y, label, rnd, i))
            if b.fidelity.get("perplexity_increase") is not None:
                pts.append(((b.model, sp[0], "perplexity increase (lower is closer)"), sp[1],
                            float(b.fidelity["perplexity_increase"]), label, rnd, i))
    if not pts:
        return None
    keys = list(dict.fromkeys(p[0] for p in pts))
    fig, axes = _grid(Figure, len(keys), 5.5, 4.2)
    for ax, key in zip(axes, keys):
        here = [p for p in pts if p[0] == key]
        many = len({p[5] for p in here}) > 1  # the file's tag only where the panel mixes files
        for j, (_, x, y, label, rnd, i) in enumerate(here):
            label = f"#{i + 1} {label}" if many else label
            c = f"C{j % 10}"
            ax.scatter([x], [y], s=70, edgecolors=c, facecolors="none" if rnd else c, linewidths=2, zorder=3)
            ax.annotate(_t(label), (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
        if key[2].startswith("1 - worst"):
            ax.set_yscale("log")
        ax.set_title(_t(key[0]), fontsize=10)
        ax.set_xlabel(key[1])
        ax.set_ylabel(key[2])
        ax.grid(alpha=0.3)
        ax.margins(x=0.35, y=0.25)  # room for the annotations
        if any(p[4] for p in here):
            ax.scatter([], [], s=50, facecolors="none", edgecolors="gray", label="hollow: " + RANDOM_LABEL)
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18), frameon=False)
    return _figure("speed-fidelity", fig, "Speed vs fidelity, one panel per model: right is faster, down is closer "
                                          f"to the reference. Hollow markers: {RANDOM_LABEL}.")


def plan(Figure, items: list[tuple[str, int, Row]]) -> str | None:
    """Planned and measured memory of every plan row, side by side per bundle (a scatter piles close plans on one
    another); (model, index of the row's file, row) items."""
    items = [(model, i, r) for model, i, r in items if r.kind == "plan"]
    tags = {i: f"#{i + 1} " if len({i for _, i, _ in items}) > 1 else "" for _, i, _ in items}
    pts = [(f"{tags[i]}{r.bundle} ({model})", r.metric("planned_mib").value, r.metric("measured_mib").value)
           for model, i, r in items if r.metric("planned_mib") and r.metric("measured_mib")]
    pts = [p for p in pts if p[1] is not None and p[2] is not None]
    if not pts:
        return None
    fig = Figure(figsize=(5.5 + _label_width([p[0] for p in pts]), 0.5 * len(pts) + 1.5), layout="constrained")
    ax = fig.add_subplot()
    ys = range(len(pts))
    ax.barh([y - 0.2 for y in ys], [p[1] for p in pts], height=0.4, color="#aec7e8", label="planned")
    ax.barh([y + 0.2 for y in ys], [p[2] for p in pts], height=0.4, color="C0", label="measured (peak RSS)")
    for y, (_, planned, measured) in zip(ys, pts):
        ax.annotate(f"{measured / planned:.2f}x", (max(planned, measured), y), textcoords="offset points",
                    xytext=(4, -3), fontsize=8)
    ax.set_yticks(list(ys), [_t(p[0]) for p in pts], fontsize=8)
    ax.invert_yaxis()
    _log_if_wide(ax, [v for p in pts for v in p[1:]], "x")
    ax.margins(x=0.12)
    ax.set_xlabel("MiB")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
    return _figure("plan", fig, "Planned vs measured memory, all models (measured / planned beside each pair; "
                                "above 1x: the plan was short).")


def model_figures(Figure, items: list[Item], model: str, slug: str) -> list[str]:
    """The figures of one model's section, only those its rows can show."""
    colour = colours(items)

    def main_run(r: Row) -> bool:  # generation: the main runs (past 0) against batch and prompt; --past runs apart
        return not r.params.get("past")

    made = [latency(Figure, items, model, slug, colour),
            lines(Figure, items, model, slug, colour, "throughput", "batch", ("items_per_s", "decode_tok_s"),
                  "throughput vs batch size.", main_run, ("new_tokens",)),
            lines(Figure, items, model, slug, colour, "prompt", "prompt_tokens", ("ttft_ms", "tpot_ms"),
                  "TTFT and TPOT vs prompt length (tokens).", main_run, ("new_tokens",)),
            lines(Figure, items, model, slug, colour, "past", "past", ("ttft_ms", "tpot_ms"),
                  "TTFT and TPOT vs past length (tokens already in the KV cache).",
                  lambda r: not main_run(r), ("prompt_tokens", "new_tokens")),
            floor(Figure, items, model, slug, colour)]
    return [f for f in made if f]
