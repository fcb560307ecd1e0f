"""The PyTorch side of the whole-model gate: all-position logits of an HF causal LM (the reference a bundle's
perplexity is compared with, at build time and by `medc eval --reference`)."""

from __future__ import annotations

from typing import Callable

import numpy as np


def hf_logits_fn(model) -> Callable[[np.ndarray], np.ndarray]:
    """All-position logits of one window [S] -> [S, V] from an HF causal LM."""
    import torch

    def fn(ids: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(input_ids=torch.from_numpy(ids[None]), logits_to_keep=0).logits[0].numpy()

    return fn
