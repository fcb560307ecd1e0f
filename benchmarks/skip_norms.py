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
import time
from pathlib import Path

import numpy as np
from medc.benchmarks.schema import Metric, Result, Row

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
    return {"fused_ms": times["fused"], "split_ms": times["split"], "fused_over_split": ratios,
            "max_abs_diff": float(np.abs(outs["split"] - ref).max())}


def _metrics(r: dict, extra: tuple[str, ...] = ()) -> list[Metric]:
    """Per-round samples of both forms and of their ratio (its median is the headline), then single figures."""
    out = [Metric.of("fused_ms", "ms", r["fused_ms"]), Metric.of("split_ms", "ms", r["split_ms"]),
           Metric.of("fused_over_split", "x", r["fused_over_split"])]
    out += [Metric.of(k, "ms", [r[k]]) for k in extra]
    return out + [Metric.of("max_abs_diff", "abs", [r["max_abs_diff"]])]


def ops(rounds: int, threads_list: list[int]) -> list[Row]:
    rows = []
    rng = np.random.default_rng(0)
    for what, shape in SHAPES:
        feeds = {"x": rng.standard_normal(shape).astype(np.float32), "skip": rng.standard_normal(shape).astype(np.float32)}
        for simplified in (False, True):
            for threads in threads_list:
                sessions = {"fused": _session(_graph(True, simplified, shape[-1]), threads),
                            "split": _session(_graph(False, simplified, shape[-1]), threads)}
                norm = "RMS (simplified)" if simplified else "LayerNorm"
                row = Row("skip_norm_op", what, "onnxruntime", {"shape": str(list(shape)), "norm": norm,
                                                                "threads": threads},
                          _metrics(_ab(sessions, feeds, rounds)))
                print(f"{what:32s} {norm:16s} t{threads}: fused {row.metric('fused_ms').p50:.3f} ms, split "
                      f"{row.metric('split_ms').p50:.3f} ms -> {row.metric('fused_over_split').p50:.2f}x", flush=True)
                rows.append(row)
    return rows


def bundle_graphs(bundle: Path, rounds: int, threads: int) -> list[Row]:
    """Each encoder of a CPU bundle (split norms) against the same graph re-fused with onnxscript's fusions, on
    random inputs of the graph's fixed shapes at batch 1 (token ids below 200: valid for any vocabulary here)."""
    import onnx_ir as ir
    from onnxscript.rewriter.ort_fusions._core import (
        fuse_skip_layer_normalization,
        fuse_skip_rms_normalization,
    )

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
            r = _ab(sessions, feeds, rounds, min_s=1.0)
            del sessions
            for form, path in (("fused", str(fused)), ("split", str(bundle / comp["file"]))):
                k = _kernel_ms(path, feeds, threads)
                r[f"{form}_norm_kernels_ms"] = round(sum(v for op, v in k.items() if op in _NORM_KERNELS), 2)
                r[f"{form}_all_kernels_ms"] = round(sum(k.values()), 1)
            row = Row("skip_norm_graph", bundle.name, "onnxruntime",
                      {"component": name, "precision": comp["precision"], "norms": refused, "threads": threads},
                      _metrics(r, ("fused_norm_kernels_ms", "split_norm_kernels_ms", "fused_all_kernels_ms",
                                   "split_all_kernels_ms")))
            print(f"{name} ({comp['precision']}, {refused} norms) t{threads}: fused {row.metric('fused_ms').p50:.1f} "
                  f"ms, split {row.metric('split_ms').p50:.1f} ms -> {row.metric('fused_over_split').p50:.3f}x; norm + "
                  f"Add kernels {r['fused_norm_kernels_ms']} -> {r['split_norm_kernels_ms']} ms of "
                  f"{r['fused_all_kernels_ms']} / {r['split_all_kernels_ms']}", flush=True)
            rows.append(row)
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


NOTES = [
    ("fused_over_split: the median of per-round fused/split times (> 1: the unfused Add + norm is faster); the forms "
     "are interleaved round by round, alternating which goes first"),
    ("skip_norm_graph rows: an encoder as built for the CPU target (norms split) against the same graph re-fused with "
     "onnxscript's skip-norm fusions, batch 1; *_kernels_ms are ONNX Runtime's profiler kernel times per run (the "
     "norms and Adds, and all kernels)"),
    "max_abs_diff: the largest difference between the two forms' outputs",
]


def result(rows: list[Row], rounds: int, bundles: list[Path], command: str | None) -> Result:
    from medc.benchmarks.host import bundle_info, run_info

    run = run_info("see rows", ["CPUExecutionProvider"], [bundle_info(b) for b in bundles], command)
    run.notes = [f"{rounds} interleaved rounds per point", *NOTES]
    return Result(run, rows, "ONNX Runtime CPU: fused skip norms vs Add + norm")


def main() -> None:
    import sys

    from medc.benchmarks import schema

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", default="1,2", help="Intra-op threads to run the single ops with.")
    ap.add_argument("--bundle", type=Path, action="append", default=[],
                    help="Also time this CPU bundle's encoders, as built vs re-fused (repeatable).")
    ap.add_argument("--graph-threads", default="1,2", help="Intra-op threads to run the whole graphs with.")
    ap.add_argument("--out", type=Path, help="results path without suffix (.json and .md written)")
    args = ap.parse_args()
    rows = ops(args.rounds, [int(t) for t in args.threads.split(",")])
    rows += [r for b in args.bundle for t in args.graph_threads.split(",") for r in bundle_graphs(b, args.rounds, int(t))]
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        schema.save(result(rows, args.rounds, args.bundle, " ".join(["python benchmarks/skip_norms.py", *sys.argv[1:]])),
                    args.out)


if __name__ == "__main__":
    main()
