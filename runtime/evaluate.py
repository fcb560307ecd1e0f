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
from medc.runtime.decoder import Chunk

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


def logsumexp(logits: np.ndarray, rows: int = 64) -> np.ndarray:
    """float64 [S]: log sum exp over the vocabulary of float32 `logits` [S, V]. exp in float32, summed pairwise in
    float64, a slice of rows at a time: a 512 x 262k window is 0.5 GB in float32, and float64 copies of it made the
    perplexity gate take longer than the model that produced the logits."""
    out = np.empty(len(logits), np.float64)
    for r in range(0, len(logits), rows):
        x = logits[r:r + rows]
        m = x.max(-1, keepdims=True)
        out[r:r + rows] = m[:, 0].astype(np.float64) + np.log(np.exp(x - m).sum(-1, dtype=np.float64))
    return out


def perplexity(logits_fn: Callable[[np.ndarray], np.ndarray], token_windows: np.ndarray, keep_top: int = 0,
               reference_top: list | None = None) -> dict:
    """`logits_fn(ids [S]) -> logits [S, V]` over every window; returns perplexity and counts.

    `keep_top=K` also returns each position's K most likely tokens and their log-probabilities ("top"), which is
    what a reference keeps. Given such a `reference_top`, the result adds the KL divergence KL(reference || this)
    over the reference's top K plus one bucket for the rest of the vocabulary (a lower bound of the full KL that
    misses only the tail's internal shape; it needs kilobytes instead of gigabytes of stored 262k-way
    distributions), and top-1 agreement (argmax equal to the reference's)."""
    total, count, tops, kls, agree, targets = 0.0, 0, [], [], [], []
    for w, row in enumerate(token_windows):
        logits = logits_fn(row)
        logz = logsumexp(logits)  # log-probabilities are logits - logz: only the ones needed are formed
        target = logits[np.arange(len(row) - 1), row[1:]] - logz[:-1]
        total -= float(target.sum())
        count += len(row) - 1
        if keep_top:
            targets.append(target.astype(np.float32))  # per position: a reduced vocabulary's gate reads them
            ids = np.argpartition(-logits, keep_top, axis=-1)[:, :keep_top]  # top K unordered: O(V), not a sort
            ids = np.take_along_axis(ids, np.argsort(-np.take_along_axis(logits, ids, -1), axis=-1), -1)
            tops.append({"ids": ids, "logprobs": np.take_along_axis(logits, ids, -1) - logz[:, None]})
        if reference_top is not None and w < len(reference_top):
            ref = reference_top[w]
            ref_ids, ref_lp = np.asarray(ref["ids"]), np.asarray(ref["logprobs"], np.float64)
            ours = np.take_along_axis(logits, ref_ids, -1) - logz[:, None]
            p_ref, p_ours = np.exp(ref_lp), np.exp(ours)
            tail_ref = np.clip(1 - p_ref.sum(-1), 1e-12, 1)
            tail_ours = np.clip(1 - p_ours.sum(-1), 1e-12, 1)
            kls.append((p_ref * (ref_lp - ours)).sum(-1) + tail_ref * np.log(tail_ref / tail_ours))
            agree.append(logits.argmax(-1) == ref_ids[:, 0])
    out = {"perplexity": float(np.exp(total / count)), "tokens": count, "windows": int(len(token_windows)),
           "window": int(token_windows.shape[1])}
    if keep_top:
        out["top"], out["target_logprobs"] = tops, targets
    if kls:
        kl = np.concatenate(kls)
        out.update({"kl_mean": float(kl.mean()), "kl_p99": float(np.percentile(kl, 99)),
                    "top1_agreement": float(np.concatenate(agree).mean()), "kl_positions": int(kl.size)})
    return out


def bundle_logits_fn(pipeline, full: bool = True) -> Callable[[np.ndarray], np.ndarray]:
    """All-position logits of one window through a GemmaPipeline's graphs (one prefill from an empty cache). A
    reduced-vocabulary bundle's logits cover its list only; `full` spreads them over the whole vocabulary, -inf
    outside the list (so a token outside it has zero probability)."""
    decoder = pipeline.decoder(1)
    vocab = getattr(pipeline, "vocab", None) if full else None

    def fn(ids: np.ndarray) -> np.ndarray:
        decoder.reset(0)
        decoder.check_room(0, len(ids))
        logits = decoder.step([Chunk(0, pipeline.embed(ids[None])[0], np.arange(len(ids)))])[0]
        return logits if vocab is None else vocab.full_logits(logits)

    return fn
