"""medc's runtime: loads a bundle and runs it with numpy and ONNX Runtime (or TensorRT). Never imports torch or
transformers."""

from __future__ import annotations

from pathlib import Path

from medc.errors import MedcError
from medc.runtime.bundle import open_bundle
from medc.runtime.gemma import GemmaPipeline
from medc.runtime.siglip import SiglipPipeline

# Model family (manifest["model"]["family"]) -> its pipeline: (bundle, threads) -> a context manager.
PIPELINES = {"siglip": SiglipPipeline, "gemma3": GemmaPipeline}


def load(path: str | Path, target: str | None = None, threads: int | None = None, providers: list[str] | None = None,
         trust=None):
    """Open a bundle (hash-verified, target-checked, signatures checked against `trust`, a medc.signing.Trust, or
    MEDC_TRUSTED_KEYS) and return its pipeline; use it as a context manager."""
    bundle = open_bundle(path, target=target, providers=providers, trust=trust)
    family = bundle.manifest.model.get("family")
    if family not in PIPELINES:
        raise MedcError(f"bundle {path} holds a {family!r} model, which this medc runtime cannot run.")
    return PIPELINES[family](bundle, threads)
