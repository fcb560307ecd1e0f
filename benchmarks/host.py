"""What a benchmark ran on: the `RunInfo` header, and a short probe of this host's peaks for the roofline.

The probe times three kernels through ONNX Runtime, with the threads the benchmark uses, so the peaks are what the
runtime's own kernels (MLAS) reach on this machine rather than a datasheet figure:

- fp32 GEMM GFLOP/s: MatMul [512, 1024] x [1024, 1024]
- int8 GOP/s: MatMulInteger of the same shape (uint8 x int8, the VNNI/AMX path int8 bundles take)
- memory GB/s: a GEMV [1, 640] x [131072, 640]^T fp32 (320 MiB of weights, an lm_head's shape, read once per call:
  what a decode step does)

It runs between benchmark rounds (`Probe.sample`), so it sees the same drift as the runs; the floor uses the best
(max) sample, the closest this machine came to its peak during the run. Each sample first waits a moment: thread
pools of the sessions just timed spin for a while after their run and would steal the probe's cores.
"""

from __future__ import annotations

import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from medc.benchmarks.schema import BundleInfo, Metric, RunInfo
from medc.system import git_commit

# CPU flags that decide which kernels run (AVX-512 VNNI / BF16 / AMX for int8 and bf16), as /proc/cpuinfo spells them
KERNEL_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16",
                "amx_int8", "amx_tile", "avx512_fp16", "asimd", "sve")


def cpu() -> dict:
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and name in ("", platform.machine(), platform.processor()):
                name = line.split(":", 1)[1].strip()
            elif line.startswith(("flags", "Features")):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    mem = None
    try:
        import psutil

        mem = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    return {"cpu": name, "flags": [f for f in KERNEL_FLAGS if f in flags], "cores": os.cpu_count(),
            "memory_gib": mem, "os": f"{platform.system()} {platform.release()}"}


def gpu() -> dict | None:
    """The first NVIDIA GPU, by nvidia-smi (no CUDA library needed); None without one."""
    import shutil
    import subprocess

    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0 or not out.stdout.strip():
        return None
    name, driver, mem = (s.strip() for s in out.stdout.splitlines()[0].split(","))
    return {"name": name, "driver": driver, "memory_mib": float(mem)}


