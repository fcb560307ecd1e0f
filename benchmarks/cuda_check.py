"""ONNX Runtime CUDA check: the tiny bundles built for the `cuda` target (ORT flavour) and for a TensorRT target
(portable graphs, run here on the CUDA provider, as ONNX Runtime runs them where TensorRT is absent), on this GPU.

    python benchmarks/cuda_check.py --out benchmarks/results/cuda-check-h200      # needs onnxruntime-gpu and a GPU

For each model and precision it records: the build (on a GPU the fp16 gate runs on the CUDA provider, not the CPU
emulation), `medc verify` on the CUDA provider, where ONNX Runtime placed each component's nodes (from its profiler:
nodes per provider, and the op types left on the CPU), for MedGemma the greedy tokens on the GPU against Hugging Face
generate (fp32 reference on the CPU: the text, image and left-padded batch prompts of tests/test_gemma.py), and the
median time of a component call or a 32-token generation on CPU and CUDA. Tiny models time launch overheads, not the
GPU: those numbers say what a call costs, not what MedGemma 4B will do. Each case is caught on its own, so one failure
still leaves the others' results. Writes cuda-check.json and cuda-check.md to --out; exits 1 if anything failed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.test_gemma: the same HF reference as the tests
CPU, CUDA = ["CPUExecutionProvider"], ["CUDAExecutionProvider", "CPUExecutionProvider"]
PROMPTS = ["Is there a pneumothorax?", "List three causes of pleural effusion in an adult patient."]
CASES = [("medsiglip-tiny", "cuda", p) for p in ("fp32", "fp16", "int8")] + \
        [("medgemma-tiny", "cuda", p) for p in ("fp32", "fp16", "int8", "int4")] + \
        [("medsiglip-tiny", "h200", "fp16"), ("medgemma-tiny", "h200", "fp16"), ("medgemma-tiny", "h200", "int8")]


def placement(path: Path, feeds: dict) -> dict:
    """Nodes per execution provider in one run, from ONNX Runtime's profiler (its events name each node's provider)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.enable_profiling = True
    so.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "p")
    so.log_severity_level = 3
    from medc.runtime.session import provider_options

    sess = ort.InferenceSession(str(path), so, providers=CUDA, provider_options=provider_options(CUDA) or None)
    sess.run(None, feeds)
    events = json.loads(Path(sess.end_profiling()).read_text())
    nodes = {}
    for e in events:
        args = e.get("args", {})
        if e.get("cat") == "Node" and "provider" in args:
            nodes[e["name"].removesuffix("_kernel_time")] = (args["provider"], args.get("op_name", "?"))
    by = Counter(p for p, _ in nodes.values())
    on_cpu = Counter(op for p, op in nodes.values() if p == "CPUExecutionProvider")
    return {"providers": dict(by), "cpu_ops": dict(on_cpu), "active": sess.get_providers()}


def median_ms(fn, repeat: int = 20) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * float(np.median(times))


def greedy_vs_hf(bundle: Path, gemma) -> dict:
    import medc.runtime
    from medc.compile.models.siglip import builtin_images
    from tests.test_gemma import _hf_generate

    out = {}
    with medc.runtime.load(bundle, providers=CUDA) as m:
        for case, prompts, images in [("text", PROMPTS[:1], None), ("image", PROMPTS[:1], [builtin_images()[:1]]),
                                      ("batch", PROMPTS, None)]:
            ours = m.generate_ids(prompts, images=images, max_new_tokens=24)
            _, ref = _hf_generate(gemma.hf_model, m.assets, prompts, images, 24)
            same = sum(a == b for o, r in zip(ours, ref) for a, b in zip(o, r))
            out[case] = {"equal": ours == ref, "tokens_agreeing": same, "tokens": sum(len(r) for r in ref)}
    return out


def generation_ms(bundle: Path, providers: list[str]) -> float:
    import medc.runtime

    with medc.runtime.load(bundle, providers=providers) as m:
        return median_ms(lambda: m.generate_ids(PROMPTS[:1], max_new_tokens=32, ignore_eos=True), repeat=5)


