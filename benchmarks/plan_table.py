"""The README's planning table: `medc plan` for MedGemma 4B and MedSigLIP-448 on every target, as Markdown.

    python -m medc.benchmarks.plan_table > plan-table.md
"""

from __future__ import annotations

from pathlib import Path

import click

GIB = 2**30


def rows(models=("medgemma-4b-it", "medsiglip-448"), context: int = 4096) -> list[str]:
    from medc.compile import planner
    from medc.compile.plan import BuildOptions, make_plan, resolve
    from medc.targets import TARGETS

    out = ["| model | target | precision | weights GiB | KV 4k GiB | KV 32k GiB | total @4k GiB | usable GiB | fits @4k "
           "| decode ceiling tok/s | vision floor ms |", "|" + "---|" * 11]
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
            fits = "yes" if p.fits else "no"
            if not p.fits:
                c = planner.largest_context(resolved, opts, precision)
                fits += f" (yes at {c})" if c else ""
            kv32 = planner.plan_build(plan, context=32768).kv_bytes if p.kv_bytes else 0
            decode = f"{p.decode_tokens_per_s:.0f}" if p.decode_tokens_per_s else "-"
            vision = f"{p.vision_ms:.1f}" if p.vision_ms else "-"
            out.append(f"| {model} | {name} | {precision} | {p.weight_bytes / GIB:.2f} | {p.kv_bytes / GIB:.2f} | "
                       f"{kv32 / GIB:.2f} | {p.total_bytes / GIB:.2f} | {p.usable_bytes / GIB:.1f} | "
                       f"{fits} | {decode} | {vision} |")
    return out


@click.command()
@click.option("--context", type=int, default=4096, show_default=True)
def main(context):
    click.echo("\n".join(rows(context=context)))


if __name__ == "__main__":
    main()
