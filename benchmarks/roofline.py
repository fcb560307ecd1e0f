"""The floor under each benchmark row: the planner's arithmetic for the workload against the hardware it ran on.

- Encoders and prefill are compute bound: floor = FLOPs / peak FLOP/s at the precision the matmuls run in.
- A decode step is memory bound: floor = bytes read per step (the decoder's stored weights, the tables it reads
  every step, the KV cache at that length; the planner's own count) / memory bandwidth.

On a CPU the peaks are this host's, probed during the run (benchmarks/host.py: ONNX Runtime's own fp32 and int8 GEMM,
OpenVINO's bf16 GEMM where the CPU has bf16, and a GEMV for bandwidth); on a GPU target, the target profile's datasheet figures. The achieved fraction is
floor / measured median: 1.0 is the hardware limit, and a row far below it is where work remains.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from medc.benchmarks.schema import Floor, Metric, Row
from medc.errors import MedcError

# The matmul arithmetic each stored precision runs in: int4 weights are unpacked to int8 blocks on CPU (MatMulNBits,
# accuracy level 4) and int8 runs as u8 x s8 GEMM; fp16 runs as fp32 on ONNX Runtime's CPU provider, and bf16 (OpenVINO
# components) as fp32 where the probe found no native bf16.
_CPU_COMPUTE = {"fp32": "fp32", "fp16": "fp32", "bf16": "bf16", "int8": "int8", "int4": "int8"}
_GPU_COMPUTE = {"fp32": "fp16", "fp16": "fp16", "bf16": "fp16", "int8": "int8", "int4": "fp16", "fp8": "fp8"}


@dataclass(frozen=True)
class Peaks:
    flops: dict  # compute precision ("fp32" | "fp16" | "int8" | ...) -> ops per second
    bytes_per_s: float | None
    source: str  # where the figures come from, shown beside the floor

    @classmethod
    def from_probe(cls, probe: list[Metric]) -> Peaks | None:
        by = {m.name: m for m in probe}
        if "fp32_gemm" not in by:
            return None
        flops = {"fp32": by["fp32_gemm"].max * 1e9}
        for kind in ("int8", "bf16"):
            if f"{kind}_gemm" in by:
                flops[kind] = by[f"{kind}_gemm"].max * 1e9
        bw = by["memory"].max * 1e9 if "memory" in by else None
        return cls(flops, bw, f"host probe (max of {by['fp32_gemm'].count})")

    @classmethod
    def from_target(cls, target) -> Peaks | None:
        if not target.peak_tflops:
            return None
        return cls({k: v * 1e12 for k, v in target.peak_tflops.items()}, (target.bandwidth_gbs or 0) * 1e9 or None,
                   f"{target.name} datasheet")

    def compute(self, precision: str, gpu: bool) -> tuple[str, float] | None:
        kind = (_GPU_COMPUTE if gpu else _CPU_COMPUTE).get(precision, "fp32")
        if kind not in self.flops:
            kind = "fp32" if "fp32" in self.flops else "fp16"
        peak = self.flops.get(kind)
        return (kind, peak) if peak else None


@dataclass(frozen=True)
class Workload:
    """What the floor of a bundle needs to know: its model config and build recipe (from the manifest)."""

    model: str
    family: str
    config: dict
    precisions: dict  # component / part -> precision
    flavour: str | None
    options: dict
    target: str
    gpu: bool

    @classmethod
    def of_bundle(cls, bundle_dir: Path, source: Path | None = None) -> Workload:
        """The bundle's workload; raises MedcError when its model config cannot be found (then rows carry no floor)."""
        from medc.compile.plan import resolve
        from medc.manifest import Manifest
        from medc.targets import get_target

        m = Manifest.read(bundle_dir)
        src = m.model.get("source", {})
        name = m.model["name"]
        if src.get("kind") == "checkpoint":
            from medc.compile.loader import locate_source

            resolved = resolve(str(locate_source(src, source)))
        else:
            resolved = resolve(name, random_weights=src.get("kind") == "random")
        recipe = m.build.get("recipe") or {}
        precisions = {n: c.precision for n, c in m.components.items()} | dict(recipe.get("precisions") or {})
        return cls(name, resolved.family.name, resolved.config, precisions, recipe.get("flavour"),
                   dict(recipe.get("options") or {}), m.target, get_target(m.target).kind == "gpu")

    # -- the arithmetic --------------------------------------------------------------------------------------------
    def encoder_flops(self, component: str) -> float:
        from medc.compile.planner import encoder_flops

        return encoder_flops(self.config, self.family, component)

    def decode_bytes(self, context: int, batch: int) -> float:
        """Bytes one decode step reads: the decoder's weights and per-step tables as stored, plus the KV cache."""
        from medc.compile.planner import plan_memory
        from medc.targets import get_target

        plan = plan_memory(self.model, self.family, self.config, self.precisions, get_target(self.target),
                           context=context, batch=batch, flavour=self.flavour, options=self.options)
        dec = next(c for c in plan.components if c.name == "decoder")
        return float(dec.weight_bytes + plan.kv_bytes)

    def prefill_flops(self, tokens: int) -> float:
        from medc.compile.planner import prefill_flops

        return prefill_flops(self.config, tokens)