def check(model: str, target: str, precision: str, root: Path, gemma) -> dict:
    from medc.compile.build import BuildOptions, build
    from medc.manifest import Manifest
    from medc.runtime.verify import golden_cases, verify_bundle

    row: dict = {"model": model, "target": target, "precision": precision}
    out = root / f"{model}-{target}-{precision}"
    t = time.perf_counter()
    build(BuildOptions(model=model, target=target, precision=precision, out=out))
    row["build_s"] = round(time.perf_counter() - t, 1)
    m = Manifest.read(out)
    row["gated_on"] = {n: c.quantization.get("gated_on", "") for n, c in m.components.items()}
    row["attention"] = (m.generation or {}).get("attention")
    report = verify_bundle(out, providers=CUDA)
    row["verify"] = {n: {"passed": r["passed"], **r["worst"]} for n, r in report.items()}
    golden = dict(np.load(out / m.golden))
    row["placement"], row["ms"] = {}, {}
    for name, comp in m.components.items():
        feeds = next(iter(golden_cases(golden, name).values()))["in"]
        row["placement"][name] = placement(out / comp.file, feeds)
        if model == "medsiglip-tiny":
            from medc.runtime.session import OrtSession

            with OrtSession(out / comp.file, CPU) as a, OrtSession(out / comp.file, CUDA) as b:
                row["ms"][name] = {"cpu": median_ms(lambda: a.run(feeds)), "cuda": median_ms(lambda: b.run(feeds))}
    if model == "medgemma-tiny":
        row["greedy_vs_hf"] = greedy_vs_hf(out, gemma)
        row["ms"]["generate_32"] = {"cpu": generation_ms(out, CPU), "cuda": generation_ms(out, CUDA)}
    row["passed"] = all(v["passed"] for v in row["verify"].values()) and (
        precision != "fp32" or all(g["equal"] for g in row.get("greedy_vs_hf", {}).values()))
    return row


def environment() -> dict:
    import onnxruntime as ort

    import medc

    env = {"onnxruntime": ort.__version__, "providers": ort.get_available_providers(), "medc": medc.__version__}
    try:
        import torch

        env.update(torch=torch.__version__, gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    except ImportError:
        pass
    return env


def markdown(env: dict, rows: list[dict]) -> str:
    lines = [f"# ONNX Runtime CUDA check on {env.get('gpu')}", "",
             f"onnxruntime {env['onnxruntime']}, torch {env.get('torch')}, medc {env['medc']}. Tiny random models: "
             "the times are call overheads, not model speed.", "",
             "| model | target | precision | attention | verify on CUDA (min cosine) | nodes CUDA / CPU | ops on CPU | "
             "greedy = HF (text, image, batch) | ms CPU | ms CUDA |", "|---" * 10 + "|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['target']} | {r['precision']} | FAILED: {r['error'][:160]} |||||||")
            continue
        cos = min((v["cosine"] for v in r["verify"].values() if v["cosine"] is not None), default=float("nan"))
        ok = "PASS" if all(v["passed"] for v in r["verify"].values()) else "FAIL"
        nodes = [sum(p["providers"].get(k, 0) for p in r["placement"].values())
                 for k in ("CUDAExecutionProvider", "CPUExecutionProvider")]
        ops = Counter()
        for p in r["placement"].values():
            ops.update(p["cpu_ops"])
        greedy = ", ".join(f"{g['tokens_agreeing']}/{g['tokens']}" for g in r.get("greedy_vs_hf", {}).values()) or "-"
        ms = r["ms"].get("generate_32") or next(iter(r["ms"].values()), {"cpu": float("nan"), "cuda": float("nan")})
        lines.append(f"| {r['model']} | {r['target']} | {r['precision']} | {r.get('attention') or '-'} | {ok} "
                     f"({cos:.6f}) | {nodes[0]} / {nodes[1]} | {', '.join(f'{k}×{v}' for k, v in ops.most_common(6))} "
                     f"| {greedy} | {ms['cpu']:.2f} | {ms['cuda']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--only", default="", help="comma-separated model-target-precision keys, e.g. medgemma-tiny-cuda-fp16")
    ap.add_argument("--cpu-dry-run", action="store_true", help="run the whole check on the CPU provider (no GPU)")
    args = ap.parse_args()
    if args.cpu_dry_run:
        CUDA[:] = CPU
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    env = environment()
    print(json.dumps(env), flush=True)
    if "CUDAExecutionProvider" not in env["providers"] and not args.cpu_dry_run:
        print("no CUDAExecutionProvider: install onnxruntime-gpu on a machine with an NVIDIA GPU", file=sys.stderr)
        return 2
    from medc.compile import loader

    gemma = loader.load("medgemma-tiny")
    rows = []
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for model, target, precision in CASES:
            if args.only and f"{model}-{target}-{precision}" not in args.only.split(","):
                continue
            t = time.perf_counter()
            try:
                row = check(model, target, precision, Path(tmp), gemma)
            except Exception as e:  # noqa: BLE001 - one case's failure must not hide the others' results
                row = {"model": model, "target": target, "precision": precision, "passed": False,
                       "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
            row["seconds"] = round(time.perf_counter() - t, 1)
            rows.append(row)
            print(json.dumps(row, default=str)[:1500], flush=True)
            (args.out / "cuda-check.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=1,
                                                                  default=str))
    md = markdown(env, rows)
    (args.out / "cuda-check.md").write_text(md)
    print(md)
    return 0 if all(r["passed"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
