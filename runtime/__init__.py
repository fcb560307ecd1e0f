"""medc's runtime: loads a bundle and runs it with numpy + onnxruntime. Never imports torch or transformers."""

from __future__ import annotations

from pathlib import Path

from medc.errors import MedcError


def _siglip(bundle, threads):
    from medc.runtime.siglip import SiglipPipeline

    return SiglipPipeline(bundle, threads=threads)


def _gemma3(bundle, threads):
    from medc.runtime.gemma import GemmaPipeline

    return GemmaPipeline(bundle, threads=threads)


# Model family (manifest["model"]["family"]) -> pipeline factory.
PIPELINES = {"siglip": _siglip, "gemma3": _gemma3}


def load(path: str | Path, target: str | None = None, threads: int | None = None, providers: list[str] | None = None):
    """Open a bundle (hash-verified, target-checked) and return its pipeline; use it as a context manager."""
    from medc.runtime.bundle import open_bundle

    bundle = open_bundle(path, target=target, providers=providers)
    family = bundle.manifest.model.get("family")
    if family not in PIPELINES:
        raise MedcError(f"bundle {path} holds a {family!r} model, which this medc runtime cannot run.")
    return PIPELINES[family](bundle, threads)
