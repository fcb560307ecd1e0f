"""Regenerates `tiny-gemma-tokenizer.json`, the tokenizer of the built-in `medgemma-tiny` model.

Gemma's real tokenizer has 262k pieces; the tiny model gets a 384-piece BPE with Gemma's special tokens and Gemma's
conventions (Metaspace pre-tokenizer, <bos> added for plain text) so that chat templating, image-token expansion and
stop tokens are exercised exactly as with MedGemma. Run: python compile/data/make_tiny_gemma_tokenizer.py
"""

from __future__ import annotations

import itertools
from pathlib import Path

# Ids 0..8 in this order; the tiny config's special ids (pad/eos/bos, boi/eoi/image) refer to them.
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
            "<end_of_image>", "<image_soft_token>"]


def corpus() -> list[str]:
    from medc.compile.models.siglip import PROMPTS

    turns = ["user\nDescribe this image.", "model\nThe chest x-ray shows no acute findings.",
             "user\nIs there a pneumothorax?", "model\nNo, the lungs are clear.", "What is the diagnosis?",
             "Findings:\n\n- normal heart size\n- clear lungs\n\nImpression: normal study."]
    words = [f"{a} {b}" for a, b in itertools.product(["the", "a", "no", "with", "and", "of"], PROMPTS)]
    return PROMPTS + turns + words + [str(i) for i in range(100)]


def main(out: Path = Path(__file__).with_name("tiny-gemma-tokenizer.json")) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=list("abcdefghijklmnopqrstuvwxyz0123456789.,:;?!-()'\n"))
    tok.train_from_iterator(corpus(), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B",
                                                       special_tokens=[("<bos>", 2)])
    tok.save(str(out))
    print(f"wrote {out} ({tok.get_vocab_size()} pieces)")


if __name__ == "__main__":
    main()
