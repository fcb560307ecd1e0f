"""Check `medc plan` against reality on this CPU: run a bundle at the plan's context and compare peak RSS.

Each bundle runs in a fresh process (so the peak is its own): generative bundles prefill `context - new` tokens
(with one image when the bundle has a vision encoder) and decode `new` tokens; encoder bundles embed `batch` images and
texts. The plan is made for the bundle's own recipe, target `cpu`, the same context and batch.

    python -m medc.benchmarks.plan_check bundles/gemma3-270m-int8 bundles/medsiglip-tiny --out results/plan-check

The real Gemma 3 270M, ORT and portable forms, at a long prompt (prefill in chunks, the decoder's activations a
chunk's): benchmarks/results/plan-check-270m.md (its command is in the file).

Writes a benchmark result (benchmarks/schema.py): one row of kind "plan" per bundle, planned against measured MiB
(params name the flavour, the plan's prefill chunk and the prompt's tokens).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import click
from medc.benchmarks.schema import Metric, Result, Row

MIB = 2**20

_CHILD = r"""
import json, sys
import numpy as np
import medc.runtime
bundle, context, new, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
with medc.runtime.load(bundle) as m:
    if m.bundle.manifest.model["family"] == "gemma3":
        images = None
        if "vision_encoder" in m.bundle.manifest.components:
            images = [np.random.default_rng(0).integers(0, 255, (448, 448, 3), dtype=np.uint8)]
        tok = m.assets.tokenizer
        # The prompt: one sentence repeated to fill the context. Only prompts of about the context's length are
        # tokenized (tokenizing a much longer text to cut it holds hundreds of MiB that the run would not).
        sentence = "the patient presents with a cough and fever for three days. "
        room = context - ((m.assets.mm_tokens_per_image + 8) if images else 0) - new - 16
        reps = max(1, int(room / (len(tok.encode(sentence * 16).ids) / 16)))
        while reps > 1 and len(tok.encode(sentence * reps).ids) > room:
            reps -= max(1, reps // 100)
        m.generate(sentence * reps, images=images, max_new_tokens=new, ignore_eos=True)
        print(json.dumps({"prompt_tokens": len(tok.encode(sentence * reps).ids)}))
    else:
        imgs = [np.random.default_rng(i).integers(0, 255, (512, 512, 3), dtype=np.uint8) for i in range(batch)]
        m.embed_images(imgs)
        m.embed_texts(["a chest radiograph"] * batch)
# VmHWM, not ru_maxrss: Linux carries ru_maxrss across fork + exec, so it would report this script's parent
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"peak_rss_bytes": hwm * 1024}))
"""


def measure(bundle: Path, context: int, new: int, batch: int, given: Path | None = None) -> dict:
    from medc.compile import planner
    from medc.compile.plan import resolve
    from medc.manifest import Manifest
    from medc.targets import get_target

    m = Manifest.read(bundle)
    context = min(context, int(m.generation.get("max_positions", context)))  # the tiny model stops at 512
    source = m.model["source"]
    if source.get("kind") == "checkpoint":
        from medc.compile.loader import locate_source

        model = str(locate_source(source, given))
    else:
        model = m.model["name"]
    config = resolve(model).spec.config
    recipe = m.build["recipe"]
    plan = planner.plan_memory(m.model["name"], m.model["family"], config, recipe["precisions"], get_target("cpu"),
                               context, batch, recipe.get("flavour"), recipe.get("options"))
    out = subprocess.run([sys.executable, "-c", _CHILD, str(bundle), str(context), str(new), str(batch)],
                         capture_output=True, text=True)
    if out.returncode:
        raise click.ClickException(f"{bundle}: the run failed: {out.stderr.strip().splitlines()[-1]}")
    lines = [json.loads(line) for line in out.stdout.strip().splitlines() if line.startswith("{")]
    peak = lines[-1]["peak_rss_bytes"]
    return {"bundle": str(bundle), "model": m.model["name"], "recipe": recipe["precisions"], "context": context,
            "batch": batch, "flavour": recipe.get("flavour", "ort"), "prefill_chunk": plan.prefill_chunk,
            "prompt_tokens": next((x["prompt_tokens"] for x in lines if "prompt_tokens" in x), None),
            "planned_bytes": plan.total_bytes, "weight_bytes": plan.weight_bytes, "kv_bytes": plan.kv_bytes,
            "activation_bytes": plan.activation_bytes, "load_bytes": plan.load_bytes,
            "runtime_bytes": plan.runtime_bytes, "peak_rss_bytes": peak, "ratio": peak / plan.total_bytes}


def row(r: dict) -> Row:
    """The schema row of one `measure` result (its byte counts in MiB; `ratio` is measured / planned)."""
    recipe = ",".join(f"{k}={v}" for k, v in r["recipe"].items())
    params = {"model": r["model"], "target": r.get("target", "cpu"), "recipe": recipe, "context": r["context"], "batch": r["batch"]}
    params.update({k: r[k] for k in ("flavour", "prefill_chunk", "prompt_tokens") if r.get(k) is not None})
    mib = [("planned_mib", "planned_bytes"), ("measured_mib", "peak_rss_bytes"), ("weight_mib", "weight_bytes"),
           ("kv_mib", "kv_bytes"), ("activation_mib", "activation_bytes"), ("load_mib", "load_bytes"),
           ("runtime_mib", "runtime_bytes")]
    metrics = [Metric.of(name, "MiB", [r[key] / MIB]) for name, key in mib if key in r]
    metrics.append(Metric.of("ratio", "x", [r["ratio"]]))
    return Row("plan", Path(r["bundle"]).name, "onnxruntime", params, metrics,
               notes=["measured_mib: the run's peak RSS (VmHWM), in a fresh process"])


def result(rows: list[dict], bundles: list[Path], command: str | None = None) -> Result:
    from medc.benchmarks.host import bundle_info, run_info

    run = run_info(None, ["CPUExecutionProvider"], [bundle_info(b) for b in bundles], command)
    return Result(run, [row(r) for r in rows], "medc plan vs measured peak RSS (CPU)")


@click.command()
@click.argument("bundles", nargs=-1, type=click.Path(exists=True, path_type=Path), required=True)
@click.option("--context", type=int, default=None, help="Tokens (default: 512 for generative bundles).")
@click.option("--new-tokens", type=int, default=16)
@click.option("--batch", type=int, default=1)
@click.option("--source", type=click.Path(exists=True, path_type=Path), default=None,
              help="The checkpoint or GGUF the bundles were built from, where medc cannot find it.")
@click.option("--out", "out", type=click.Path(path_type=Path), help="Write OUT.json and OUT.md (the result schema).")
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="Write the result's JSON here.")
@click.option("--markdown", "md_out", type=click.Path(path_type=Path), help="Write the result's Markdown here.")
@click.option("--note", "notes", multiple=True, help="A note for the result (what was run, on what).")
def main(bundles, context, new_tokens, batch, source, out, json_out, md_out, notes):
    import sys

    from medc.benchmarks import schema

    res = result([measure(b, context or 512, new_tokens, batch, source) for b in bundles], list(bundles),
                 " ".join(["python -m medc.benchmarks.plan_check", *sys.argv[1:]]))
    res.run.notes += list(notes)
    click.echo("\n".join(schema.table(res.rows)))
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        schema.save(res, out)
    if json_out:
        json_out.write_text(schema.to_json(res) + "\n")
    if md_out:
        md_out.write_text(schema.to_markdown(res))


if __name__ == "__main__":
    main()
