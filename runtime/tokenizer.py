"""SigLIP's text tokenizer without transformers.

SigLIP (and MedSigLIP) ship a SentencePiece model (`spiece.model`). Hugging Face's `SiglipTokenizer` lower-cases,
strips ASCII punctuation, collapses whitespace, encodes with SentencePiece, appends `</s>` and pads with `</s>` to 64
tokens. We do the same with the `sentencepiece` package, which is the library HF itself calls, so ids are equal
(tested against `SiglipTokenizer`). `tokenizers` cannot load a `.model` file without transformers' converter, which
is why this one component uses sentencepiece directly.
"""

from __future__ import annotations

import re
import string
from pathlib import Path

import numpy as np

_PUNCT = str.maketrans("", "", string.punctuation)
_WORD = "\u2581"  # SentencePiece's word-start marker


class SiglipTokenizer:
    def __init__(self, spiece_model: str | Path, max_length: int = 64, do_lower_case: bool = True,
                 eos_token: str = "</s>", pad_token: str = "</s>", unk_token: str = "<unk>"):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor()
        self.sp.Load(str(spiece_model))
        self.max_length = max_length
        self.do_lower_case = do_lower_case
        self.eos_id = self.sp.piece_to_id(eos_token)
        self.pad_id = self.sp.piece_to_id(pad_token)
        self._unk = unk_token
        self._unk_len = len(self.sp.encode(unk_token, out_type=str))

    def canonicalize(self, text: str) -> str:
        if self.do_lower_case:
            text = text.lower()
        text = text.translate(_PUNCT)
        return re.sub(r"\s+", " ", text).strip()

    def encode(self, text: str) -> list[int]:
        # As HF: prefix the SentencePiece word marker, canonicalise, then encode "<unk>" + text and drop the unk
        # pieces (so SentencePiece adds no dummy prefix of its own). HF maps pieces to ids one by one; asking
        # SentencePiece for ids gives the same ids (an unknown piece is the unk id either way): 26.7 -> 10.2 us per
        # text here. (Its list form is slower for a server's small batches: ~40 us per call to set up its threads.)
        text = self.canonicalize(_WORD + text.replace(_WORD, " "))
        ids = self.sp.encode(self._unk + text, out_type=int)
        ids = ids[self._unk_len:] if len(ids) >= self._unk_len else ids
        return ids[: self.max_length - 1] + [self.eos_id]

    def __call__(self, texts: list[str], lengths: bool = False):
        """Texts -> int64 [N, max_length], padded with the pad id (SigLIP was trained with max-length padding);
        with `lengths`, also each text's token count [N] (eos included; the pad id may equal eos, so the padded
        rows cannot tell it afterwards)."""
        out = np.full((len(texts), self.max_length), self.pad_id, dtype=np.int64)
        counts = np.empty(len(texts), dtype=np.int64)
        for i, t in enumerate(texts):
            ids = self.encode(t)
            out[i, : len(ids)] = ids
            counts[i] = len(ids)
        return (out, counts) if lengths else out
