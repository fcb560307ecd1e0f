"""What fine-tuned adapters cost at run time on Gemma 3 270M (real weights): decode tokens/s of the base, the base with
the adapter merged at build, and the base with the adapter active at run time (LoRA slots); and what an adapter
weighs beside its bundle.

    python benchmarks/lora.py [GGUF] --precision int8 --out benchmarks/results/lora-gemma3-270m

It makes a random PEFT LoRA (rank 16 on q/k/v/o and the MLP, every layer: what a site's report-style adapter looks
like), builds three bundles (the base; the adapter merged; the base with LoRA slots and the adapter kept apart), checks
that the run-time form answers the merged form's greedy tokens, then times, interleaved round by round:
- `base`: the plain base bundle;
- `slots-empty`: the slotted bundle with no adapter active (what the LoRA branches cost when unused);
- `merged`: the merged bundle;
- `run-time`: the slotted bundle with the adapter active;
- `mixed-2`: the slotted bundle decoding 4 sequences, two with the adapter and two without (ONNX Runtime activates one
  adapter per call, so the step is two calls), against `same-4`: 4 sequences with the adapter (one call per step).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from medc.benchmarks import schema
from medc.benchmarks.schema import Metric, Row

PROMPT = "The findings of the chest radiograph are"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _adapter(gguf: Path, folder: Path, rank: int) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model

    from medc.compile import loader

    torch.manual_seed(0)
    model = loader.load(str(gguf)).hf_model
    pm = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS,
                                          init_lora_weights=False))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    pm.save_pretrained(folder)
    return folder


def _decode(pipe, adapters: list, tokens: int) -> float:
    """Seconds per decoded token (prefill excluded): one sequence per entry of `adapters` (None: the base)."""
    from medc.runtime.batch import SamplingParams, Sequence
    from medc.runtime.gemma import encode_prompt

    ids = encode_prompt(pipe.assets, PROMPT)
    batch = pipe.batch(len(adapters))
    seqs = [Sequence(list(ids), None, SamplingParams(max_new_tokens=tokens, ignore_eos=True, adapter=a))
            for a in adapters]
    for s in seqs:
        batch.admit(s)
    while any(s.prefilling for s in seqs):
        batch.step()
    t0, n0 = time.perf_counter(), batch.tokens
    while batch.active:
        batch.step()
    batch.decoder.close()
    return (time.perf_counter() - t0) / max(1, (batch.tokens - n0) / len(adapters))


def main(argv=None) -> None:
    from medc.benchmarks.host import bundle_info, run_info
    from medc.compile.build import BuildOptions, build
    from medc.manifest import Manifest
    from medc.runtime import load

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("gguf", nargs="?", type=Path, default=Path.home() / ".cache/medc/gemma3-270m-q4_k_m.gguf")
    ap.add_argument("--precision", default="int8")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(dir=Path.home() / ".cache" / "medc") as tmp:
        tmp = Path(tmp)
        adapter = _adapter(args.gguf, tmp / "site-lora", args.rank)
        paths = {"base": tmp / "base", "merged": tmp / "merged", "slotted": tmp / "slotted"}
        for name, extra in (("base", {}), ("merged", {"adapters": (adapter,)}),
                            ("slotted", {"adapter_slots": (adapter,)})):
            print(f"building {name} ...", flush=True)
            build(BuildOptions(model=str(args.gguf), out=paths[name], precision=args.precision, **extra))
        pipes = {k: load(v, threads=2).__enter__() for k, v in paths.items()}
        greedy = {k: pipes[k].generate_ids([PROMPT], max_new_tokens=24, ignore_eos=True, adapter=a)[0]
                  for k, a in (("merged", None), ("slotted", "site-lora"), ("base", None))}
        agree = next((i for i, (x, y) in enumerate(zip(greedy["merged"], greedy["slotted"])) if x != y), 24)
        lora = Manifest.read(paths["slotted"]).generation["lora"]["adapters"]["site-lora"]["fidelity"]["worst"]
        merged_gate = Manifest.read(paths["merged"]).build.get("generation_gate", {})
        kinds = {"base": (pipes["base"], [None]), "slots-empty": (pipes["slotted"], [None]),
                 "merged": (pipes["merged"], [None]), "run-time": (pipes["slotted"], ["site-lora"]),
                 "same-4": (pipes["slotted"], ["site-lora"] * 4),
                 "mixed-2": (pipes["slotted"], ["site-lora", None, "site-lora", None])}
        for pipe, adapters in kinds.values():  # warm-up: sessions open, adapters loaded
            _decode(pipe, adapters, 4)
        samples = {k: [] for k in kinds}
        for r in range(args.rounds):
            order = list(kinds)[r % len(kinds):] + list(kinds)[:r % len(kinds)]
            for k in order:
                pipe, adapters = kinds[k]
                samples[k].append(len(adapters) / _decode(pipe, adapters, args.tokens))
        sizes = {k: sum(p.stat().st_size for p in v.rglob("*") if p.is_file()) for k, v in paths.items()}
        adapter_file = next((paths["slotted"] / "adapters").glob("*.onnx_adapter")).stat().st_size
        run = run_info(None, bundles=[bundle_info(p) for p in paths.values()],
                       command=shlex.join(["python", "benchmarks/lora.py", *(argv or sys.argv[1:])]))
        for p in pipes.values():
            p.close()
    rows = [Row("generation", "gemma3-270m", "onnxruntime", {"form": k, "sequences": len(kinds[k][1]),
                                                            "precision": args.precision, "rank": args.rank},
                [Metric.of("decode_tok_s", "tok/s", s)]) for k, s in samples.items()]
    med = {k: float(np.median(s)) for k, s in samples.items()}
    run.notes = [
        f"{args.rounds} rounds, the order rotating each round; {args.tokens} tokens decoded per sequence after the "
        f"prompt; 2 threads; 1-minute load average before / after: {load_before[0]:.2f} / {os.getloadavg()[0]:.2f}",
        f"greedy tokens (24): run-time and merged agree on the first {agree} "
        f"({'the same' if agree == 24 else 'then differ'}; at {args.precision} each rounds differently: the merged "
        f"form quantises W + BA, the run-time form W with BA in fp32 beside it; at fp32 they are identical, "
        f"tests/test_adapters.py); the adapter changes the base's answer: {greedy['base'] != greedy['merged']}",
        f"gates against HF + peft (the adapter unmerged): merged bundle perplexity "
        f"{merged_gate.get('perplexity_increase', float('nan')):+.3%} (passed {merged_gate.get('passed')}); "
        f"run-time adapter, decoder logits worst cosine {lora['cosine']:.5f}",
        f"decode tok/s (median): base {med['base']:.1f}, slots empty {med['slots-empty']:.1f}, merged "
        f"{med['merged']:.1f}, run-time {med['run-time']:.1f}; run-time / merged {med['run-time'] / med['merged']:.2f}, "
        f"slots empty / base {med['slots-empty'] / med['base']:.2f}",
        f"4 sequences: one adapter {med['same-4']:.1f} tok/s, two adapters (two calls per step) {med['mixed-2']:.1f} "
        f"tok/s ({med['mixed-2'] / med['same-4']:.2f}x)",
        f"sizes: adapter file {adapter_file / 2**20:.2f} MiB (rank {args.rank}, {len(TARGETS)} projections x 18 "
        f"layers); base bundle {sizes['base'] / 2**20:.0f} MiB, merged {sizes['merged'] / 2**20:.0f} MiB, slotted "
        f"{sizes['slotted'] / 2**20:.0f} MiB: an adapter is {adapter_file / sizes['base']:.1%} of the bundle",
    ]
    result = schema.Result(run, rows, f"LoRA adapters on Gemma 3 270M ({args.precision}): merged vs at run time")
    print("\n".join(run.notes))
    if args.out:
        j, m = schema.save(result, args.out)
        print(f"wrote {j} and {m}")


if __name__ == "__main__":
    main()
