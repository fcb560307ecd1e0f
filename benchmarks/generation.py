"""Generation benchmark for MedGemma / Gemma 3 bundles (`medc bench` on a generative bundle).

One `GenResult` row per timed run: a fixed prompt of exactly N tokens (chat template and BOS included), then greedy
decoding of exactly M tokens (`ignore_eos`). Timing wraps the pipeline's own `GemmaPipeline.stream`, which yields once
per decode step, so nothing of generation is re-implemented here:

    t0 ── stream() ── first token (TTFT: tokenise + embed + prefill + choose) ── token 2 ── ... ── token M
                     |<-------------------------------- M-1 inter-token latencies (ITL) --------------------->|

- prefill tok/s  = batch * prompt_tokens / TTFT
- decode tok/s   = batch * (M - 1) / (t_M - t_1); TPOT mean/p50/p90/p99 over the M - 1 inter-token latencies
- "past" rows: the same measurement with a prompt of L tokens and a few new tokens, i.e. decode speed with L tokens
  already in the KV cache (the check: tokens/s at past 2048 >= 80% of tokens/s at past 128)
- vision_ms: one run of the `vision_encoder` session on one image (the bundle's golden image), multimodal bundles only
- peak_rss_mib: this process's peak resident memory after the run (it includes everything loaded before)

`hf_generate_timed` times the HF PyTorch model with the same loop shape (prefill, then one token per forward, with
`past_key_values` and `logits_to_keep=1`), the baseline for `--baseline torch` and benchmarks/gemma3_270m.py.
Speed is never asserted anywhere: this machine's speed drifts, so the runs of different backends are interleaved.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from medc.errors import MedcError
from medc.system import cpu_info, git_commit, peak_rss_mib

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


@dataclass
class GenResult:
    model: str
    bundle: str  # bundle directory name, or the baseline's file
    backend: str  # "onnxruntime" | "torch-eager" | "llama.cpp"
    precision: str  # the decoder's precision (fp32 | int8 | int4 | ...), "q4_k_m" for llama.cpp
    method: str  # the decoder's quantisation method
    kind: str  # "run": the main prompt; "past": decode speed with prompt_tokens already in the KV cache
    run: int
    batch: int
    prompt_tokens: int
    new_tokens: int
    ttft_ms: float
    prefill_tok_s: float
    decode_tok_s: float
    tpot_mean_ms: float
    tpot_p50_ms: float
    tpot_p90_ms: float
    tpot_p99_ms: float
    total_ms: float
    vision_ms: float | None
    peak_rss_mib: float
    threads: int
    providers: str
    ort_version: str
    cpu: str
    commit: str | None
    itl_ms: list[float] = field(default_factory=list, repr=False)
    tokens: list[int] = field(default_factory=list, repr=False)  # generated ids of the first prompt

    @classmethod
    def from_timed(cls, timed: tuple[float, list[float], list[int]], batch: int, prompt_tokens: int,
                   **kw) -> GenResult:
        """`timed` = (t0, stamps, tokens): t0 when the prompt went in, stamps[i] when token i + 1 was available."""
        t0, stamps, tokens = timed
        if len(stamps) < 2:
            raise MedcError("a generation benchmark needs at least 2 new tokens (one for TTFT, one to time decode).")
        ttft = stamps[0] - t0
        itl = np.diff(np.asarray(stamps)) * 1e3
        decode_s = stamps[-1] - stamps[0]
        return cls(batch=batch, prompt_tokens=prompt_tokens, new_tokens=len(stamps), ttft_ms=ttft * 1e3,
                   prefill_tok_s=batch * prompt_tokens / ttft, decode_tok_s=batch * len(itl) / decode_s,
                   tpot_mean_ms=float(itl.mean()), tpot_p50_ms=float(np.percentile(itl, 50)),
                   tpot_p90_ms=float(np.percentile(itl, 90)), tpot_p99_ms=float(np.percentile(itl, 99)),
                   total_ms=(stamps[-1] - t0) * 1e3, peak_rss_mib=peak_rss_mib(),
                   itl_ms=[round(float(v), 3) for v in itl], tokens=list(tokens), **kw)


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
def medc_generate_timed(pipe, prompt: str, new_tokens: int, batch: int = 1) -> tuple[float, list[float], list[int]]:
    """(t0, per-token timestamps, tokens of the first prompt) of one greedy `GemmaPipeline.stream` call."""
    from medc.runtime.gemma import SamplingParams

    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    stamps, tokens = [], []
    t0 = time.perf_counter()
    for step in pipe.stream([prompt] * batch, params=params):
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


def medc_info(pipe, threads: int | None) -> dict:
    """The GenResult fields that describe a bundle."""
    import os

    import onnxruntime as ort

    m = pipe.bundle.manifest
    dec = m.components["decoder"]
    method = dec.quantization.get("method", "none")
    head = dec.quantization.get("lm_head", "")
    if head and not head.startswith(dec.precision):  # a recipe's lm_head of its own, e.g. int4 rescored
        rescore = dec.quantization.get("lm_head_rescore") or {}
        method += f"; lm_head {head.split()[0]}" + (f", top {rescore['top_k']} rescored" if rescore else "")
    return {"model": m.model["name"], "bundle": pipe.bundle.path.name, "backend": "onnxruntime",
            "precision": dec.precision, "method": method,
            "threads": threads or os.cpu_count() or 1,
            "providers": ",".join(pipe.active_providers("decoder")), "ort_version": ort.__version__,
            "cpu": cpu_info(), "commit": git_commit()}


# -- `medc bench` on a generative bundle --------------------------------------------------------------------------------
def bench_generation(bundle_dir: Path, prompt_tokens: int = 512, new_tokens: int = 128, repeat: int = 3,
                     warmup: int = 1, threads: int | None = None, batch: int = 1, past: tuple[int, ...] = (128, 2048),
                     past_new_tokens: int = 32, baseline: str | None = None,
                     log=None) -> tuple[list[GenResult], list[str]]:
    """(rows, notes). Each repeat runs the main prompt, then each past length, then (with a baseline) HF PyTorch on the
    same token ids: interleaved, so this machine's speed drift hits all of them alike."""
    import medc.runtime
    from medc.runtime.gemma import encode_prompt

    log = log or (lambda msg: None)
    notes: list[str] = []
    if new_tokens < 2 or past_new_tokens < 2:
        raise MedcError("--new-tokens must be >= 2 (the first token is TTFT; decode needs at least one more).")
    pipe = medc.runtime.load(bundle_dir, threads=threads)
    with pipe:
        limit = pipe.assets.max_positions
        if prompt_tokens + new_tokens > limit:
            prompt_tokens = limit - new_tokens
            if prompt_tokens < 1:
                raise MedcError(f"--new-tokens {new_tokens} leaves no room for a prompt in this build's "
                                f"{limit}-token context.")
            notes.append(f"prompt shortened to {prompt_tokens} tokens: this build's context is {limit} tokens")
        fits = [p for p in past if p + past_new_tokens <= limit]
        if len(fits) < len(past):
            notes.append(f"past length(s) {', '.join(str(p) for p in past if p not in fits)} skipped: this build's "
                         f"context is {limit} tokens")
        prompts = {("run", prompt_tokens, new_tokens): fixed_prompt(pipe.assets, prompt_tokens)}
        prompts |= {("past", p, past_new_tokens): fixed_prompt(pipe.assets, p) for p in fits}
        info = medc_info(pipe, threads)
        pixels = golden_image(pipe)
        ref = None
        if baseline == "torch":
            if batch != 1:
                raise MedcError("--baseline torch times batch 1 only.")
            import torch
            from medc.benchmarks.bench import torch_baseline

            if threads:
                torch.set_num_threads(threads)
            ref = torch_baseline(pipe.bundle.manifest).hf_model
            ref_info = dict(info, bundle=pipe.bundle.manifest.model["source"].get("name", info["model"]),
                            backend="torch-eager", precision="fp32", method="none", threads=torch.get_num_threads(),
                            providers="torch-cpu")
        for _ in range(warmup):  # first runs grow ORT's memory arena; keep them out of the numbers
            for (_, n, _), text in prompts.items():
                medc_generate_timed(pipe, text, 2, batch)
                if ref is not None:
                    hf_generate_timed(ref, encode_prompt(pipe.assets, text), 2)
            vision_ms(pipe, pixels)
        rows: list[GenResult] = []
        for r in range(repeat):
            for (kind, n, m), text in prompts.items():
                log(f"run {r + 1}/{repeat}: {kind} {n} prompt tokens + {m} new")
                row = GenResult.from_timed(medc_generate_timed(pipe, text, m, batch), batch=batch, prompt_tokens=n,
                                           kind=kind, run=r, vision_ms=None, **info)
                if kind == "run":
                    row.vision_ms = vision_ms(pipe, pixels)
                rows.append(row)
                if ref is not None:
                    timed = hf_generate_timed(ref, encode_prompt(pipe.assets, text), m)
                    rows.append(GenResult.from_timed(timed, batch=1, prompt_tokens=n, kind=kind, run=r,
                                                     vision_ms=None, **ref_info))
    return rows, notes


