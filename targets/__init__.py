"""Deployment targets: one JSON profile per device under `profiles/`, read into a typed `Target`.

The registry is the explicit dict `TARGETS`, filled from the profile files shipped as package data (so a wheel carries
them). Each GPU profile cites its datasheet in `sources`; numbers marked "inferred" in a profile's notes are not from a
datasheet. The builder, the planner (`medc.compile.planner`), the TensorRT stage and the runtime only read these fields.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources

from medc.errors import MedcError

# Why a precision is missing on a GPU: the hardware rule, said in the error (TensorRT support matrix).
_HARDWARE_RULES = {
    "bf16": "bf16 needs compute capability 8.0 or newer (Ampere+)",
    "fp8": "fp8 needs compute capability 8.9 or newer and is not available on Jetson Orin",
}


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    kind: str  # "cpu" | "gpu"
    providers: tuple[str, ...]  # ONNX Runtime execution providers, most preferred first
    precisions: tuple[str, ...]  # precisions the hardware supports (bf16/fp8 are planned, not built, by this medc)
    # int8 on this target: "fastest" measures static Q/DQ against dynamic int8 and keeps the faster one that passes
    # the gate (CPU); "static-qdq" is the only form TensorRT consumes.
    int8_method: str = "fastest"
    # Decoder graph form: "ort" uses ONNX Runtime's fused contrib ops (MatMulNBits, fused norms and rotary);
    # "portable" keeps standard ONNX ops (blocked DequantizeLinear for int4/int8 weights) for TensorRT's parser.
    graph_flavour: str = "ort"
    platform: str = "host"  # "host" (the CPU medc runs on) | "jetson" (shared LPDDR) | "datacenter" (discrete GPU)
    engine: str | None = None  # "tensorrt": the bundle carries TensorRT engine plans (built on the device)
    memory_gib: float | None = None  # device memory; None: the host's RAM, read when planning
    usable_memory_gib: float | None = None  # after the OS (Jetson) or the CUDA context (discrete GPUs)
    bandwidth_gbs: float | None = None  # memory bandwidth, GB/s: the decode tokens/s ceiling
    compute_capability: str | None = None  # "8.7"
    peak_tflops: dict = field(default_factory=dict)  # dense tensor-core peak per precision (TOPS for int8)
    dla_cores: int = 0
    default_precision: str = "fp32"  # preset used when --precision is not given
    software: dict = field(default_factory=dict)  # expected JetPack / CUDA / TensorRT
    tensorrt: tuple[str, ...] = ()  # TensorRT major.minor versions this profile is written against
    sources: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def sm(self) -> int | None:
        """Compute capability as TensorRT Edge-LLM writes it: "8.7" -> 87."""
        if not self.compute_capability:
            return None
        major, minor = self.compute_capability.split(".")
        return int(major) * 10 + int(minor)

    def check_precision(self, precision: str) -> None:
        """Refuse a precision this target's hardware lacks, saying the rule and what it offers instead."""
        if precision in self.precisions:
            return
        why = _HARDWARE_RULES.get(precision, "")
        where = f" (compute capability {self.compute_capability})" if self.compute_capability else ""
        raise MedcError(f"target {self.name}{where} does not support {precision}"
                        + (f": {why}" if why else "") + f". It offers {', '.join(self.precisions)}.")

    def usable_bytes(self) -> int:
        """Memory a bundle may use on this target; the host's available RAM for `cpu`."""
        if self.usable_memory_gib is not None:
            return int(self.usable_memory_gib * 2**30)
        import psutil

        return int(psutil.virtual_memory().total * 0.9)

    def available_providers(self) -> list[str]:
        """This target's providers that the installed onnxruntime offers, in preference order (CPU always last)."""
        import onnxruntime as ort

        have = set(ort.get_available_providers())
        if "TensorrtExecutionProvider" in have and not tensorrt_libraries():
            have.discard("TensorrtExecutionProvider")
        chosen = [p for p in self.providers if p in have]
        return chosen or ["CPUExecutionProvider"]


def tensorrt_libraries() -> bool:
    """Whether TensorRT's libraries can be loaded. onnxruntime-gpu lists its TensorRT provider whether or not they are
    installed; without them every session first fails on libnvinfer, prints an error and falls back to CUDA
    (benchmarks/results/cuda-check-h200.md), so medc leaves the provider out."""
    import ctypes.util
    import importlib.util

    return ctypes.util.find_library("nvinfer") is not None or importlib.util.find_spec("tensorrt") is not None


_TUPLES = ("providers", "precisions", "notes", "tensorrt", "sources")


def _load_profiles() -> dict[str, Target]:
    targets = {}
    for entry in sorted(resources.files("medc.targets").joinpath("profiles").iterdir(), key=lambda p: p.name):
        if not entry.name.endswith(".json"):
            continue
        data = json.loads(entry.read_text())
        for key in _TUPLES:
            data[key] = tuple(data.get(key, ()))
        targets[data["name"]] = Target(**data)
    return targets


TARGETS: dict[str, Target] = _load_profiles()


def get_target(name: str) -> Target:
    try:
        return TARGETS[name]
    except KeyError:
        raise MedcError(f"unknown target {name!r}; known targets: {', '.join(sorted(TARGETS))} "
                        "(`medc targets` describes them).") from None
