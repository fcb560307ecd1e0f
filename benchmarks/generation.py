"""Timing generation for `medc bench` on MedGemma / Gemma 3 bundles, and for its baselines.

A fixed prompt of exactly N tokens (chat template and BOS included), then greedy decoding of exactly M tokens
(`ignore_eos`). Timing wraps the pipeline's own `GemmaPipeline.stream`, which yields once per decode step, so nothing
of generation is re-implemented here:

    t0 ── stream() ── first token (TTFT: tokenise + embed + prefill + choose) ── token 2 ── ... ── token M
                     |<-------------------------------- M-1 inter-token latencies (ITL) --------------------->|

- prefill tok/s  = batch * prompt_tokens / TTFT
- decode tok/s   = batch * (M - 1) / (t_M - t_1); TPOT = the M - 1 inter-token latencies (trtllm-bench's ITL)
- "past" cases: the same with an L-token prompt and a few new tokens, i.e. decode speed with L tokens in the KV cache
- vision_ms: one run of the `vision_encoder` session on one image, multimodal bundles only

`hf_generate_timed` times the HF PyTorch model with the same loop shape (prefill, then one token per forward, with
`past_key_values` and `logits_to_keep=1`): the `--baseline torch` of a generative bundle.
"""

from __future__ import annotations

import time

import numpy as np

from medc.errors import MedcError

# Plain English, clinical register; repeated as needed and cut to length (see `fixed_prompt`).
PROMPT_TEXT = (
    "A 67 year old man presents to the emergency department with two days of worsening shortness of breath, a "
    "productive cough and fever. He has a history of chronic obstructive pulmonary disease, hypertension and type 2 "
    "diabetes. On examination he is tachypnoeic with reduced air entry and crackles at the right base. The chest "
    "radiograph shows consolidation of the right lower lobe with a small pleural effusion and no pneumothorax. The "
    "heart size is normal and the mediastinum is central. Blood tests show a raised white cell count and C reactive "
    "protein. Summarise the findings, give the most likely diagnosis, list the differential diagnoses and describe "
    "the next steps in management, including antibiotics, oxygen targets and when to repeat the imaging."
)


def timed_samples(timed: tuple[float, list[float], list[int]], batch: int, prompt_tokens: int) -> dict[str, list[float]]:
    """The samples of one timed generation, `timed` = (t0, stamps, tokens): t0 when the prompt went in, stamps[i]
    when token i + 1 was available. TPOT samples are the inter-token latencies (ITL, as trtllm-bench defines it)."""
    t0, stamps, _ = timed
    if len(stamps) < 2:
        raise MedcError("a generation benchmark needs at least 2 new tokens (one for TTFT, one to time decode).")
    ttft = stamps[0] - t0
    itl = np.diff(np.asarray(stamps)) * 1e3
    decode_s = stamps[-1] - stamps[0]
    return {"ttft_ms": [ttft * 1e3], "tpot_ms": [float(v) for v in itl], "prefill_tok_s": [batch * prompt_tokens / ttft],
            "decode_tok_s": [batch * len(itl) / decode_s], "e2e_ms": [(stamps[-1] - t0) * 1e3]}


# -- the prompt ---------------------------------------------------------------------------------------------------------
def fixed_prompt(assets, n_tokens: int) -> str:
    """A text prompt that `encode_prompt` turns into exactly `n_tokens` ids (chat template / BOS included)."""
    from medc.runtime.gemma import encode_prompt

    def count(text: str) -> int:
        return len(encode_prompt(assets, text))

    words = PROMPT_TEXT.split()
    while count(" ".join(words)) < n_tokens:
        words += PROMPT_TEXT.split()
    if count("") > n_tokens:
        raise MedcError(f"a {n_tokens}-token prompt is shorter than this model's prompt template ({count('')} tokens).")
    lo, hi = 0, len(words)  # the most words that fit: count(words[:lo]) <= n_tokens < count(words[:hi])
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if count(" ".join(words[:mid])) <= n_tokens else (lo, mid)
    text = " ".join(words[:lo])
    have = count(text)
    while have < n_tokens:  # top up one token at a time
        for filler in (" a", " the", " and", "."):
            if count(text + filler) == have + 1:
                text, have = text + filler, have + 1
                break
        else:
            raise MedcError(f"cannot build a prompt of exactly {n_tokens} tokens with this tokenizer.")
    return text


# -- one timed run of each backend --------------------------------------------------------------------------------------
def medc_generate_timed(pipe, prompt: str, new_tokens: int, batch: int = 1,
                        images=None) -> tuple[float, list[float], list[int]]:
    """(t0, per-token timestamps, tokens of the first prompt) of one greedy `GemmaPipeline.stream` call; `images`:
    one image list for every prompt of the batch."""
    from medc.runtime.gemma import SamplingParams

    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    stamps, tokens = [], []
    t0 = time.perf_counter()
    for step in pipe.stream([prompt] * batch, images=[images] * batch if images else None, params=params):
        stamps.append(time.perf_counter())
        tokens.append(step[0])
    return t0, stamps, tokens


def hf_generate_timed(model, ids: list[int], new_tokens: int) -> tuple[float, list[float], list[int]]:
    """The same measurement on an HF PyTorch model: one prefill forward, then one forward per token with the KV cache
    (`past_key_values`) and `logits_to_keep=1`, so neither side computes logits it does not use; greedy."""
    import inspect

    import torch

    # transformers 5.x renamed `past_key_values` to `cache` (the old name warns, then goes in 5.40)
    kv = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    x = torch.tensor([ids], dtype=torch.long)
    stamps, tokens = [], []
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model(input_ids=x, use_cache=True, logits_to_keep=1)
        for i in range(new_tokens):
            tok = out.logits[:, -1].argmax(-1)
            stamps.append(time.perf_counter())
            tokens.append(int(tok[0]))
            if i + 1 < new_tokens:
                out = model(input_ids=tok[:, None], use_cache=True, logits_to_keep=1, **{kv: getattr(out, kv)})
    return t0, stamps, tokens


def golden_image(pipe) -> np.ndarray | None:
    """One preprocessed image, [1, 3, H, W], from the bundle's golden data; None for a text-only bundle."""
    if "vision_encoder" not in pipe.bundle.manifest.components:
        return None
    from medc.runtime.verify import golden_cases

    with np.load(pipe.bundle.path / pipe.bundle.manifest.golden) as golden:
        cases = golden_cases({k: golden[k] for k in golden.files if k.startswith("vision_encoder/")}, "vision_encoder")
    return next(iter(cases.values()))["in"]["pixel_values"][:1]


def vision_ms(pipe, pixels: np.ndarray | None) -> float | None:
    """One run of the vision encoder on one image, ms (None without an image)."""
    if pixels is None:
        return None
    t = time.perf_counter()
    pipe.encode_images(pixels)
    return (time.perf_counter() - t) * 1e3