# -- reports ------------------------------------------------------------------------------------------------------------
_COLUMNS = ("bundle", "backend", "precision", "kind", "run", "batch", "prompt_tokens", "new_tokens", "ttft_ms",
            "prefill_tok_s", "decode_tok_s", "tpot_mean_ms", "tpot_p50_ms", "tpot_p90_ms", "tpot_p99_ms", "vision_ms",
            "peak_rss_mib", "threads")
_SUMMARY = ("bundle", "backend", "precision", "kind", "batch", "prompt_tokens", "new_tokens", "runs", "ttft_ms",
            "prefill_tok_s", "decode_tok_s", "tpot_p50_ms", "tpot_p99_ms", "vision_ms")


def _cell(v) -> str:
    return "-" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v))


def table(rows: list[dict], columns: tuple[str, ...]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]


def summarise(results: list[GenResult]) -> list[dict]:
    """Medians over runs, one row per (bundle, backend, kind, batch, prompt length)."""
    groups: dict[tuple, list[GenResult]] = {}
    for r in results:
        groups.setdefault((r.bundle, r.backend, r.precision, r.kind, r.batch, r.prompt_tokens, r.new_tokens),
                          []).append(r)
    out = []
    for key, rs in groups.items():
        row = dict(zip(_SUMMARY[:7], key), runs=len(rs))
        for c in ("ttft_ms", "prefill_tok_s", "decode_tok_s", "tpot_p50_ms", "tpot_p99_ms", "vision_ms"):
            vals = [getattr(r, c) for r in rs if getattr(r, c) is not None]
            row[c] = statistics.median(vals) if vals else None
        out.append(row)
    return out


