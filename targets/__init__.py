"""Deployment targets: one JSON profile per device under `profiles/`, read into a typed `Target`.

The registry is the explicit dict `TARGETS`, filled from the profile files shipped as package data (so a wheel carries
them). Issue-level work on Jetson/TensorRT adds profiles here; the runtime and the builder only read `Target` fields.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources

from medc.errors import MedcError


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    kind: str  # "cpu" | "gpu"
    providers: tuple[str, ...]  # ONNX Runtime execution providers, most preferred first
    precisions: tuple[str, ...]  # precisions a build for this target may use
    # int8 on this target: "fastest" measures static Q/DQ against dynamic int8 and keeps the faster one that passes
    # the gate (CPU); "static-qdq" is the only form TensorRT consumes.
    int8_method: str = "fastest"
    # Decoder graph form: "ort" uses ONNX Runtime's fused contrib ops (MatMulNBits, fused norms and rotary);
    # "portable" keeps standard ONNX ops (blocked DequantizeLinear for int4/int8 weights) for TensorRT's parser.
    graph_flavour: str = "ort"
    memory_gib: float | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    def available_providers(self) -> list[str]:
        """This target's providers that the installed onnxruntime offers, in preference order (CPU always last)."""
        import onnxruntime as ort

        have = set(ort.get_available_providers())
        chosen = [p for p in self.providers if p in have]
        return chosen or ["CPUExecutionProvider"]


def _load_profiles() -> dict[str, Target]:
    targets = {}
    for entry in sorted(resources.files("medc.targets").joinpath("profiles").iterdir(), key=lambda p: p.name):
        if not entry.name.endswith(".json"):
            continue
        data = json.loads(entry.read_text())
        for key in ("providers", "precisions", "notes"):
            data[key] = tuple(data.get(key, ()))
        targets[data["name"]] = Target(**data)
    return targets


TARGETS: dict[str, Target] = _load_profiles()


def get_target(name: str) -> Target:
    try:
        return TARGETS[name]
    except KeyError:
        raise MedcError(f"unknown target {name!r}; known targets: {', '.join(sorted(TARGETS))}.") from None
