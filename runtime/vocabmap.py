"""A reduced-vocabulary bundle's id map (built with `medc build --vocab`; see medc.compile.vocab).

Its decoder's logits cover the kept token ids only, in ascending order: logit column i is token `ids[i]`. Greedy and
sampling choose a column; the runtime maps it back to the real token id here, before the id is emitted, compared
with the stop tokens or embedded for the next step (the embedding table is whole). numpy only: no torch, no compile.
`gate_figures` measures such a bundle against the full-vocabulary reference (the build's whole-model gate).
"""

from __future__ import annotations

import json

import numpy as np

from medc.errors import MedcError

VOCAB_FILE = "vocab.json"
VOCAB_FORMAT = "medc-vocab/1"


class VocabMap:
    """Column index <-> token id of a reduced lm_head."""

    def __init__(self, ids, vocab_size: int):
        self.ids = np.asarray(ids, np.int64)
        self.vocab_size = int(vocab_size)

    @classmethod
    def from_bundle(cls, bundle) -> VocabMap | None:
        """The bundle's map, or None for a full-vocabulary bundle."""
        gen = bundle.manifest.generation or {}
        record = gen.get("vocab") or {}
        if not record.get("reduced"):
            return None
        try:
            ids = json.loads(bundle.file(record["file"]).read_text())["ids"]
        except (OSError, ValueError, KeyError, TypeError):
            raise MedcError(f"the bundle's vocabulary list {record.get('file')} is missing or unreadable; rebuild the "
                            "bundle with --vocab.") from None
        ids = np.asarray(ids, np.int64)
        size = int(gen.get("vocab_size", 0))
        if (len(ids) != record.get("size") or len(ids) == 0 or np.any(np.diff(ids) <= 0) or ids[0] < 0
                or ids[-1] >= size):
            raise MedcError(f"the bundle's vocabulary list {record['file']} does not match its manifest (size "
                            f"{record.get('size')}, vocabulary {size}); rebuild the bundle with --vocab.")
        return cls(ids, size)

    def token(self, index: int) -> int:
        return int(self.ids[index])

    def tokens(self, indices: np.ndarray) -> np.ndarray:
        """Column indices -> token ids."""
        return self.ids[np.asarray(indices)]

    def index(self, token_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Token ids -> (column indices, whether each id is in the list); an id outside has index 0."""
        token_ids = np.asarray(token_ids, np.int64)
        pos = np.minimum(np.searchsorted(self.ids, token_ids), len(self.ids) - 1)
        found = self.ids[pos] == token_ids
        return np.where(found, pos, 0), found

    def full_logits(self, logits: np.ndarray) -> np.ndarray:
        """[..., K] logits over the list -> [..., V] over the whole vocabulary, -inf outside the list (the reduced
        model gives those tokens no probability)."""
        out = np.full((*logits.shape[:-1], self.vocab_size), -np.inf, logits.dtype)
        out[..., self.ids] = logits
        return out


# -- the whole-model gate's figures ---------------------------------------------------------------------------------
PERPLEXITY_DEFINITION = (
    "in-list perplexity: exp of the mean negative log-likelihood of the held-out text's next tokens that are in the "
    "list, under the reduced bundle's softmax over the list. Gated against the full-vocabulary fp32 model "
    "renormalised over the same list on the same positions (reference_perplexity), so the gate sees the build's "
    "error and not the reduction's own effect, which is reported as reduction_effect (the renormalised reference vs "
    "the full softmax's perplexity on those positions). Next tokens outside the list are counted as the "
    "out-of-list rate (reported, not gated): the reduced bundle cannot produce them.")


def _nll(logprobs, pos) -> float:
    return -float(np.asarray(logprobs, np.float64)[pos].sum())


def gate_figures(pipeline, vmap: VocabMap, reference: dict) -> dict:
    """The reduced bundle against the full-vocabulary reference on the gate's held-out windows: in-list perplexity
    (PERPLEXITY_DEFINITION), out-of-list rate, top-1 agreement (the reduced argmax, mapped back, equal to the full
    reference's top token, which may be outside the list). `reference["list_logprobs"]`: the reference renormalised
    over the list (compile/vocab.py `list_logprobs`)."""
    from medc.runtime import evaluate

    logits_fn = evaluate.bundle_logits_fn(pipeline, full=False)
    full_lp, list_lp = reference["perplexity"]["target_logprobs"], reference["list_logprobs"]
    nll = ref_nll = full_nll = 0.0
    inside = total = 0
    agree = []
    for w, row in enumerate(reference["windows"]):
        logits = logits_fn(np.asarray(row))
        logz = evaluate.logsumexp(logits)[:-1]
        index, ok = vmap.index(np.asarray(row[1:]))
        pos = np.flatnonzero(ok)
        nll += float((logz[pos] - logits[pos, index[pos]]).sum())
        ref_nll, full_nll = ref_nll + _nll(list_lp[w], pos), full_nll + _nll(full_lp[w], pos)
        inside, total = inside + len(pos), total + len(ok)
        agree.append(vmap.tokens(logits.argmax(-1)) == np.asarray(reference["perplexity"]["top"][w]["ids"])[:, 0])
    if not inside:
        raise MedcError("no token of the gate's held-out text is in the vocabulary list; the list cannot serve "
                        "English text (was it made from an empty or non-text corpus?).")
    ppl, ref_ppl, full_ppl = (float(np.exp(x / inside)) for x in (nll, ref_nll, full_nll))
    return {"size": len(vmap.ids), "definition": PERPLEXITY_DEFINITION, "perplexity": ppl,
            "reference_perplexity": ref_ppl, "perplexity_increase": ppl / ref_ppl - 1,
            "reference_perplexity_full_softmax": full_ppl, "reduction_effect": ref_ppl / full_ppl - 1,
            "reference_perplexity_all_tokens": reference["perplexity"]["perplexity"],
            "in_list_tokens": inside, "tokens": total, "out_of_list_rate": 1 - inside / total,
            "out_of_list_gated": False, "top1_agreement": float(np.concatenate(agree).mean())}
