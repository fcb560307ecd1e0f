"""Why CPU builds leave the residual-add norms unfused (compile/optimize.py `split_skip_norms`): ONNX Runtime's CPU
kernels for SkipLayerNormalization / SkipSimplifiedLayerNormalization against the Add + norm they replace, at the
shapes medc's models run, and (--bundle) whole encoder graphs of a CPU bundle against the same graph re-fused.

    python benchmarks/skip_norms.py --rounds 5 --out benchmarks/results/skip-norms-cpu
    python benchmarks/skip_norms.py --bundle bundles/medsiglip-tiny --bundle bundles/medsiglip-448 --out ...

Forms are interleaved round by round (this machine's speed drifts); the ratio is the median of per-round ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

# (what runs at this shape, [batch, tokens, hidden])
SHAPES = [
    ("medsiglip-tiny text, batch 16", (16, 64, 64)),
    ("MedSigLIP-448 text", (1, 64, 1152)),
    ("MedSigLIP-448 image (448 px)", (1, 1024, 1152)),
    ("MedGemma 4B vision (896 px)", (1, 4096, 1152)),
    ("Gemma 3 270M prefill 512", (1, 512, 640)),
    ("Gemma 3 270M decode", (1, 1, 640)),
]


def _graph(fused: bool, simplified: bool, hidden: int) -> bytes:
    import onnx
    from onnx import TensorProto, helper

    gamma = onnx.numpy_helper.from_array(np.linspace(0.5, 1.5, hidden, dtype=np.float32), "gamma")
    beta = onnx.numpy_helper.from_array(np.linspace(-0.1, 0.1, hidden, dtype=np.float32), "beta")
    inits = [gamma] if simplified else [gamma, beta]
    norm_in = ["gamma"] if simplified else ["gamma", "beta"]
    if fused:
        op = "SkipSimplifiedLayerNormalization" if simplified else "SkipLayerNormalization"
        nodes = [helper.make_node(op, ["x", "skip", *norm_in], ["y", "", "", "sum"], domain="com.microsoft",
                                  epsilon=1e-6)]
    else:
        op = "SimplifiedLayerNormalization" if simplified else "LayerNormalization"
        nodes = [helper.make_node("Add", ["x", "skip"], ["sum"]),
                 helper.make_node(op, ["sum", *norm_in], ["y"], axis=-1, epsilon=1e-6)]
    vi = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, ["b", "s", hidden])  # noqa: E731
    graph = helper.make_graph(nodes, "norm", [vi("x"), vi("skip")], [vi("y"), vi("sum")], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                   helper.make_opsetid("com.microsoft", 1)]).SerializeToString()


def _session(model, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def _ab(sessions: dict, feeds: dict, rounds: int, min_s: float = 0.2) -> dict:
    """Interleaved timing of sessions that compute the same thing -> per-form median ms, fused/split ratio."""
    outs = {k: s.run(None, feeds)[0] for k, s in sessions.items()}
    ref = outs["fused"]
    t0 = time.perf_counter()
    sessions["fused"].run(None, feeds)
    n = max(1, int(min_s / max(time.perf_counter() - t0, 1e-6)))
    times = {k: [] for k in sessions}
    for i in range(rounds):  # alternate which form goes first: the second of a pair runs on warmer caches
        for k, s in (list(sessions.items()) if i % 2 == 0 else list(sessions.items())[::-1]):
            t0 = time.perf_counter()
            for _ in range(n):
                s.run(None, feeds)
            times[k].append((time.perf_counter() - t0) / n * 1e3)
    ratios = [f / s for f, s in zip(times["fused"], times["split"])]
    return {"fused_ms": round(statistics.median(times["fused"]), 4), "split_ms": round(statistics.median(times["split"]), 4),
            "fused_over_split": round(statistics.median(ratios), 3), "ratio_range": [round(min(ratios), 3), round(max(ratios), 3)],
            "max_abs_diff": float(np.abs(outs["split"] - ref).max())}


def ops(rounds: int, threads_list: list[int]) -> list[dict]:
    rows = []
    rng = np.random.default_rng(0)
    for what, shape in SHAPES:
        feeds = {"x": rng.standard_normal(shape).astype(np.float32), "skip": rng.standard_normal(shape).astype(np.float32)}
        for simplified in (False, True):
            for threads in threads_list:
                sessions = {"fused": _session(_graph(True, simplified, shape[-1]), threads),
                            "split": _session(_graph(False, simplified, shape[-1]), threads)}
                r = {"shape": list(shape), "runs_at": what, "norm": "RMS (simplified)" if simplified else "LayerNorm",
                     "threads": threads, **_ab(sessions, feeds, rounds)}
                print(f"{what:32s} {r['norm']:16s} t{threads}: fused {r['fused_ms']:.3f} ms, split {r['split_ms']:.3f} ms"
                      f" -> {r['fused_over_split']:.2f}x", flush=True)
                rows.append(r)
    return rows


def bundle_graphs(bundle: Path, rounds: int, threads: int) -> list[dict]:
    """Each encoder of a CPU bundle (split norms) against the same graph re-fused with onnxscript's fusions, on
    random inputs of the graph's fixed shapes at batch 1 (token ids below 200: valid for any vocabulary here)."""
    import onnx_ir as ir
    from onnxscript.rewriter.ort_fusions._core import fuse_skip_layer_normalization, fuse_skip_rms_normalization

    manifest = json.loads((bundle / "manifest.json").read_text())
    rows, rng = [], np.random.default_rng(1)
    for name, comp in manifest["components"].items():
        shapes = [i["shape"] for i in comp["inputs"]]
        if any(isinstance(d, str) for s in shapes for d in s[1:]):
            print(f"{name}: inputs with dynamic non-batch dims, skipped (encoders only)")
            continue
        model = ir.load(str(bundle / comp["file"]))
        refused = fuse_skip_layer_normalization(model) + fuse_skip_rms_normalization(model)
        if not refused:
            print(f"{name}: no unfused residual-add norms to compare")
            continue
        fused = bundle / f".{name}.refused.onnx"
        ir.save(model, str(fused), external_data=f".{name}.refused.onnx.data")
        del model
        try:
            feeds = {}
            for i in comp["inputs"]:
                shape = [1] + list(i["shape"][1:])
                feeds[i["name"]] = (rng.integers(0, 200, shape).astype(np.int64) if "int" in i["dtype"]
                                    else rng.standard_normal(shape).astype(np.float32))
            sessions = {"fused": _session(str(fused), threads), "split": _session(str(bundle / comp["file"]), threads)}
            r = {"bundle": bundle.name, "component": name, "precision": comp["precision"], "norms": refused, "threads": threads,
                 **_ab(sessions, feeds, rounds, min_s=1.0)}
            del sessions
            for form, path in (("fused", str(fused)), ("split", str(bundle / comp["file"]))):
                k = _kernel_ms(path, feeds, threads)
                r[f"{form}_norm_kernels_ms"] = round(sum(v for op, v in k.items() if op in _NORM_KERNELS), 2)
                r[f"{form}_all_kernels_ms"] = round(sum(k.values()), 1)
            print(f"{name} ({comp['precision']}, {refused} norms) t{threads}: fused {r['fused_ms']:.1f} ms, split "
                  f"{r['split_ms']:.1f} ms -> {r['fused_over_split']:.3f}x; norm + Add kernels {r['fused_norm_kernels_ms']}"
                  f" -> {r['split_norm_kernels_ms']} ms of {r['fused_all_kernels_ms']} / {r['split_all_kernels_ms']}",
                  flush=True)
            rows.append(r)
        finally:
            fused.unlink(missing_ok=True)
            Path(str(fused) + ".data").unlink(missing_ok=True)
            (bundle / f".{name}.refused.onnx.data").unlink(missing_ok=True)
    return rows


