"""Torch-side helpers for gates that re-run a bundle's source model (used by `medc eval --reference`)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from medc.errors import MedcError


def reference_model(source: dict):
    """The HF fp32 model a bundle was built from (checkpoint directory or GGUF file)."""
    from medc.compile import loader

    if source.get("kind") != "checkpoint":
        raise MedcError("--reference needs a bundle built from real weights (a checkpoint or GGUF file).")
    path = Path(source["path"])
    if not path.exists():
        raise MedcError(f"the bundle's source {path} is not on this machine; --reference needs it.")
    loaded = loader.load_gguf(path) if source.get("format") == "gguf" else loader.load_checkpoint(path, spec=None)
    return loaded.hf_model


def reference_logits_fn(source: dict) -> Callable[[np.ndarray], np.ndarray]:
    return hf_logits_fn(reference_model(source))


def hf_logits_fn(model) -> Callable[[np.ndarray], np.ndarray]:
    """All-position logits of one window [S] -> [S, V] from an HF causal LM."""
    import torch

    def fn(ids: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(input_ids=torch.from_numpy(ids[None]), logits_to_keep=0).logits[0].numpy()

    return fn
