"""Perplexity of a generative bundle on a text file, the way llama-perplexity computes it.

The text is tokenized once and cut into non-overlapping windows of [BOS] + (window - 1) tokens; each window is run
as one prefill with logits at every position, and the negative log-likelihood of each next token is averaged over all
windows. The same windows feed the PyTorch reference (`--reference`), so the two numbers are comparable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from medc.errors import MedcError

# Real English text for the build's perplexity gate (not written for this project): the GPL-3 licence that Debian
# ships, else CPython's own licence file, which every Python install has.
DEFAULT_TEXTS = (Path("/usr/share/common-licenses/GPL-3"),)


def default_text() -> Path:
    import sysconfig

    for p in (*DEFAULT_TEXTS, Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"):
        if p.is_file():
            return p
    raise MedcError("no reference text found for the perplexity gate; pass one with --perplexity FILE.")


def windows(tokenizer, bos_id: int, text: str, window: int = 512, max_windows: int | None = None) -> np.ndarray:
    """int64 [N, window]: [BOS] + window-1 tokens each, non-overlapping, the tail that does not fill one dropped."""
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    n = len(ids) // (window - 1)
    if max_windows:
        n = min(n, max_windows)
    if n == 0:
        raise MedcError(f"the text has {len(ids)} tokens: too short for one window of {window}; use a longer text "
                        "or a smaller --window.")
    body = np.asarray(ids[: n * (window - 1)], np.int64).reshape(n, window - 1)
    return np.concatenate([np.full((n, 1), bos_id, np.int64), body], axis=1)


def nll_sum(logits: np.ndarray, targets: np.ndarray) -> float:
    """Summed negative log-likelihood of `targets` [S] under `logits` [S, V] (float64 log-softmax)."""
    x = logits.astype(np.float64)
    m = x.max(-1, keepdims=True)
    logz = (m[:, 0] + np.log(np.exp(x - m).sum(-1)))
    return float((logz - x[np.arange(len(targets)), targets]).sum())


def perplexity(logits_fn: Callable[[np.ndarray], np.ndarray], token_windows: np.ndarray) -> dict:
    """`logits_fn(ids [S]) -> logits [S, V]` over every window; returns perplexity and counts."""
    total, count = 0.0, 0
    for row in token_windows:
        logits = logits_fn(row)
        total += nll_sum(logits[:-1], row[1:])
        count += len(row) - 1
    return {"perplexity": float(np.exp(total / count)), "tokens": count, "windows": int(len(token_windows)),
            "window": int(token_windows.shape[1])}


def bundle_logits_fn(pipeline) -> Callable[[np.ndarray], np.ndarray]:
    """All-position logits of one window through a GemmaPipeline's graphs (one prefill, empty cache)."""

    def fn(ids: np.ndarray) -> np.ndarray:
        s = len(ids)
        ids2 = ids[None, :]
        feeds = {"inputs_embeds": pipeline._embed(ids2), "attention_mask": np.ones((1, s), np.int64),
                 "position_ids": np.arange(s, dtype=np.int64)[None], "token_type_ids": np.zeros((1, s), np.int64),
                 "logits_positions": np.arange(s, dtype=np.int64)}
        logits, _ = pipeline._step(pipeline._sessions["decoder"].open(), feeds, pipeline._empty_past(1))
        return logits[0]

    return fn
