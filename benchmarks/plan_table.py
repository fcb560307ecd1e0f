"""The README's planning table: `medc plan` for MedGemma 4B and MedSigLIP-448 on every target, as Markdown.

    python -m medc.benchmarks.plan_table > plan-table.md
    python -m medc.benchmarks.plan_table --out benchmarks/results/plan-table    # also a result (benchmarks/schema.py)

Arithmetic on the configs, no weights: each row of the result is of kind "plan" with the planned figures only
(planned_mib, weight_mib, kv_mib, kv_32k_mib, usable_mib, decode_ceiling_tok_s, vision_floor_ms); nothing measured.
"""

from __future__ import annotations

from pathlib import Path

import click
from medc.benchmarks.schema import Metric, Result, Row

GIB, MIB = 2**30, 2**20


def plan_rows(models=("medgemma-4b-it", "medsiglip-448"), context: int = 4096) -> list[Row]:
    from medc.compile import planner
    from medc.compile.plan import BuildOptions, make_plan, resolve
    from medc.targets import TARGETS

    out = []
    for model in models:
        resolved = resolve(model)
        for name, t in TARGETS.items():
            if t.platform == "host" or name == "cuda":
                continue
            precision = t.default_precision
            opts = BuildOptions(model=model, out=Path("-"), precision=precision, target=name, context=context)
            plan = make_plan(opts, resolved)
            p = planner.plan_build(plan)
            best, _ = planner.recommend(resolved, opts)
            if not p.fits and best is not None:  # show the preset the planner recommends instead
                precision, p = planner.preset_of(best), best
            kinds = set(p.recipe.values()) - {"fp16"} if precision == "int4" else set(p.recipe.values())
            precision = kinds.pop() if len(kinds) == 1 else precision  # MedSigLIP's "int4" is its int8
            largest = None if p.fits else planner.largest_context(resolved, opts, precision)
            kv32 = planner.plan_build(plan, context=32768).kv_bytes if p.kv_bytes else 0
            metrics = [Metric.of("planned_mib", "MiB", [p.total_bytes / MIB]),
                       Metric.of("weight_mib", "MiB", [p.weight_bytes / MIB]),
                       Metric.of("kv_mib", "MiB", [p.kv_bytes / MIB]),
                       Metric.of("kv_32k_mib", "MiB", [kv32 / MIB]),
                       Metric.of("usable_mib", "MiB", [p.usable_bytes / MIB])]
            if p.decode_tokens_per_s:
                metrics.append(Metric.of("decode_ceiling_tok_s", "tok/s", [p.decode_tokens_per_s]))
            if p.vision_ms:
                metrics.append(Metric.of("vision_floor_ms", "ms", [p.vision_ms]))
            params = {"model": model, "target": name, "precision": precision, "context": context, "batch": 1,
                      "fits": p.fits, "largest_context": largest}
            out.append(Row("plan", model, "plan", params, metrics))
    return out


def _gib(r: Row):
    """A row's MiB metric by name, in GiB."""
    return lambda name: r.metric(name).p50 * MIB / GIB


def _floors(r: Row) -> str:
    """The decode ceiling and vision floor cells ("-" where the plan has none)."""
    decode = f"{r.metric('decode_ceiling_tok_s').p50:.0f}" if r.metric("decode_ceiling_tok_s") else "-"
    vision = f"{r.metric('vision_floor_ms').p50:.1f}" if r.metric("vision_floor_ms") else "-"
    return f"{decode} | {vision}"


def rows(models=("medgemma-4b-it", "medsiglip-448"), context: int = 4096) -> list[str]:
    """The README's table (GiB, as `medc plan` prints them)."""
    out = ["| model | target | precision | weights GiB | KV 4k GiB | KV 32k GiB | total @4k GiB | usable GiB | fits @4k "
           "| decode ceiling tok/s | vision floor ms |", "|" + "---|" * 11]
    for r in plan_rows(models, context):
        p, g = r.params, _gib(r)
        fits = "yes" if p["fits"] else ("no" + (f" (yes at {p['largest_context']})" if p["largest_context"] else ""))
        out.append(f"| {p['model']} | {p['target']} | {p['precision']} | {g('weight_mib'):.2f} | {g('kv_mib'):.2f} | "
                   f"{g('kv_32k_mib'):.2f} | {g('planned_mib'):.2f} | {g('usable_mib'):.1f} | {fits} | {_floors(r)} |")
    return out


def headroom_rows(model: str = "medgemma-4b-it", contexts=(4096, 8192)) -> list[str]:
    """The README's "Plan for a device" table: one model on every target at each context, with the headroom."""
    out = ["| target | precision | context | weights GiB | total GiB | usable GiB | fits | headroom GiB | decode ceiling "
           "tok/s | vision floor ms |", "|" + "---|" * 10]
    for context in contexts:
        for r in plan_rows((model,), context):
            p, g = r.params, _gib(r)
            out.append(f"| {p['target']} | {p['precision']} | {context} | {g('weight_mib'):.2f} | "
                       f"{g('planned_mib'):.2f} | {g('usable_mib'):.1f} | {'yes' if p['fits'] else 'no'} | "
                       f"{g('usable_mib') - g('planned_mib'):.2f} | {_floors(r)} |")
    return out


@click.command()
@click.option("--context", type=int, default=4096, show_default=True)
@click.option("--headroom", is_flag=True, help="The README's MedGemma 4B table at 4k and 8k context, with headroom.")
@click.option("--out", type=click.Path(path_type=Path), help="Also write OUT.json and OUT.md (the result schema).")
def main(context, headroom, out):
    if headroom:
        click.echo("\n".join(headroom_rows()))
        return
    click.echo("\n".join(rows(context=context)))
    if out:
        import sys

        from medc.benchmarks import schema
        from medc.benchmarks.host import run_info

        run = run_info(None, command=" ".join(["python -m medc.benchmarks.plan_table", *sys.argv[1:]]))
        run.notes = [("arithmetic on the models' configs and the targets' profiles (no weights, nothing measured): "
                      "the precision each target defaults to, or the preset `medc plan` recommends where that does "
                      "not fit")]
        out.parent.mkdir(parents=True, exist_ok=True)
        schema.save(Result(run, plan_rows(context=context), f"medc plan on every target, context {context}"), out)


if __name__ == "__main__":
    main()
