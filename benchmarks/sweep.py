"""Sweeps like llama-bench: every combination of the parameters, every bundle and baseline interleaved round by round.

This machine's speed drifts by 2x over minutes, so only measurements taken side by side can be compared: each round
runs every case once on every runner (bundle or baseline) before the next round starts, and the host probe samples
the machine's peaks between rounds.

    for round in 1..repeat:           probe.sample()
        for case in cases:            e.g. {component: image_encoder, batch: 4}
            for runner in runners:    medc int8, medc fp32, torch eager, ...
                samples[runner, case] += runner.run(case)

A `Runner` is one loaded thing to time (a bundle at a thread count, or a baseline): it says which cases it can run
(and why not the others), and times one run of a case, returning raw samples per metric. This module knows nothing of
what is timed; benchmarks/bench.py and benchmarks/baselines.py make the runners.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from typing import Callable, Protocol

from medc.benchmarks.schema import Metric, Row
from medc.errors import MedcError
from medc.system import peak_rss_mib

UNITS = {"latency_ms": "ms", "items_per_s": "items/s", "ttft_ms": "ms", "tpot_ms": "ms", "prefill_tok_s": "tok/s",
         "decode_tok_s": "tok/s", "e2e_ms": "ms", "vision_ms": "ms", "peak_rss_mib": "MiB", "load_s": "s",
         "load_rss_mib": "MiB", "device_memory_mib": "MiB", "greedy_agreement": "fraction"}


@dataclass(frozen=True)
class Sweep:
    """The parameter grid of `medc bench` (each tuple is a comma-separated option)."""

    batch: tuple[int, ...] = (1,)
    threads: tuple[int | None, ...] = (None,)
    components: tuple[str, ...] = ()  # encoders: all when empty
    prompt_tokens: tuple[int, ...] = (512,)
    new_tokens: tuple[int, ...] = (128,)
    images: tuple[int, ...] = (0,)
    past: tuple[int, ...] = ()  # decode speed with this many tokens in the KV cache
    past_new_tokens: int = 32
    repeat: int = 10
    warmup: int = 2

    def __post_init__(self):
        for name in ("batch", "prompt_tokens", "new_tokens"):
            if not getattr(self, name) or min(getattr(self, name)) < 1:
                raise MedcError(f"--{name.replace('_', '-')} takes positive integers, e.g. 1,4.")
        if min(self.new_tokens) < 2 or self.past_new_tokens < 2:
            raise MedcError("--new-tokens must be >= 2 (the first token is TTFT; decode needs at least one more).")
        if any(i not in (0, 1) for i in self.images):
            raise MedcError("--images takes 0 and/or 1 (a text-only prompt, or one image).")
        if any(p < 1 for p in self.past):
            raise MedcError("--past takes token counts >= 1 (past 0 is the main run).")
        if any(t is not None and t < 1 for t in self.threads):
            raise MedcError("--threads takes positive integers, e.g. 1,2.")
        if self.repeat < 1 or self.warmup < 0:
            raise MedcError("--repeat must be >= 1 and --warmup >= 0.")

    def encoder_cases(self, components: list[str]) -> list[dict]:
        return [{"component": c, "batch": b} for c, b in itertools.product(components, self.batch)]

    def generation_cases(self) -> list[dict]:
        """The main runs (past 0), then decode at each --past depth: an L-token prompt, then past_new_tokens."""
        main = [{"batch": b, "prompt_tokens": p, "new_tokens": n, "images": i, "past": 0}
                for b, p, n, i in itertools.product(self.batch, self.prompt_tokens, self.new_tokens, self.images)]
        deep = [{"batch": b, "prompt_tokens": p, "new_tokens": self.past_new_tokens, "images": 0, "past": p}
                for b, p in itertools.product(self.batch, self.past)]
        return main + deep


class Runner(Protocol):
    kind: str  # the rows' kind: "encoder" | "generation"
    bundle: str  # what the rows name: a bundle folder, or the baseline's model
    backend: str
    threads: int
    load_s: float  # cold start: opening the bundle / loading the model
    load_rss_mib: float  # resident memory the load added to this process
    notes: list[str]  # what it skipped, and why

    def cases(self, sweep: Sweep) -> list[dict]:
        """The cases of `sweep` this runner times (the others it names in `notes`)."""

    def run(self, case: dict) -> dict[str, list[float]]:
        """One timed run of `case`: raw samples per metric name (see UNITS)."""

    def close(self) -> None: ...


@dataclass
class _Cell:
    runner: Runner
    case: dict
    samples: dict[str, list[float]] = field(default_factory=dict)
    tokens: list[int] | None = None  # generation: the greedy tokens of the first timed run
    failed: bool = False  # a run raised: the cell is dropped from the rounds and the result, with a note


def _guarded(cell: _Cell, log) -> dict | None:
    """One run of a cell; a failure drops the cell (named in its runner's notes) instead of the whole sweep."""
    try:
        return cell.runner.run(cell.case)
    except Exception as e:  # noqa: BLE001 - reported in the result; the other runners' rows stand
        cell.failed = True
        msg = f"{cell.runner.bundle} ({cell.runner.backend}) failed on {cell.case}: {type(e).__name__}: {e}"
        cell.runner.notes.append(msg[:500])
        log(msg[:500])
        return None


def run(runners: list[Runner], sweep: Sweep, probe=None, log: Callable[[str], None] = lambda m: None,
        device_memory: Callable[[], float | None] = lambda: None) -> list[Row]:
    """Time every runner on its cases, interleaved; one Row per (runner, case) with every metric's raw samples."""
    cells: list[_Cell] = []
    order: list[str] = []  # the cases in first-seen order, so a round goes case by case across runners
    for r in runners:
        for case in r.cases(sweep):
            key = json.dumps(case, sort_keys=True)
            if key not in order:
                order.append(key)
            cells.append(_Cell(r, case))
    if not cells:
        raise MedcError("nothing to time: no runner can run any case of this sweep (see the notes above).")
    by_case = {k: [c for c in cells if json.dumps(c.case, sort_keys=True) == k] for k in order}
    for w in range(sweep.warmup):  # the first runs grow memory arenas and pack weights; keep them out of the numbers
        log(f"warm-up {w + 1}/{sweep.warmup}")
        for key in order:
            for cell in by_case[key]:
                if not cell.failed:
                    _guarded(cell, log)
    for i in range(sweep.repeat):
        if probe is not None:
            probe.sample()
        log(f"round {i + 1}/{sweep.repeat}")
        for key in order:
            for cell in by_case[key]:
                out = _guarded(cell, log) if not cell.failed else None
                if out is None:
                    continue
                tokens = out.pop("tokens", None)
                if cell.tokens is None and tokens is not None:
                    cell.tokens = [int(t) for t in tokens]
                for name, values in out.items():
                    cell.samples.setdefault(name, []).extend(values)
    if probe is not None:
        probe.sample()
    peak, device = peak_rss_mib(), device_memory()
    shared = len(runners) > 1
    rows = []
    if all(c.failed for c in cells):
        raise MedcError("every run failed: " + "; ".join(dict.fromkeys(n for c in cells for n in c.runner.notes))[:2000])
    for cell in cells:
        if cell.failed:
            continue
        r = cell.runner
        metrics = [Metric.of(name, UNITS.get(name, ""), values) for name, values in cell.samples.items() if values]
        metrics += [Metric.of("load_s", "s", [r.load_s]), Metric.of("load_rss_mib", "MiB", [r.load_rss_mib]),
                    Metric.of("peak_rss_mib", "MiB", [peak])]
        if device is not None:
            metrics.append(Metric.of("device_memory_mib", "MiB", [device]))
        ref = next((c for c in cells if c.case == cell.case and c.tokens is not None), None)
        if cell.tokens is not None and ref is not None and ref is not cell:
            # greedy decoding of the same prompt: how far this runner agrees with the first one (a medc bundle)
            same = next((i for i, (x, y) in enumerate(zip(ref.tokens, cell.tokens)) if x != y),
                        min(len(ref.tokens), len(cell.tokens)))
            metrics.append(Metric.of("greedy_agreement", "fraction", [same / max(1, len(ref.tokens))]))
        notes = ["peak_rss_mib is this process's peak with every runner of the sweep loaded; load_rss_mib is what "
                 "this one added"] if shared else []
        rows.append(Row(r.kind, r.bundle, r.backend, {**cell.case, "threads": r.threads}, metrics, None, notes))
    return rows
