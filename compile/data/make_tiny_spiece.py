"""Regenerates `tiny-spiece.model`, the SentencePiece vocabulary of the built-in `medsiglip-tiny` model.

The real MedSigLIP tokenizer (32k pieces) cannot be shipped or downloaded here, so the tiny model gets a small
vocabulary trained the same way (unigram, T5/SigLIP special ids: 0 <pad>, 1 </s>, 2 <unk>) on the prompts below.
Run: python compile/data/make_tiny_spiece.py  (single-threaded, so the file is reproducible).
"""

from __future__ import annotations

import io
import itertools
from pathlib import Path

FINDINGS = [
    "atelectasis", "cardiomegaly", "consolidation", "edema", "pleural effusion", "pneumonia", "pneumothorax",
    "lung opacity", "lung lesion", "fracture", "support devices", "enlarged cardiomediastinum", "no finding",
    "diabetic retinopathy", "microaneurysms", "hemorrhages", "hard exudates", "cotton wool spots", "glaucoma",
    "melanoma", "basal cell carcinoma", "nevus", "seborrheic keratosis", "adenocarcinoma", "benign tissue",
    "tumor infiltrating lymphocytes", "necrosis", "stroma", "mitotic figures", "normal", "abnormal",
]
TEMPLATES = [
    "a chest x-ray showing {}", "a photo of {}", "a fundus image with {}", "a histopathology slide of {}",
    "a dermatology photo of {}", "radiograph with {}", "ct scan showing {}", "mri of the shoulder with {}",
    "an ultrasound image of {}", "there is {}", "no evidence of {}", "findings consistent with {}",
]


def corpus() -> str:
    return "\n".join(t.format(f) for t, f in itertools.product(TEMPLATES, FINDINGS))


def main(out: Path = Path(__file__).with_name("tiny-spiece.model")) -> None:
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus().splitlines()), model_writer=model, vocab_size=256, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, num_threads=1, character_coverage=1.0, hard_vocab_limit=False,
        minloglevel=2,
    )
    out.write_bytes(model.getvalue())
    print(f"wrote {out} ({out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