def _floor(metric: Metric | None, name: str, bound: str, work: float, peak: float, source: str) -> Floor | None:
    if metric is None or not peak or not work:
        return None
    ms = work / peak * 1e3
    measured = metric.value
    return Floor(name, ms, bound, work, peak, source, ms / measured if measured else None)


def floor_for(row: Row, work: Workload, peaks: Peaks) -> Floor | None:
    """The floor of one medc row (encoder or generation); None where it does not apply."""
    p = row.params
    batch = int(p.get("batch", 1))
    if row.kind == "encoder":
        comp = p["component"]
        compute = peaks.compute(work.precisions.get(comp, "fp32"), work.gpu)
        if compute is None:
            return None
        kind, peak = compute
        return _floor(row.metric("latency_ms"), "latency_ms", "compute", batch * work.encoder_flops(comp), peak,
                      f"{peaks.source}, {kind}")
    if row.kind == "generation" and peaks.bytes_per_s:
        context = int(p.get("prompt_tokens", 0)) + int(p.get("new_tokens", 0))
        return _floor(row.metric("tpot_ms"), "tpot_ms", "memory", work.decode_bytes(context, batch), peaks.bytes_per_s,
                      f"{peaks.source}, memory")
    return None


def prefill_floor_note(row: Row, work: Workload, peaks: Peaks) -> str | None:
    """The compute floor of the prefill (TTFT less the vision encoder), as a note beside the decode floor."""
    if row.kind != "generation":
        return None
    ttft = row.metric("ttft_ms")
    compute = peaks.compute(work.precisions.get("decoder", "fp32"), work.gpu)
    if ttft is None or compute is None or not ttft.value:
        return None
    batch, tokens = int(row.params.get("batch", 1)), int(row.params.get("prompt_tokens", 0))
    ms = batch * work.prefill_flops(tokens) / compute[1] * 1e3
    where = ", ".join(f"{k} {v}" for k, v in row.params.items())
    return (f"{row.bundle} ({where}): prefill floor {ms:.3g} ms ({compute[0]} compute), {ms / ttft.value:.0%} of it "
            "reached in TTFT")


def attach(rows: list[Row], workloads: dict[str, Workload | None], host: Peaks | None,
           on_gpu: bool = False) -> list[str]:
    """Give every medc row its floor (in place): against the GPU target profile's datasheet where the bundle ran on
    its GPU, else against the host probe. Returns notes for the bundles that have none, and why."""
    from medc.targets import get_target

    notes = []
    for row in rows:
        work = workloads.get(row.bundle)
        if work is None or row.backend not in ("onnxruntime", "openvino"):
            continue
        peaks = Peaks.from_target(get_target(work.target)) if work.gpu and on_gpu else host
        if peaks is None:
            notes.append(f"{row.bundle}: no floor (no peak figures: host probe skipped, or a profile without them)")
            continue
        try:
            row.floor = floor_for(row, work, peaks)
            note = prefill_floor_note(row, work, peaks)
        except (MedcError, KeyError, StopIteration) as e:
            notes.append(f"{row.bundle}: no floor ({e})")
            continue
        if note:
            row.notes.append(note)
    return list(dict.fromkeys(notes))
