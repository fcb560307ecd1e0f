"""The whole-model gates of built bundles, as one benchmark result: what each bundle's build measured against the
PyTorch fp32 reference (greedy tokens and perplexity on real text), beside how it was built.

    python -m medc.benchmarks.gates bundles/g270m-orin-int8 bundles/g270m-cuda-w4a16 --out results/w4a16-gemma3-270m

Reads each bundle's manifest only (the gate ran during `medc build`; a bundle kept with --allow-degraded records a
failed gate too). One row of kind "gate" per bundle: params name the target, the recipe, the decoder's scheme and
KV dtype and the token-embedding form; metrics are the perplexity and its increase, greedy prefix agreement, top-1
agreement and mean KL against the fp32 model.
"""

from __future__ import annotations

from pathlib import Path

import click
from medc.benchmarks.schema import Metric, Result, Row


def row(bundle: Path) -> Row:
    from medc.manifest import Manifest

    m = Manifest.read(bundle)
    gate = (m.build or {}).get("generation_gate") or {}
    if "perplexity" not in gate:
        raise click.ClickException(f"{bundle}: its build recorded no perplexity gate (random weights, or no decoder).")
    decoder = m.components["decoder"].quantization
    embed = m.components["embed_tokens"].quantization
    recipe = m.build["recipe"]
    params = {"target": m.target, "recipe": ",".join(f"{k}={v}" for k, v in recipe["precisions"].items()),
              "recipe_source": recipe["source"], "options": ",".join(f"{k}={v}" for k, v in recipe["options"].items()),
              "scheme": decoder.get("scheme", decoder.get("method")), "kv_dtype": m.generation.get("kv_dtype"),
              "embed_tokens": embed.get("format", embed.get("method")), "rule": gate["rule"],
              "passed": gate["passed"], "gated_on": gate.get("gated_on", "ONNX Runtime CPU")}
    metrics = [Metric.of("perplexity", "ppl", [gate["perplexity"]]),
               Metric.of("reference_perplexity", "ppl", [gate["reference_perplexity"]]),
               Metric.of("perplexity_increase_pct", "%", [100 * gate["perplexity_increase"]]),
               Metric.of("greedy_prefix_agreement", "tokens", [min(gate["greedy_prefix_agreement"])]),
               Metric.of("top1_agreement", "fraction", [gate["top1_agreement"]])]
    if "kl_mean" in gate:
        metrics.append(Metric.of("kl_mean", "nats", [gate["kl_mean"]]))
    notes = [f"greedy prefix agreement per prompt {gate['greedy_prefix_agreement']} of {gate['greedy_new_tokens']}"]
    return Row("gate", bundle.name, "onnxruntime", params, metrics, notes=notes)


@click.command()
@click.argument("bundles", nargs=-1, type=click.Path(exists=True, file_okay=False, path_type=Path), required=True)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Write OUT.json and OUT.md.")
@click.option("--title", default="Whole-model gates of medc bundles")
@click.option("--note", "notes", multiple=True, help="A note for the result (what was run, on what).")
def main(bundles, out, title, notes):
    import sys

    from medc.benchmarks import schema
    from medc.benchmarks.host import bundle_info, run_info

    run = run_info(None, ["CPUExecutionProvider"], [bundle_info(b) for b in bundles],
                   " ".join(["python -m medc.benchmarks.gates", *sys.argv[1:]]))
    run.notes += list(notes)
    res = Result(run, [row(b) for b in bundles], title)
    click.echo("\n".join(schema.table(res.rows)))
    out.parent.mkdir(parents=True, exist_ok=True)
    schema.save(res, out)


if __name__ == "__main__":
    main()
