"""ONNX Runtime CUDA check: the tiny bundles built for the `cuda` target (ORT flavour) and for a TensorRT target
(portable graphs, run here on the CUDA provider, as ONNX Runtime runs them where TensorRT is absent), on this GPU.

    python benchmarks/cuda_check.py --out benchmarks/results/cuda-check-h200      # needs onnxruntime-gpu and a GPU

For each model and precision it records: the build (on a GPU the fp16 gate runs on the CUDA provider, not the CPU
emulation), `medc verify` on the CUDA provider, where ONNX Runtime placed each component's nodes (from its profiler:
nodes per provider, and the op types left on the CPU), for MedGemma the greedy tokens on the GPU against Hugging Face
generate (fp32 reference on the CPU: the text, image and left-padded batch prompts of tests/test_gemma.py), and the
median time of a component call or a 32-token generation on CPU and CUDA. Tiny models time launch overheads, not the
GPU: those numbers say what a call costs, not what MedGemma 4B will do. Each case is caught on its own, so one failure
still leaves the others' results. Writes a benchmark result (benchmarks/schema.py) to --out: OUT.json and OUT.md, rows
of kind "check" (one per case: build, greedy agreement, generation, passed) and "check_component" (one per case and
component: verify, placement, call times); exits 1 if anything failed.
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
from medc.benchmarks.schema import Metric, Result, Row

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


def times_ms(fn, repeat: int = 20) -> list[float]:
    """Every call's time after one warm-up call (the rows keep the samples; tables show their median)."""
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t))
    return times


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


def generation_ms(bundle: Path, providers: list[str]) -> list[float]:
    import medc.runtime

    with medc.runtime.load(bundle, providers=providers) as m:
        return times_ms(lambda: m.generate_ids(PROMPTS[:1], max_new_tokens=32, ignore_eos=True), repeat=5)


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
                row["ms"][name] = {"cpu": times_ms(lambda: a.run(feeds)), "cuda": times_ms(lambda: b.run(feeds))}
    if model == "medgemma-tiny":
        row["greedy_vs_hf"] = greedy_vs_hf(out, gemma)
        row["ms"]["generate_32"] = {"cpu": generation_ms(out, CPU), "cuda": generation_ms(out, CUDA)}
    row["passed"] = all(v["passed"] for v in row["verify"].values()) and (
        precision != "fp32" or all(g["equal"] for g in row.get("greedy_vs_hf", {}).values()))
    return row


def environment() -> dict:
    import medc
    import onnxruntime as ort

    env = {"onnxruntime": ort.__version__, "providers": ort.get_available_providers(), "medc": medc.__version__}
    try:
        import torch

        env.update(torch=torch.__version__, gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    except ImportError:
        pass
    return env


def _ms(name: str, v) -> Metric:
    """A time: samples (this script) or one median (results of the older script, which kept no samples)."""
    return Metric.of(name, "ms", v) if isinstance(v, list) else Metric.summary(name, "ms", p50=v)


def rows_of(case: dict) -> list[Row]:
    """The schema rows of one case (a `check` result, or a failed case's error): one row of kind "check" for the case
    (build time, greedy agreement with HF, 32-token generation on CPU and CUDA, passed), then one "check_component"
    per component (verify on CUDA, node placement, call times)."""
    bundle = f"{case['model']}-{case['target']}-{case['precision']}"
    params = {"model": case["model"], "target": case["target"], "precision": case["precision"],
              "attention": case.get("attention")}
    head = Row("check", bundle, "onnxruntime", dict(params))
    for k in ("build_s", "seconds"):
        if case.get(k) is not None:
            head.metrics.append(Metric.of(k, "s", [case[k]]))
    for g, r in (case.get("greedy_vs_hf") or {}).items():
        head.metrics += [Metric.of(f"greedy_{g}_tokens_agreeing", "tokens", [r["tokens_agreeing"]]),
                         Metric.of(f"greedy_{g}_tokens", "tokens", [r["tokens"]])]
    gen = (case.get("ms") or {}).get("generate_32")
    if gen:
        head.metrics += [_ms("generate_32_cpu_ms", gen["cpu"]), _ms("generate_32_cuda_ms", gen["cuda"])]
    head.metrics.append(Metric.of("passed", "bool", [float(bool(case.get("passed")))]))
    if "error" in case:
        head.notes.append(f"{bundle} FAILED: {case['error']}")
    rows = [head]
    for name, v in (case.get("verify") or {}).items():
        row = Row("check_component", bundle, "onnxruntime", {**params, "component": name})
        if v.get("cosine") is not None:
            row.metrics.append(Metric.of("verify_cosine", "cosine", [v["cosine"]]))
        if v.get("max_abs") is not None:
            row.metrics.append(Metric.of("verify_max_abs", "abs", [v["max_abs"]]))
        row.metrics.append(Metric.of("verify_passed", "bool", [float(bool(v["passed"]))]))
        place = (case.get("placement") or {}).get(name) or {}
        for prov, short in (("CUDAExecutionProvider", "cuda"), ("CPUExecutionProvider", "cpu")):
            row.metrics.append(Metric.of(f"nodes_{short}", "nodes", [place.get("providers", {}).get(prov, 0)]))
        ms = (case.get("ms") or {}).get(name)
        if ms:
            row.metrics += [_ms("cpu_ms", ms["cpu"]), _ms("cuda_ms", ms["cuda"])]
        if place.get("cpu_ops"):
            ops = sorted(place["cpu_ops"].items(), key=lambda kv: -kv[1])
            row.notes.append(f"{bundle} {name}: ops on the CPU " + ", ".join(f"{k}×{n}" for k, n in ops))
        gated = (case.get("gated_on") or {}).get(name)
        if gated:
            row.notes.append(f"{bundle} {name}: fp16 gate ran on {gated}")
        rows.append(row)
    return rows


NOTES = ["Tiny random models: the times are call overheads, not model speed",
         ("verify_*: `medc verify` on the CUDA provider (worst case); nodes_*: where ONNX Runtime placed the "
          "component's nodes in one run (its profiler); greedy_*: greedy tokens on the GPU against Hugging Face "
          "generate (fp32 on the CPU) for the text, image and left-padded batch prompts of tests/test_gemma.py")]


def result(env: dict, cases: list[dict], run=None, command: str | None = None) -> Result:
    from medc.benchmarks.host import run_info

    run = run or run_info(None, env.get("providers"), command=command)
    run.notes = [*NOTES, *run.notes]
    return Result(run, [r for c in cases for r in rows_of(c)], f"ONNX Runtime CUDA check on {env.get('gpu')}")


def main() -> int:
    from medc.benchmarks import schema

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="results path without suffix (.json and .md written)")
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
    args.out.parent.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python benchmarks/cuda_check.py", *sys.argv[1:]])
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
                print(row["traceback"], file=sys.stderr)
            row["seconds"] = round(time.perf_counter() - t, 1)
            rows.append(row)
            print(json.dumps(row, default=str)[:1500], flush=True)
            schema.save(result(env, rows, command=command), args.out)  # after each case: a crash keeps the rest
    print(schema.to_markdown(result(env, rows, command=command)))
    return 0 if all(r["passed"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
