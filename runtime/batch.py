"""The sampling loop: sequences that share one decoder (runtime/decoder.py), advanced a decoder step at a time.
`GemmaPipeline.stream` runs it to the end for a list of prompts; the server's scheduler (runtime/scheduler.py) runs
it forever, admitting requests between steps (continuous batching). One loop, so a prompt decodes the same way in
both.

A step, as llama.cpp's unified batch and vLLM's chunked prefill do it: every decoding sequence adds its last token,
and, when the decoder can carry them (`Decoder.packs`), text prompts add their next chunk in the same call, up to
`Decoder.prefill_chunk` prompt tokens in all, first come first served (a long prompt takes several steps and does
not stall the others). Prompts with images (their image rows attend both ways), and prompts for decoders that cannot
carry them, prefill in calls of their own, a chunk per step; an image is never split across chunks, and where the
decoder cannot chunk images (`Decoder.chunks_images`) such a prompt goes in whole. A sequence's tokens do not depend
on who shares its steps: rows of a step do not mix, and each sequence samples with its own random generator.
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from medc.errors import MedcError
from medc.runtime.decoder import Chunk, Decoder, chunk_end

log = logging.getLogger("medc.serve")


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False  # run exactly max_new_tokens (benchmarks and fidelity gates)
    adapter: str | None = None  # a run-time LoRA adapter of the bundle (`medc build --adapter-slot`); None: the base

    def validate(self) -> None:
        if self.max_new_tokens <= 0:
            raise MedcError(f"max_new_tokens must be >= 1 (got {self.max_new_tokens}).")
        if self.temperature < 0:
            raise MedcError(f"temperature must be >= 0 (got {self.temperature}); 0 means greedy.")
        if self.top_k < 0:
            raise MedcError(f"top_k must be >= 0 (got {self.top_k}); 0 turns it off.")
        if not 0 < self.top_p <= 1:
            raise MedcError(f"top_p must be in (0, 1] (got {self.top_p}).")


def choose(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> np.ndarray:
    """Next token per row of [B, V] logits: greedy, or temperature / top-k / top-p sampling."""
    if params.temperature == 0:
        return logits.argmax(-1)
    x = logits.astype(np.float64) / params.temperature
    if params.top_k:
        kth = np.sort(x, axis=-1)[:, -min(params.top_k, x.shape[-1])][:, None]
        x = np.where(x < kth, -np.inf, x)
    p = np.exp(x - x.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    if params.top_p < 1:
        order = np.argsort(-p, axis=-1)
        sorted_p = np.take_along_axis(p, order, -1)
        keep = np.cumsum(sorted_p, -1) - sorted_p < params.top_p  # always keeps the top token
        mask = np.zeros_like(p, bool)
        np.put_along_axis(mask, order, keep, -1)
        p = np.where(mask, p, 0)
        p /= p.sum(-1, keepdims=True)
    return np.array([rng.choice(len(row), p=row) for row in p])


def _ignore(kind: str, value) -> None:
    pass


@dataclass(eq=False)
class Sequence:
    """One generation. `emit(kind, value)` is called from the thread that runs the loop: ("token", id) per new
    token, then exactly one of ("done", "stop" | "length" | "cancelled") or ("error", message)."""

    ids: list[int]  # the prompt
    pixel_values: np.ndarray | None  # its images, preprocessed [N, 3, H, W]
    params: SamplingParams
    emit: Callable[[str, object], None] = _ignore
    cancelled: str | None = None  # why it should stop early: "cancelled" (client gone) or "stop" (a stop string)
    generated: int = 0
    last: int = -1  # the newest token, not yet in the cache
    slot: int | None = None
    prompted: int = 0  # prompt tokens in the cache
    rng: np.random.Generator | None = None
    finished: str | None = None
    submitted: float = field(default_factory=time.monotonic)
    image_features: np.ndarray | None = None  # its images' soft tokens [tokens, H], encoded at its first chunk

    def cancel(self, reason: str = "cancelled") -> None:
        """From any thread: the sequence leaves at the next step (or is dropped from the queue)."""
        self.cancelled = self.cancelled or reason

    @property
    def prefilling(self) -> bool:
        return self.prompted < len(self.ids)


class Batch:
    """Sequences in the slots of one decoder. `admit` them (while `room`), then `step` until none is `active`."""

    def __init__(self, decoder: Decoder, embed: Callable[[np.ndarray], np.ndarray],
                 encode_images: Callable[[np.ndarray], np.ndarray], image_token: int | None, eos: set[int],
                 vocab=None, adapters: dict | None = None):
        self.decoder, self.embed, self.encode_images = decoder, embed, encode_images
        self.image_token, self.eos = image_token, eos
        self.vocab = vocab  # a reduced-vocabulary bundle's VocabMap: logit columns -> token ids (None: the same)
        self.adapters: dict[str, object] = dict(adapters or {})  # run-time adapter name -> its file
        self.free = list(range(decoder.slots))
        self.active: list[Sequence] = []
        self.steps = self.tokens = 0
        self.mixed = 0  # steps that carried a prompt's chunk beside decoding sequences
        self.finished: collections.Counter[str] = collections.Counter()  # by reason: stop, length, cancelled, error

    @property
    def room(self) -> int:
        return len(self.free)

    def admit(self, seq: Sequence) -> None:
        """Give `seq` a free slot; its prompt goes in with the next steps."""
        slot = self.free.pop(0)
        try:
            self.decoder.reset(slot)
            self.decoder.check_room(slot, len(seq.ids))
        except Exception:
            self.free = sorted(self.free + [slot])
            raise
        seq.slot, seq.prompted, seq.rng = slot, 0, np.random.default_rng(seq.params.seed)
        self.active.append(seq)

    def finish(self, seq: Sequence, kind: str, value: str) -> None:
        """End `seq` (its slot freed) and tell its listener: ("done", reason) or ("error", message)."""
        seq.finished = value
        if seq.slot is not None:
            self.decoder.reset(seq.slot)
            self.free = sorted(self.free + [seq.slot])
            seq.slot = None
        self.finished["error" if kind == "error" else value] += 1
        _safe_emit(seq, kind, value)

    def step(self, on_error: Callable[[list[Sequence], Exception], None] | None = None) -> None:
        """Prompts that prefill in calls of their own advance a chunk each; then one call adds a token to every
        decoding sequence and carries the next prompt chunks. A failed call raises, or with `on_error` reports
        the sequences it held and goes on."""
        for seq in self.active:
            if seq.cancelled and not seq.finished:
                self.finish(seq, "done", seq.cancelled)
        alone = [s for s in self.active if not s.finished and s.prefilling
                 and (s.pixel_values is not None or not self.decoder.packs)]
        for seq in alone:
            self._guarded([seq], self._prefill_alone, on_error, seq)
        # ONNX Runtime activates one adapter set per call: sequences of different adapters step in calls of their
        # own (benchmarks/results/lora-gemma3-270m.md measures what that costs).
        for adapter in dict.fromkeys(s.params.adapter for s in self.active if not s.finished):
            mine = [s for s in self.active if s.params.adapter == adapter and not s.finished]
            decoding = [s for s in mine if not s.prefilling]
            carried = self._carried([s for s in mine if s.prefilling and s not in alone])
            if decoding or carried:
                self._guarded(decoding + [s for s, _ in carried], self._joint, on_error, decoding, carried)
        self.active = [s for s in self.active if not s.finished]

    def _guarded(self, seqs: list[Sequence], fn, on_error, *args) -> None:
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 - reported per sequence, or raised to the caller
            if on_error is None:
                raise
            on_error([s for s in seqs if not s.finished], e)

    def _carried(self, prompts: list[Sequence]) -> list[tuple[Sequence, int]]:
        """Which prompts' next chunks ride in this step, and how many tokens each: up to the decoder's prefill
        chunk in all, first come first served, none wider than the decoder's `carry_width` (with every slot near
        the end of its context a prompt waits a step: the decoding sequences end before they reach it)."""
        budget, out = self.decoder.prefill_chunk, []
        width = self.decoder.carry_width()
        for seq in prompts:
            n = min(len(seq.ids) - seq.prompted, budget, budget if width is None else width)
            if n <= 0:
                break
            out.append((seq, n))
            budget -= n
        return out

    def _prefill_alone(self, seq: Sequence) -> None:
        """The next chunk of `seq`'s prompt in a call of its own, `Decoder.prefill_chunk` tokens at most; a prompt
        with images all at once unless the decoder `chunks_images`, and then no image split (`chunk_end`). The
        images are encoded once, at the first chunk, before the decoder's first step."""
        ids, start = np.asarray(seq.ids, np.int64), seq.prompted
        images = None if seq.pixel_values is None else ids == self.image_token
        size = self.decoder.prefill_chunk if images is None or self.decoder.chunks_images else None
        end = chunk_end(images, start, size, len(ids))
        embeds = self.embed(ids[None, start:end])[0]
        if images is not None:
            if seq.image_features is None:
                seq.image_features = self.encode_images(seq.pixel_values).reshape(-1, embeds.shape[-1])
            done = int(images[:start].sum())  # image tokens in earlier chunks
            here = images[start:end]
            embeds[here] = seq.image_features[done:done + int(here.sum())]
            images = here
        logits = self._step([Chunk(seq.slot, embeds, np.array([end - start - 1]), images)], seq)[0]
        seq.prompted = end
        if end == len(ids):
            seq.pixel_values = seq.image_features = None  # not needed again: free them
            self._accept(seq, logits)

    def _joint(self, decoding: list[Sequence], carried: list[tuple[Sequence, int]]) -> None:
        """One call: a token for each decoding sequence, and each carried prompt's next `n` tokens."""
        ids = [np.array([s.last], np.int64) for s in decoding]
        ids += [np.asarray(s.ids[s.prompted:s.prompted + n], np.int64) for s, n in carried]
        embeds = self.embed(np.concatenate(ids)[None])[0]  # one embedding call for the whole step
        chunks, start = [], 0
        for s, piece in zip([*decoding, *(s for s, _ in carried)], ids):
            chunks.append(Chunk(s.slot, embeds[start:start + len(piece)], np.array([len(piece) - 1])))
            start += len(piece)
        logits = self._step(chunks, (decoding or [s for s, _ in carried])[0])
        self.steps += 1
        self.mixed += bool(decoding and carried)
        for seq, out in zip(decoding, logits):
            self._accept(seq, out)
        for (seq, n), out in zip(carried, logits[len(decoding):]):
            seq.prompted += n
            if not seq.prefilling:  # its whole prompt is in the cache now
                self._accept(seq, out)

    def _step(self, chunks: list[Chunk], seq: Sequence) -> list[np.ndarray]:
        """One decoder call, with `seq`'s run-time adapter active (every sequence of the call shares it)."""
        adapter = self._adapter(seq)
        return self.decoder.step(chunks) if adapter is None else self.decoder.step(chunks, adapter)

    def _adapter(self, seq: Sequence):
        """The file of `seq`'s run-time adapter (None: the base)."""
        name = seq.params.adapter
        if name is None:
            return None
        if name not in self.adapters:
            raise MedcError(f"this bundle has no adapter {name!r}; it has {', '.join(self.adapters) or 'none'} "
                            "(`medc adapter add BUNDLE DIR` adds one).")
        return self.adapters[name]

    def _accept(self, seq: Sequence, logits: np.ndarray) -> None:
        """Choose the next token from [1, V] logits; emit it or finish."""
        tok = int(choose(logits, seq.params, seq.rng)[0])
        if self.vocab is not None:
            tok = self.vocab.token(tok)
        seq.generated += 1
        self.tokens += 1
        if tok in self.eos and not seq.params.ignore_eos:
            self.finish(seq, "done", "stop")
            return
        seq.last = tok
        _safe_emit(seq, "token", tok)
        if seq.generated >= seq.params.max_new_tokens:
            self.finish(seq, "done", "length")


def _safe_emit(seq: Sequence, kind: str, value) -> None:
    try:
        seq.emit(kind, value)
    except Exception as e:  # noqa: BLE001 - a broken listener must not stop the decoder
        log.warning("a generation listener failed (%s)", type(e).__name__)
        seq.cancel()