_NORM_KERNELS = ("SkipLayerNormalization", "SkipSimplifiedLayerNormalization", "LayerNormalization",
                 "SimplifiedLayerNormalization", "Add")


def _kernel_ms(path: str, feeds: dict, threads: int, runs: int = 3) -> dict:
    """ONNX Runtime's own per-kernel times (its profiler), summed per op type, per run: the norms' share of a whole
    graph without the run-to-run drift of wall-clock timing."""
    import collections
    import os
    import tempfile

    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.log_severity_level, so.enable_profiling = threads, 3, True
    so.profile_file_prefix = os.path.join(tempfile.gettempdir(), "medc-skip-norms")
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    for _ in range(runs + 1):
        sess.run(None, feeds)
    trace = Path(sess.end_profiling())
    events = json.loads(trace.read_text())
    trace.unlink()
    total = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            total[e["args"]["op_name"]] += e["dur"]
    return {op: round(us / (runs + 1) / 1e3, 2) for op, us in total.items()}


def write(out: Path, result: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    m = result["meta"]
    lines = [f"# ONNX Runtime CPU: fused skip norms vs Add + norm ({m['cpu']}, onnxruntime {m['onnxruntime']})", "",
             f"{m['rounds']} interleaved rounds per point; ratio = median of per-round fused/split times (> 1: the "
             "unfused form is faster). Outputs agree to the max abs difference shown.", "",
             "## Single ops", "",
             "| runs at | shape | norm | threads | fused ms | Add + norm ms | fused / split | range | max abs diff |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["ops"]:
        lines.append(f"| {r['runs_at']} | {r['shape']} | {r['norm']} | {r['threads']} | {r['fused_ms']:.3f} | "
                     f"{r['split_ms']:.3f} | {r['fused_over_split']:.2f}x | {r['ratio_range'][0]:.2f}-"
                     f"{r['ratio_range'][1]:.2f} | {r['max_abs_diff']:.1e} |")
    if result.get("graphs"):
        lines += ["", "## Whole encoder graphs, batch 1: as built for the CPU target vs re-fused", "",
                  "Wall clock (interleaved), and ONNX Runtime's profiler: the kernel time of the norms and Adds, and of "
                  "all kernels, per run.", "",
                  "| bundle | component | precision | norms | threads | re-fused ms | as built (split) ms | fused / split | range "
                  "| norm + Add kernels ms, fused -> split | all kernels ms, fused -> split | max abs diff |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in result["graphs"]:
            lines.append(f"| {r['bundle']} | {r['component']} | {r['precision']} | {r['norms']} | {r['threads']} | "
                         f"{r['fused_ms']:.4g} | "
                         f"{r['split_ms']:.4g} | {r['fused_over_split']:.3f}x | {r['ratio_range'][0]:.3f}-"
                         f"{r['ratio_range'][1]:.3f} | {r['fused_norm_kernels_ms']} -> {r['split_norm_kernels_ms']} | "
                         f"{r['fused_all_kernels_ms']} -> {r['split_all_kernels_ms']} | {r['max_abs_diff']:.1e} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main() -> None:
    import onnxruntime

    from medc.system import cpu_info

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", default="1,2", help="Intra-op threads to run the single ops with.")
    ap.add_argument("--bundle", type=Path, action="append", default=[],
                    help="Also time this CPU bundle's encoders, as built vs re-fused (repeatable).")
    ap.add_argument("--graph-threads", default="1,2", help="Intra-op threads to run the whole graphs with.")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    result = {"meta": {"cpu": cpu_info(), "onnxruntime": onnxruntime.__version__,
                       "rounds": args.rounds, "bundles": [str(b) for b in args.bundle]},
              "ops": ops(args.rounds, [int(t) for t in args.threads.split(",")])}
    if args.bundle:
        result["graphs"] = [r for b in args.bundle for t in args.graph_threads.split(",")
                            for r in bundle_graphs(b, args.rounds, int(t))]
    if args.out:
        write(args.out, result)


if __name__ == "__main__":
    main()
