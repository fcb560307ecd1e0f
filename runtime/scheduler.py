"""Inference for the server, off the event loop: a micro-batcher for the encoders and continuous batching for chat.

Both own their sessions in one worker thread each; callers (the HTTP layer, or anything else) hand work over
through bounded queues and are answered through futures / callbacks, so no framework is imported here.

Continuous batching, as llama-server's slots and vLLM do it: a scheduler thread owns a `Batch` (runtime/batch.py,
the sampling loop `GemmaPipeline.stream` runs too) with one decoder slot per concurrent request; between steps it
admits queued requests into free slots and drops cancelled ones. How each decoder holds its KV cache, and what one
step can carry, is runtime/decoder.py's. A request's greedy tokens do not depend on who shares its steps (tested).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
from typing import Callable

import numpy as np

from medc.errors import MedcError
from medc.runtime.batch import Sequence

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
        thread-safe call: a concurrent Future wrapped per request would wake the loop once per request, all of it
        holding the GIL the HTTP loop needs (benchmarks/results/design-measurements.md)."""
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
    compute-bound already at batch 1 gets slower per image in large batches (its activations leave the caches).
    Sizes whose two calls would not fit in what
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
    encoder that is compute-bound at batch 1 it is next to nothing, and a fixed window lost more than batching
    saved (benchmarks/results/design-measurements.md)."""
    if limit <= 1 or 1 not in per_item:
        return 0.0
    return max(0.0, min(cap_s, per_item[1] - per_item[limit]))


# -- chat: continuous batching ------------------------------------------------------------------------------------
class GenerationScheduler:
    """Owns a GemmaPipeline's decoder in one thread; up to `max_concurrency` sequences decode together."""

    def __init__(self, pipeline, name: str, max_concurrency: int = 8, max_queue: int = 64):
        self.name, self.max_concurrency, self.max_queue = name, max_concurrency, max_queue
        self.batch = pipeline.batch(max_concurrency)
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._cv = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name=f"medc-decode-{name}", daemon=True)
        self._thread.start()

    # counters the server's /metrics reports
    @property
    def steps(self) -> int:
        return self.batch.steps

    @property
    def tokens(self) -> int:
        return self.batch.tokens

    @property
    def mixed(self) -> int:
        return self.batch.mixed

    @property
    def finished(self) -> collections.Counter:
        return self.batch.finished

    @property
    def depth(self) -> int:
        return len(self._waiting)

    @property
    def active(self) -> int:
        return len(self.batch.active)

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
        batch = self.batch
        while True:
            with self._cv:
                while not self._waiting and not batch.active and not self._closing:
                    self._cv.wait()
                if self._closing and not self._waiting and not batch.active:
                    return
                # Requests cancelled while queued leave the queue now, so they stop holding its places.
                dropped = [s for s in self._waiting if s.cancelled]
                if dropped:
                    self._waiting = collections.deque(s for s in self._waiting if not s.cancelled)
                admit = []
                while self._waiting and len(admit) < batch.room:
                    admit.append(self._waiting.popleft())
            for seq in dropped + [s for s in admit if s.cancelled]:
                batch.finish(seq, "done", seq.cancelled)
            for seq in admit:
                if not seq.cancelled:
                    try:
                        batch.admit(seq)
                    except Exception as e:  # noqa: BLE001 - this request fails alone
                        self._failed([seq], e)
            batch.step(on_error=self._failed)

    def _failed(self, seqs: list[Sequence], error: Exception) -> None:
        """A decoder call failed: its requests end with an error, the others go on."""
        log.error("%s: inference failed (%s); %d requests ended", self.name, type(error).__name__, len(seqs))
        for seq in seqs:
            self.batch.finish(seq, "error", "inference failed on the server")
