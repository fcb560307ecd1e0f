"""Full-size MedSigLIP-448 on this CPU: build fp32 and int8 bundles (random weights), then time them against HF
PyTorch eager fp32, interleaved in one run (this machine's speed drifts by up to 2x over minutes, so only ratios
measured side by side mean anything).

    python benchmarks/medsiglip_full.py --rounds 5 --threads 2

Writes benchmarks/results/medsiglip-448-cpu.json and .md. Takes ~20-30 minutes on 2 cores and ~14 GB of memory.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent

# Arithmetic of one 448x448 image through the SigLIP-so400m-shaped tower (1024 tokens, 27 layers, d 1152, FFN 4304):
# per layer QKV+O 4*T*d*d, MLP 2*T*d*F, attention 2*T*T*d multiply-adds; x2 for FLOPs.
T, D, F, L = 1024, 1152, 4304, 27
IMAGE_FLOP = 2 * L * (4 * T * D * D + 2 * T * D * F + 2 * T * T * D)
TEXT_FLOP = 2 * L * (4 * 64 * D * D + 2 * 64 * D * F + 2 * 64 * 64 * D)
# This machine's measured peaks (shared/README.md): sgemm ~195 GFLOP/s; int8 VNNI ~4x that.
PEAK = {"fp32": 195e9, "int8": 780e9}


def build(precision: str, out: Path) -> dict:
    if not (out / "manifest.json").exists():
        cmd = [sys.executable, "-m", "medc.cli", "-v", "build", "medsiglip-448", "--random-weights",
               "--precision", precision, "-o", str(out), "--force"]
        t = time.perf_counter()
        subprocess.run(cmd, check=True)
        print(f"built {precision} in {time.perf_counter() - t:.0f}s", flush=True)
    return json.loads((out / "manifest.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path("/tmp/medc-bench"))
    args = ap.parse_args()

    manifests = {p: build(p, args.work / f"medsiglip-448-{p}") for p in ("fp32", "int8")}

    import torch

    from medc.compile import loader
    from medc.system import cpu_info
    from medc.runtime.session import OrtSession

    torch.set_num_threads(args.threads)
    ref = loader.load("medsiglip-448", random_weights=True)
    comps = {c.name: c for c in ref.family.components(ref.hf_model.config)}
    golden = {p: np.load(args.work / f"medsiglip-448-{p}" / "golden.npz") for p in manifests}
    feeds = {"image_encoder": {"pixel_values": golden["fp32"]["image_encoder/real_image_b1/in/pixel_values"]},
             "text_encoder": {"input_ids": golden["fp32"]["text_encoder/prompt_b1/in/input_ids"]}}
    rows = []
    for name, comp in comps.items():
        module = comp.extract(ref.hf_model)
        args_t = tuple(torch.from_numpy(feeds[name][t.name]) for t in comp.inputs)
        sessions = {p: OrtSession(args.work / f"medsiglip-448-{p}" / f"{name}.onnx", threads=args.threads).open()
                    for p in manifests}
        times = {k: [] for k in ["torch-eager-fp32", *(f"medc-{p}" for p in manifests)]}
        for s in sessions.values():
            s.run(feeds[name])
        with torch.inference_mode():
            module(*args_t)
        for r in range(args.rounds):
            for p, s in sessions.items():
                t = time.perf_counter()
                s.run(feeds[name])
                times[f"medc-{p}"].append(time.perf_counter() - t)
            with torch.inference_mode():
                t = time.perf_counter()
                module(*args_t)
                times["torch-eager-fp32"].append(time.perf_counter() - t)
            print(name, r, {k: round(v[-1], 3) for k, v in times.items()}, flush=True)
        flop = IMAGE_FLOP if name == "image_encoder" else TEXT_FLOP
        for k, v in times.items():
            ratios = [b / a for a, b in zip(v, times["torch-eager-fp32"])]  # per round: same drift on both
            prec = "int8" if k.endswith("int8") else "fp32"
            m = manifests.get(prec) if k.startswith("medc") else None
            c = m["components"][name] if m else None
            rows.append({
                "component": name, "backend": k, "batch": 1, "threads": args.threads,
                "median_s": statistics.median(v), "min_s": min(v), "max_s": max(v), "samples_s": v,
                "speedup_vs_eager_median": statistics.median(ratios), "speedup_per_round": ratios,
                "floor_s": flop / PEAK[prec], "fraction_of_floor": (flop / PEAK[prec]) / min(v),
                "method": c["quantization"].get("method", "none") if c else "none",
                "worst_cosine": c["fidelity"]["worst"]["cosine"] if c else None,
                "max_abs": c["fidelity"]["worst"]["max_abs"] if c else None,
            })
    result = {"model": "medsiglip-448 (random weights)", "cpu": cpu_info(), "image_flop": IMAGE_FLOP,
              "builds": {p: m["build"] for p, m in manifests.items()},
              "toolchain": manifests["fp32"]["toolchain"], "rows": rows}
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    (out / "medsiglip-448-cpu.json").write_text(json.dumps(result, indent=2))
    md = [f"# MedSigLIP-448 on {result['cpu']}, {args.threads} threads, batch 1, {args.rounds} interleaved rounds", "",
          "| component | backend | method | median s | speed-up vs eager (median of per-round ratios) | "
          "fraction of arithmetic floor | worst cosine | max abs |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cos = "-" if r["worst_cosine"] is None else f"{r['worst_cosine']:.6f}"
        mab = "-" if r["max_abs"] is None else f"{r['max_abs']:.2e}"
        md.append(f"| {r['component']} | {r['backend']} | {r['method']} | {r['median_s']:.3f} | "
                  f"{r['speedup_vs_eager_median']:.2f}x | {r['fraction_of_floor']:.2f} | {cos} | {mab} |")
    md += ["", "Builds: " + "; ".join(f"{p}: {b['seconds']} s, peak RSS {b['peak_rss_mib']} MiB"
                                      for p, b in result["builds"].items())]
    (out / "medsiglip-448-cpu.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