def past_ratios(results: list[GenResult]) -> list[dict]:
    """Per bundle and backend: decode speed at the longest past over the shortest, median of the per-run ratios.
    Speed here is 1000 / median inter-token ms, which one stall of this shared machine does not move."""
    out = []
    for key in dict.fromkeys((r.bundle, r.backend) for r in results if r.kind == "past"):
        by_run: dict[int, dict[int, float]] = {}
        for r in results:
            if (r.bundle, r.backend) == key and r.kind == "past":
                by_run.setdefault(r.run, {})[r.prompt_tokens] = r.batch * 1e3 / r.tpot_p50_ms
        lengths = sorted({n for d in by_run.values() for n in d})
        if len(lengths) < 2:
            continue
        lo, hi = lengths[0], lengths[-1]
        ratios = [d[hi] / d[lo] for d in by_run.values() if lo in d and hi in d]
        out.append({"bundle": key[0], "backend": key[1], "short": lo, "long": hi,
                    "ratio": statistics.median(ratios), "ratios": ratios})
    return out


def to_markdown(results: list[GenResult], notes: list[str] | None = None) -> str:
    if not results:
        return "(no results)"
    head = results[0]
    lines = [(f"model {head.model} | cpu {head.cpu} | onnxruntime {head.ort_version} | providers {head.providers} "
              f"| commit {head.commit or '-'}"),
             "", "Greedy, ignore_eos; tokens/s count every prompt of the batch."]
    lines += [f"\nnote: {n}" for n in notes or []]
    lines += ["", "Medians over runs:", ""] + table(summarise(results), _SUMMARY)
    for p in past_ratios(results):
        lines.append(f"\n{p['bundle']} ({p['backend']}): decode tok/s (from the median inter-token time) at past "
                     f"{p['long']} / at past {p['short']} = {p['ratio']:.2f} (median of {len(p['ratios'])} runs; "
                     "target >= 0.80)")
    lines += ["", "Per run:", ""] + table([asdict(r) for r in results], _COLUMNS)
    return "\n".join(lines)


def to_json(results: list[GenResult]) -> str:
    return json.dumps([asdict(r) for r in results], indent=2)


def from_json(text: str) -> list[GenResult]:
    names = {f.name for f in fields(GenResult)}
    return [GenResult(**{k: v for k, v in row.items() if k in names}) for row in json.loads(text)]