def gpu_memory_used_mib() -> float | None:
    """Device memory in use on GPU 0 (all processes), by nvidia-smi; None without a GPU."""
    import shutil
    import subprocess

    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, timeout=10)
        return float(out.stdout.strip().splitlines()[0])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def toolchain() -> dict:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for pkg in ("onnxruntime", "onnxruntime-gpu", "onnxruntime-genai", "numpy", "torch", "transformers", "onnx",
                "llama_cpp_python", "openvino", "tensorrt"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    return out


def bundle_info(bundle_dir: Path) -> BundleInfo:
    """A bundle's identity and fidelity record, from its manifest."""
    import hashlib

    from medc.manifest import MANIFEST_NAME, Manifest

    m = Manifest.read(bundle_dir)
    src = m.model.get("source", {})
    weights = "random" if src.get("kind") in ("tiny", "random") else "real"
    precisions = {n: c.precision for n, c in m.components.items()}
    recipe = (m.build.get("recipe") or {}).get("precisions") or {}
    precisions |= {k: v for k, v in recipe.items() if k not in precisions}  # parts such as lm_head
    uniq = set(precisions.values())
    precision = uniq.pop() if len(uniq) == 1 else ",".join(f"{k}={v}" for k, v in precisions.items())
    fid: dict = {}
    worst = [c.fidelity.get("worst", {}).get("cosine") for c in m.components.values() if c.fidelity]
    worst = [w for w in worst if w is not None]
    if worst:
        fid["worst_cosine"] = min(worst)
    gate = m.build.get("generation_gate") or {}
    if "perplexity_increase" in gate:
        fid["perplexity_increase"] = gate["perplexity_increase"]
    agree, new = gate.get("greedy_prefix_agreement"), gate.get("greedy_new_tokens")
    if new and agree is not None:  # tokens of the greedy prefix that match HF fp32, over every gate prompt
        agree = agree if isinstance(agree, list) else [agree]
        fid["greedy_agreement"] = sum(agree) / (new * len(agree))
    if "top1_agreement" in gate:  # positions of the perplexity text where the top token matches HF fp32
        fid["top1_agreement"] = gate["top1_agreement"]
    passed = [c.fidelity.get("passed") for c in m.components.values() if c.fidelity]
    if passed:
        fid["passed"] = all(p is not False for p in passed) and gate.get("passed", True) is not False
    digest = hashlib.sha256((Path(bundle_dir) / MANIFEST_NAME).read_bytes()).hexdigest()
    return BundleInfo(Path(bundle_dir).name, m.model["name"], precision, weights, m.target, digest, fid)


def run_info(threads: int | str | None, providers: list[str] | None = None, bundles: list[BundleInfo] | None = None,
             command: str | None = None, probe: list[Metric] | None = None) -> RunInfo:
    from medc import __version__

    host = cpu() | {"threads": threads if threads is not None else os.cpu_count()}
    return RunInfo(date=datetime.now(timezone.utc).isoformat(timespec="seconds"), commit=git_commit(),
                   medc=__version__, toolchain=toolchain(), host=host, providers=providers or [], gpu=gpu(),
                   probe=probe or [], bundles=bundles or [], command=command)


# -- the probe ----------------------------------------------------------------------------------------------------------
class Probe:
    """Times the three probe kernels with `threads` intra-op threads; `sample()` adds one sample of each."""

    GEMM = (512, 1024, 1024)  # M, K, N
    GEMV = (640, 131072)  # K, N (fp32: 320 MiB, well past any last-level cache)

    def __init__(self, threads: int | None = None):
        import onnxruntime as ort

        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        so.log_severity_level = 3
        m, k, n = self.GEMM
        kv, nv = self.GEMV
        rng = np.random.default_rng(0)
        self._runs = []
        for name, unit, model, feeds, work in (
            ("fp32_gemm", "GFLOP/s", _matmul_model("MatMul", 1, (m, k), (k, n)),
             {"a": rng.standard_normal((m, k), np.float32), "b": rng.standard_normal((k, n), np.float32)},
             2 * m * k * n / 1e9),
            ("int8_gemm", "GOP/s", _matmul_model("MatMulInteger", 2, (m, k), (k, n)),
             {"a": rng.integers(0, 255, (m, k), np.uint8), "b": rng.integers(-127, 127, (k, n), np.int8)},
             2 * m * k * n / 1e9),
            ("memory", "GB/s", _matmul_model("Gemm", 1, (1, kv), (nv, kv)),
             {"a": rng.standard_normal((1, kv), np.float32), "b": rng.standard_normal((nv, kv), np.float32)},
             4 * kv * nv / 1e9),
        ):
            sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
            sess.run(None, feeds)  # warm-up (packing, page faults)
            self._runs.append((name, unit, sess, feeds, work))
        # The arithmetic of OpenVINO bf16 components (AMX / AVX512_BF16), on a larger GEMM: AMX reaches its rate only
        # on large tiles, and at 512 x 1024 x 1024 it measured ~25% under what MedSigLIP-448's image encoder achieved.
        bm = bk = bn = 2048
        bf16 = _OvBf16Gemm.make(threads, bm, bk, bn)
        if bf16 is not None:
            feeds = {"a": rng.standard_normal((bm, bk), np.float32)}
            bf16.run(None, feeds)
            self._runs.append(("bf16_gemm", "GFLOP/s", bf16, feeds, 2 * bm * bk * bn / 1e9))
        self.samples: dict[str, list[float]] = {name: [] for name, *_ in self._runs}
        self.units = {name: unit for name, unit, *_ in self._runs}

    def sample(self, repeat: int = 5) -> None:
        time.sleep(0.2)  # let the timed sessions' spinning thread pools park
        for name, _, sess, feeds, work in self._runs:
            best = float("inf")
            for _ in range(repeat):
                t = time.perf_counter()
                sess.run(None, feeds)
                best = min(best, time.perf_counter() - t)
            self.samples[name].append(work / best)

    def metrics(self) -> list[Metric]:
        return [Metric.of(name, self.units[name], s) for name, s in self.samples.items() if s]


class _OvBf16Gemm:
    """The probe's fp32 GEMM compiled by OpenVINO's CPU plugin with bf16 inference precision, run like an ONNX Runtime
    session; None where OpenVINO is not installed or the CPU has no native bf16 (there bf16 runs as fp32)."""

    def __init__(self, compiled):
        self.compiled = compiled

    @classmethod
    def make(cls, threads, m: int, k: int, n: int):
        import importlib.util

        if importlib.util.find_spec("openvino") is None:
            return None
        import openvino as ov
        from openvino import opset13 as ops

        from medc.runtime.ov_session import cpu_has_bf16

        if not cpu_has_bf16():
            return None
        # weights constant, as in a model: the plugin repacks them once into its bf16 (AMX) layout
        a = ops.parameter([m, k], ov.Type.f32, name="a")
        b = ops.constant(np.random.default_rng(0).standard_normal((k, n), np.float32))
        model = ov.Model([ops.matmul(a, b, False, False)], [a], "probe")
        config = {"INFERENCE_PRECISION_HINT": "bf16", "PERFORMANCE_HINT": "LATENCY",
                  **({"INFERENCE_NUM_THREADS": threads} if threads else {})}
        return cls(ov.Core().compile_model(model, "CPU", config))

    def run(self, _outputs, feeds):
        return self.compiled(feeds)


def _matmul_model(op: str, elem_in: int, a_shape, b_shape) -> bytes:
    """A one-node ONNX model `out = op(a, b)` (elem_in: 1 float, 2 uint8), serialised; b is int8 for MatMulInteger
    and transposed for Gemm."""
    from onnx import TensorProto, helper

    b_type = TensorProto.INT8 if op == "MatMulInteger" else TensorProto.FLOAT
    out_type = TensorProto.INT32 if op == "MatMulInteger" else TensorProto.FLOAT
    n = b_shape[0] if op == "Gemm" else b_shape[1]  # Gemm: B transposed, [N, K] as a decoder's weights are stored
    graph = helper.make_graph(
        [helper.make_node(op, ["a", "b"], ["out"], **({"transB": 1} if op == "Gemm" else {}))], "probe",
        [helper.make_tensor_value_info("a", elem_in, list(a_shape)), helper.make_tensor_value_info("b", b_type,
                                                                                                  list(b_shape))],
        [helper.make_tensor_value_info("out", out_type, [a_shape[0], n])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9).SerializeToString()
