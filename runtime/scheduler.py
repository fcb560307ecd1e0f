"""Inference for the server, off the event loop: a micro-batcher for the encoders and continuous batching for chat.

Both own their ONNX Runtime sessions in one worker thread each; callers (the HTTP layer, or anything else) hand work
over through bounded queues and are answered through futures / callbacks, so no framework is imported here.

Continuous batching, as llama-server's slots and vLLM do it: a scheduler thread owns the decoder; each loop it
prefills newly admitted requests, then runs ONE decoder call for every decoding sequence. Sequences join and leave
between steps. How the KV cache is held depends on the bundle's decoder (`GemmaPipeline.attention`):

- "gqa" (ORT flavour, `_Slots`): each request gets a slot of a `SlotCache` that ONNX Runtime updates in place; a
  step runs over slots [0, highest busy + 1), and rows of idle slots add nothing. Joining and leaving copy nothing.
  A text prompt rides in the decode step itself, as llama.cpp's unified batch and vLLM's chunked prefill do: its
  row of the step adds a chunk of its tokens while the other rows add one each, and the decoder computes only the
  step's real tokens (`GemmaPipeline.packs`). Up to `GemmaPipeline.PREFILL_CHUNK` prompt tokens go into one step,
  so a long prompt is prefilled over several steps and does not stall the others' decoding. Prompts with images
  (their image rows attend both ways, from an empty slot) and decoders built before packing prefill in steps of
  their own.
- "explicit" (`_Regrouped`): the cache is the decoder's output values, passed back in. While the batch keeps its
  members nothing is copied; when a member joins or leaves, each sequence's cache is cut out of the batch and the
  batch is rebuilt left-padded to the longest, with attention-mask zeros on padding and its own position ids per
  row. Left padding keeps every sequence's tokens contiguous at the right, which is what the sliding-window layers
  assume (they keep the last `window - 1` keys and mask by column distance).
Either way a request's greedy tokens do not depend on who shares its batch (tested).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from medc.errors import MedcError

log = logging.getLogger("medc.serve")


class QueueFull(MedcError):
    """More work is waiting than the server was told to hold; the client should retry later (HTTP 429)."""

    def __init__(self, what: str, limit: int, retry_after: int = 1):
        super().__init__(f"the {what} queue is full ({limit} waiting); retry after {retry_after} s.")
        self.retry_after = retry_after


class Closed(MedcError):
    """The server is shutting down: in-flight work finishes, new work is refused (HTTP 503)."""


# -- embeddings / zero-shot ---------------------------------------------------------------------------------------
class MicroBatcher:
    """Runs `fn(items) -> array [len(items), ...]` on batches of up to `max_batch` items gathered from concurrent
    `submit` calls. A batch is what has queued up while the previous one ran, plus, for up to `window_s`, requests
    already announced (`coming()`: their images are still decoding; `gather_window` sizes it by what it can save).
    It never waits for requests that may not come: a lone request runs at once, and a closed-loop client of 4 is not
    held up waiting for a 16th."""

    def __init__(self, fn: Callable[[list], np.ndarray], name: str, max_batch: int = 16, window_s: float = 0.003,
                 max_queue: int = 256):
        self.fn, self.name, self.max_batch, self.window_s, self.max_queue = fn, name, max_batch, window_s, max_queue
        self.limit = max_batch  # items gathered per call: `gather_limit` may lower it for an encoder that gains nothing
        self._jobs: collections.deque[tuple[list, tuple]] = collections.deque()  # max_queue bounds its length
        self._queued = 0  # items waiting
        self._cv = threading.Condition()
        self._closing = False
        self._coming = 0  # announced requests, still being prepared
        self.batches = self.items = 0
        self._thread = threading.Thread(target=self._loop, name=f"medc-batch-{name}", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        return len(self._jobs)

    def check(self) -> None:
        """Fail fast, before a request's images are decoded, when `submit` would refuse it."""
        if self._closing:
            raise Closed("the server is shutting down; retry on another instance.")
        if len(self._jobs) >= self.max_queue:
            raise QueueFull(self.name, self.max_queue)

    @contextlib.contextmanager
    def coming(self):
        """Wrap a request's preparation (image decoding) just before `submit`: a batch being gathered waits for it."""
        with self._cv:
            self._coming += 1
        try:
            yield
        finally:
            with self._cv:
                self._coming -= 1
                self._cv.notify()

    def submit(self, items: list) -> asyncio.Future:
        """Queue `items`; called on an asyncio loop, answered on it. A batch's results reach each loop in ONE
        thread-safe call: a concurrent Future wrapped per request would wake the loop once per request (7% of this
        thread's time at concurrency 16 on the tiny text encoder, all of it holding the GIL the HTTP loop needs)."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        with self._cv:
            self.check()
            self._jobs.append((items, (loop, fut)))
            self._queued += len(items)
            self._cv.notify()
        return fut

    def close(self, timeout: float | None = None) -> None:
        """Finish what is queued, then stop."""
        with self._cv:
            self._closing = True
            self._cv.notify()
        self._thread.join(timeout)

    def _take(self) -> list[tuple[list, tuple]] | None:
        with self._cv:
            while not self._jobs and not self._closing:
                self._cv.wait()
            if not self._jobs:
                return None
            deadline = time.monotonic() + self.window_s
            while (self._coming and self._queued < self.limit and not self._closing
                   and (left := deadline - time.monotonic()) > 0):
                self._cv.wait(left)
            jobs, n = [], 0
            while self._jobs and (n == 0 or n + len(self._jobs[0][0]) <= self.limit):
                items, fut = self._jobs.popleft()
                jobs.append((items, fut))
                n += len(items)
            self._queued -= n
            return jobs

    def _loop(self) -> None:
        while (jobs := self._take()) is not None:
            flat = [x for items, _ in jobs for x in items]
            try:
                # A job larger than the limit runs alone, in chunks of the limit. `fn` returns an array, or a tuple
                # of arrays (embeddings, token counts), each with one row per item.
                parts = [self.fn(flat[i:i + self.limit]) for i in range(0, len(flat), self.limit)]
                out = (tuple(np.concatenate(p) for p in zip(*parts)) if isinstance(parts[0], tuple)
                       else np.concatenate(parts))
            except Exception as e:  # noqa: BLE001 - every waiter must hear about it; the HTTP layer maps it
                _deliver([(waiter, e) for _, waiter in jobs])
                continue
            self.batches += 1
            self.items += len(flat)
            results, start = [], 0
            for items, waiter in jobs:
                end = start + len(items)
                results.append((waiter, tuple(o[start:end] for o in out) if isinstance(out, tuple) else out[start:end]))
                start = end
            _deliver(results)


def _deliver(results: list) -> None:
    """Answer each waiter, (loop, asyncio Future), with a value or an exception: one call into each loop."""
    by_loop: dict = {}
    for (loop, fut), value in results:
        by_loop.setdefault(loop, []).append((fut, value))
    for loop, pairs in by_loop.items():
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is waiting any more
            loop.call_soon_threadsafe(_settle, pairs)


def _settle(pairs: list) -> None:
    for fut, value in pairs:
        if not fut.cancelled():  # the client went away
            (fut.set_exception if isinstance(value, BaseException) else fut.set_result)(value)


def gather_limit(fn: Callable[[list], np.ndarray], sample, max_batch: int, budget_s: float = 8.0,
                 tie: float = 0.05) -> tuple[int, dict[int, float]]:
    """How many items a MicroBatcher should gather for `fn`: seconds per item measured at batch 1, 2, 4 … max_batch
    (best of two calls each, on `sample`), the lowest wins, a larger batch within `tie` of it preferred.

    Batching pays where a call's fixed cost dominates (small text encoders, GPUs); on a CPU an image encoder that is
    compute-bound already at batch 1 gets slower per image in large batches (its activations leave the caches): the
    tiny MedSigLIP's measured 1.80 ms per image at batch 2 and 2.21 at 16. Sizes whose two calls would not fit in what
    is left of `budget_s` are not tried (a full-size encoder on a small CPU), so startup stays bounded.
    Returns (limit, {batch: seconds per item})."""
    per_item: dict[int, float] = {}
    spent = 0.0
    for b in sorted({min(2**i, max_batch) for i in range(max_batch.bit_length() + 1)}):  # 1, 2, 4 … max_batch
        if per_item and 2 * b * min(per_item.values()) > budget_s - spent:
            break
        items = [sample] * b
        best = float("inf")
        for _ in range(2):
            t = time.perf_counter()
            fn(items)
            dt = time.perf_counter() - t
            spent += dt
            best = min(best, dt)
        per_item[b] = best / b
    low = min(per_item.values())
    return max(k for k, v in per_item.items() if v <= low * (1 + tie)), per_item


def gather_window(per_item: dict[int, float], limit: int, cap_s: float) -> float:
    """How long a MicroBatcher may hold a batch for requests already announced (`coming()`: images still decoding),
    from `gather_limit`'s measurements: at most what running the first of them alone would cost extra,
    per_item[1] - per_item[limit], and never more than `cap_s`.

    Why that bound: holding the batch W seconds idles the encoder for W; not holding it runs the first item alone
    (per_item[1] instead of per_item[limit]) while the others decode, and batches them next. So holding pays only
    while W < per_item[1] - per_item[limit]. Where a call's fixed cost dominates (GPUs) that is milliseconds; for an
    encoder that is compute-bound at batch 1 it is next to nothing, and holding lost more than batching saved: the
    tiny MedSigLIP's images at concurrency 4, 2-core Xeon, batched/unbatched throughput 0.70x with a fixed 3 ms
    window and 1.07x without (1.57 ms per image alone, 1.32 at batch 4)."""
    if limit <= 1 or 1 not in per_item:
        return 0.0
    return max(0.0, min(cap_s, per_item[1] - per_item[limit]))


# -- chat: continuous batching ------------------------------------------------------------------------------------
@dataclass(eq=False)
class Sequence:
    """One generation request. `emit(kind, value)` is called from the scheduler thread: ("token", id) per new token,
    then exactly one of ("done", "stop" | "length" | "cancelled") or ("error", message)."""

    ids: list[int]
    pixel_values: np.ndarray | None
    params: object  # medc.runtime.gemma.SamplingParams
    emit: Callable[[str, object], None]
    cancelled: str | None = None  # why it should stop early: "cancelled" (client gone) or "stop" (a stop string)
    generated: int = 0
    cache_len: int = 0  # tokens in the KV cache
    last: int = -1  # the newest token, not yet in the cache
    past: dict | None = None  # explicit cache: name -> ndarray [1, kv, n, d] while outside a batch
    slot: int | None = None  # slot cache: its slot
    # The prompt not yet prefilled: a generator of None per chunk, then the logits (a step of its own), or a
    # `_Prompt` the decode steps carry.
    prefilling: object = None
    rng: np.random.Generator | None = None
    finished: str | None = None
    submitted: float = field(default_factory=time.monotonic)

    def cancel(self, reason: str = "cancelled") -> None:
        """From any thread: the sequence leaves at the next step (or is dropped from the queue)."""
        self.cancelled = self.cancelled or reason


class GenerationScheduler:
    """Owns a GemmaPipeline's decoder in one thread; up to `max_concurrency` sequences decode together."""

    def __init__(self, pipeline, name: str, max_concurrency: int = 8, max_queue: int = 64):
        self.pipeline, self.name = pipeline, name
        self.max_concurrency, self.max_queue = max_concurrency, max_queue
        form = _Slots if getattr(pipeline, "attention", "explicit") == "gqa" else _Regrouped
        self.kv = form(pipeline, max_concurrency)
        self.eos = pipeline.eos_ids
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._active: list[Sequence] = []  # admitted: prefilling or decoding
        self._cv = threading.Condition()
        self._closing = False
        self.steps = self.tokens = 0
        self.mixed = 0  # steps that carried a prompt's chunk beside decoding sequences
        self.finished: collections.Counter[str] = collections.Counter()  # by reason: stop, length, cancelled, error
        self._thread = threading.Thread(target=self._loop, name=f"medc-decode-{name}", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        return len(self._waiting)

    @property
    def active(self) -> int:
        return len(self._active)

    def check(self) -> None:
        """Fail fast, before a request's prompt is prepared, when `submit` would refuse it."""
        if self._closing:
            raise Closed("the server is shutting down; retry on another instance.")
        if len(self._waiting) >= self.max_queue:
            raise QueueFull(f"{self.name} generation", self.max_queue)

    def submit(self, seq: Sequence) -> Sequence:
        with self._cv:
            self.check()
            self._waiting.append(seq)
            self._cv.notify()
        return seq

    def close(self, timeout: float | None = None) -> None:
        """Finish every active and queued sequence, then stop (graceful shutdown)."""
        with self._cv:
            self._closing = True
            self._cv.notify()
        self._thread.join(timeout)

    # -- the loop -----------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._waiting and not self._active and not self._closing:
                    self._cv.wait()
                if self._closing and not self._waiting and not self._active:
                    return
                # Requests cancelled while queued leave the queue now, so they stop holding its places.
                dropped = [s for s in self._waiting if s.cancelled]
                if dropped:
                    self._waiting = collections.deque(s for s in self._waiting if not s.cancelled)
                admit = []
                while self._waiting and len(self._active) + len(admit) < self.max_concurrency:
                    admit.append(self._waiting.popleft())
            for seq in dropped:
                self._finish_if_cancelled(seq)
            for seq in admit:
                if not self._finish_if_cancelled(seq):
                    self._start(seq)
            for seq in [s for s in self._active if s.prefilling is not None and not isinstance(s.prefilling, _Prompt)]:
                self._prefill_chunk(seq)  # prompts that prefill in steps of their own: one more chunk
            self._active = [s for s in self._active if not s.finished and not self._finish_if_cancelled(s)]
            decoding = [s for s in self._active if s.prefilling is None]
            carried = _carried([s for s in self._active if isinstance(s.prefilling, _Prompt)],
                               self.pipeline.PREFILL_CHUNK)
            if decoding or carried:
                try:
                    self._decode_step(decoding, carried)
                except Exception as e:  # noqa: BLE001 - fail this step's requests, keep serving
                    members = decoding + [s for s, _ in carried]
                    log.error("%s: decode step failed (%s); %d requests ended", self.name, type(e).__name__,
                              len(members))
                    for s in members:
                        self._finish(s, "error", "inference failed on the server")
                    self._active = [s for s in self._active if not s.finished]
                    self.kv.reset()

    def _finish_if_cancelled(self, seq: Sequence) -> bool:
        if seq.cancelled and not seq.finished:
            self._finish(seq, "done", seq.cancelled)
        return bool(seq.cancelled)

    def _finish(self, seq: Sequence, kind: str, value: str) -> None:
        seq.finished, seq.prefilling = value, None
        self.kv.release(seq)
        self.finished["error" if kind == "error" else value] += 1
        _safe_emit(seq, kind, value)

    def _start(self, seq: Sequence) -> None:
        seq.rng = np.random.default_rng(seq.params.seed)
        try:
            seq.prefilling = self.kv.prefill(seq)
        except Exception as e:  # noqa: BLE001 - this request fails alone
            log.error("%s: prefill failed (%s)", self.name, type(e).__name__)
            self._finish(seq, "error", "inference failed on the server")
            return
        self._active.append(seq)  # its first chunk runs in this loop's prefill pass

    def _prefill_chunk(self, seq: Sequence) -> None:
        try:
            logits = next(seq.prefilling)
        except Exception as e:  # noqa: BLE001 - this request fails alone
            log.error("%s: prefill failed (%s)", self.name, type(e).__name__)
            self._finish(seq, "error", "inference failed on the server")
            return
        if logits is None:  # more chunks to come
            return
        seq.prefilling = seq.pixel_values = None  # not needed again: free them
        seq.cache_len = len(seq.ids)
        self._accept(seq, logits[None])

    def _accept(self, seq: Sequence, logits: np.ndarray) -> None:
        """Choose the next token from [1, V] logits; emit it or finish (as `GemmaPipeline.stream` decides)."""
        from medc.runtime.gemma import choose

        tok = int(choose(logits, seq.params, seq.rng)[0])
        seq.generated += 1
        self.tokens += 1
        if tok in self.eos and not seq.params.ignore_eos:
            self._finish(seq, "done", "stop")
            return
        seq.last = tok
        _safe_emit(seq, "token", tok)
        if seq.generated >= seq.params.max_new_tokens:
            self._finish(seq, "done", "length")

    def _decode_step(self, members: list[Sequence], carried: list[tuple[Sequence, int]]) -> None:
        """One decoder call: a token for each of `members`, and `carried` prompts' next chunks (seq, tokens)."""
        logits, prompt_logits = self.kv.decode(members, carried)
        self.steps += 1
        self.mixed += bool(members and carried)
        for row, seq in enumerate(members):
            seq.cache_len += 1
            self._accept(seq, logits[row:row + 1])
        for (seq, _), last in zip(carried, prompt_logits):
            if last is not None:  # its prompt is in the cache now
                seq.prefilling = None
                seq.cache_len = len(seq.ids)
                self._accept(seq, last[None])


@dataclass(eq=False)
class _Prompt:
    """A text prompt that decode steps carry into its slot, a chunk per step; `done` tokens are in the cache."""

    ids: list[int]
    done: int = 0


def _carried(prompts: list[Sequence], budget: int) -> list[tuple[Sequence, int]]:
    """Which prompts' next chunks ride in this step, and how many tokens each: up to `budget` prompt tokens in all,
    first come first served (a long prompt takes the budget alone, over as many steps as it needs)."""
    out = []
    for seq in prompts:
        n = min(len(seq.prefilling.ids) - seq.prefilling.done, budget)
        if n <= 0:
            break
        out.append((seq, n))
        budget -= n
    return out


class _Slots:
    """KV slots updated in place (ORT-flavour decoders): one slot per admitted request, lowest free first."""

    def __init__(self, pipeline, slots: int):
        self.pipeline, self.cache = pipeline, pipeline.new_cache(slots)
        self.free = list(range(slots))

    def prefill(self, seq: Sequence):
        seq.slot = self.free.pop(0)
        if self.pipeline.packs and (seq.pixel_values is None or not len(seq.pixel_values)):
            self.cache.reset(seq.slot)
            self.cache.check_room(seq.slot, len(seq.ids))
            return _Prompt(seq.ids)
        return self.pipeline.prefill_steps(self.cache, seq.slot, seq.ids, seq.pixel_values)

    def decode(self, members: list[Sequence], carried: list[tuple[Sequence, int]] = ()):
        """One step: a token per member, the next chunk of each carried prompt. -> (logits [members, V], per
        carried prompt its last position's logits [V] once its last chunk has run, else None)."""
        hi = max(s.slot for s in [*members, *(s for s, _ in carried)]) + 1
        width = max([1, *(n for _, n in carried)])
        tokens, new = np.zeros((hi, width), np.int64), np.zeros(hi, np.int64)
        index = np.zeros((hi, 1), np.int64)
        for s in members:
            tokens[s.slot, 0], new[s.slot] = s.last, 1
        for s, n in carried:
            p = s.prefilling
            tokens[s.slot, :n], new[s.slot], index[s.slot] = p.ids[p.done:p.done + n], n, n - 1
        logits = self.pipeline.step(self.cache, 0, hi, self.pipeline._embed(tokens), new, index)[:, 0]
        last = []
        for s, n in carried:
            s.prefilling.done += n
            last.append(logits[s.slot] if s.prefilling.done == len(s.prefilling.ids) else None)
        return logits[[s.slot for s in members]], last

    def release(self, seq: Sequence) -> None:
        if seq.slot is not None:
            self.cache.reset(seq.slot)
            self.free = sorted(self.free + [seq.slot])
            seq.slot = None

    def reset(self) -> None:
        pass  # the failed requests have released their slots


class _Regrouped:
    """The explicit decoder's cache, passed from step to step; rebuilt left-padded when the batch changes."""

    def __init__(self, pipeline, slots: int):
        self.pipeline = pipeline
        # Per cache input: how many past tokens it keeps (None: all) - the manifest's KV layout, sliding or global.
        self.keep = {f"past_{kv}.{i}": layer["keep"] for i, layer in enumerate(pipeline.gen["kv_layout"])
                     for kv in ("key", "value")}
        self._batch: tuple[list[Sequence], dict, np.ndarray] | None = None  # members, their KV, their mask

    def prefill(self, seq: Sequence):
        """Unpadded, exactly as a single `GemmaPipeline.stream`; the sequence joins the batch at the next step."""
        logits, seq.past = self.pipeline.prefill(seq.ids, seq.pixel_values)
        return iter([logits])

    def decode(self, members: list[Sequence], carried=()) -> tuple[np.ndarray, list]:
        """One step for `members` (this form carries no prompts: they prefill in steps of their own)."""
        if self._batch is None or self._batch[0] != members:
            self._regroup(members)
        members, past, mask = self._batch
        mask = np.concatenate([mask, np.ones((len(members), 1), np.int64)], axis=1)
        logits, present = self.pipeline.decode(np.array([s.last for s in members]), mask,
                                               np.array([s.cache_len for s in members]), past)
        self._batch = (members, present, mask)
        return logits, []

    def release(self, seq: Sequence) -> None:
        seq.past = None

    def reset(self) -> None:
        self._batch = None

    def _regroup(self, members: list[Sequence]) -> None:
        """Cut each member's cache out of the old batch, then build the new batch left-padded to the longest."""
        if self._batch is not None:
            old, past, _ = self._batch
            arrays = {k: v if isinstance(v, np.ndarray) else v.numpy() for k, v in past.items()}
            for row, seq in enumerate(old):
                if seq in members:
                    seq.past = {k: a[row:row + 1, :, a.shape[2] - self._kept(k, seq.cache_len):].copy()
                                for k, a in arrays.items()}
        longest = max(s.cache_len for s in members)
        past = {}
        for k in self.keep:
            length = self._kept(k, longest)
            first = members[0].past[k]
            arr = np.zeros((len(members), first.shape[1], length, first.shape[3]), first.dtype)
            for row, seq in enumerate(members):
                n = seq.past[k].shape[2]
                arr[row, :, length - n:] = seq.past[k][0]
            past[k] = arr
        mask = np.zeros((len(members), longest), np.int64)
        for row, seq in enumerate(members):
            mask[row, longest - seq.cache_len:] = 1
            seq.past = None  # the batch holds it now
        self._batch = (list(members), past, mask)

    def _kept(self, name: str, cache_len: int) -> int:
        keep = self.keep[name]
        return cache_len if keep is None else min(cache_len, keep)


def _safe_emit(seq: Sequence, kind: str, value) -> None:
    try:
        seq.emit(kind, value)
    except Exception as e:  # noqa: BLE001 - a broken listener must not stop the decoder
        log.warning("a generation listener failed (%s)", type(e).__name__)
        seq.cancel()
