"""`medc bench BUNDLE…`: a sweep over bundles and baselines, interleaved, into one `Result` (benchmarks/schema.py).

    bench(bundles, sweep, baselines) ─┬─ runners: one per bundle and thread count (EncoderRunner / GenerationRunner)
                                      │           + the baselines asked for (benchmarks/baselines.py)
                                      ├─ sweep.run(): rounds, interleaved, host probe between rounds
                                      └─ roofline.attach(): each medc row's floor on this machine, achieved fraction

Embedding bundles (MedSigLIP) are timed per component on the bundle's own golden inputs tiled to the batch size;
generative bundles (MedGemma, Gemma 3) on a fixed prompt of exactly N tokens, greedy, M new tokens (generation.py).
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

from medc.benchmarks import baselines, roofline
from medc.benchmarks import sweep as sweeps
from medc.benchmarks.generation import fixed_prompt, golden_image, medc_generate_timed, timed_samples, vision_ms
from medc.benchmarks.host import Probe, bundle_info, gpu_memory_used_mib, run_info
from medc.benchmarks.schema import Result
from medc.errors import MedcError


def rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _feeds_for_batch(cases: dict, batch: int) -> dict[str, np.ndarray]:
    """Real golden inputs, tiled to `batch` rows (so benches use realistic data without torch)."""
    first = next(iter(cases.values()))["in"]
    return {k: np.ascontiguousarray(np.resize(v, (batch,) + v.shape[1:])) for k, v in first.items()}


class EncoderRunner:
    """One embedding bundle (MedSigLIP) at one thread count: an ONNX Runtime session per component."""

    kind = "encoder"
    backend = "onnxruntime"

    def __init__(self, bundle_dir: Path, threads: int | None, components: tuple[str, ...] = ()):
        from medc.runtime.bundle import open_bundle
        from medc.runtime.session import open_component
        from medc.runtime.verify import golden_cases

        rss, t = rss_mib(), time.perf_counter()
        self.b = open_bundle(bundle_dir)
        m = self.b.manifest
        unknown = [n for n in components if n not in m.components]
        if unknown:
            raise MedcError(f"unknown component(s) {', '.join(unknown)}; {bundle_dir} has {', '.join(m.components)}.")
        self.names = list(components) or list(m.components)
        self.sessions = {n: open_component(self.b, n, threads).open() for n in self.names}
        self.load_s, self.load_rss_mib = time.perf_counter() - t, rss_mib() - rss
        with np.load(self.b.path / m.golden) as g:
            golden = {k: g[k] for k in g.files}
        self.golden = {n: golden_cases(golden, n) for n in self.names}
        self.bundle, self.threads, self.notes = self.b.path.name, threads or os.cpu_count() or 1, []
        self.backend = "+".join(sorted({m.components[n].backend for n in self.names}))  # "onnxruntime", "openvino"
        self._feeds: dict[tuple, dict] = {}
        self.providers = sorted({p for s in self.sessions.values() for p in s.active_providers})

    def cases(self, sweep: sweeps.Sweep) -> list[dict]:
        return sweep.encoder_cases(self.names)

    def feeds(self, case: dict) -> dict[str, np.ndarray]:
        """The case's inputs: the component's golden inputs tiled to the batch (made once)."""
        key = (case["component"], case["batch"])
        if key not in self._feeds:
            self._feeds[key] = _feeds_for_batch(self.golden[key[0]], key[1])
        return self._feeds[key]

    def run(self, case: dict) -> dict[str, list[float]]:
        key = (case["component"], case["batch"])
        sess, feeds = self.sessions[key[0]], self.feeds(case)
        t = time.perf_counter()
        sess.run(feeds)
        ms = (time.perf_counter() - t) * 1e3
        return {"latency_ms": [ms], "items_per_s": [key[1] * 1e3 / ms]}

    def close(self) -> None:
        for s in self.sessions.values():
            s.close()


class GenerationRunner:
    """One generative bundle (MedGemma / Gemma 3) at one thread count, through the runtime's own pipeline."""

    kind = "generation"
    backend = "onnxruntime"

    def __init__(self, bundle_dir: Path, threads: int | None):
        import medc.runtime

        rss, t = rss_mib(), time.perf_counter()
        self.pipe = medc.runtime.load(bundle_dir, threads=threads)
        self.assets = self.pipe.assets
        self.load_s, self.load_rss_mib = time.perf_counter() - t, rss_mib() - rss
        self.bundle, self.threads, self.notes = self.pipe.bundle.path.name, threads or os.cpu_count() or 1, []
        self.pixels = golden_image(self.pipe)
        self.image = _test_image(self.pipe) if self.pixels is not None else None
        self._prompts: dict[int, str] = {}
        self.providers = sorted(set(self.pipe.active_providers("decoder")))

    def cases(self, sweep: sweeps.Sweep) -> list[dict]:
        """The sweep's cases that fit this build's context; a main-run prompt too long for it is shortened to fit
        (and said so), a --past depth that does not fit is skipped."""
        limit, out = self.assets.max_positions, []
        for case in sweep.generation_cases():
            image_tokens = self.assets.mm_tokens_per_image if case["images"] else 0
            room = limit - image_tokens - case["new_tokens"]
            if case["images"] and self.image is None:
                self.notes.append(f"{self.bundle}: images=1 skipped: a text-only model")
                continue
            if case["prompt_tokens"] > room:
                if case["past"] or room < 1:
                    self.notes.append(f"{self.bundle}: prompt {case['prompt_tokens']} + {case['new_tokens']} new "
                                      f"tokens skipped: this build's context is {limit} tokens")
                    continue
                self.notes.append(f"{self.bundle}: prompt shortened from {case['prompt_tokens']} to {room} tokens: "
                                  f"this build's context is {limit} tokens")
                case = dict(case, prompt_tokens=room)
            if case not in out:
                out.append(case)
        return out

    def prompt(self, n: int) -> str:
        if n not in self._prompts:
            self._prompts[n] = fixed_prompt(self.assets, n)
        return self._prompts[n]

    def run(self, case: dict) -> dict[str, list[float]]:
        images = [self.image] if case["images"] else None
        timed = medc_generate_timed(self.pipe, self.prompt(case["prompt_tokens"]), case["new_tokens"],
                                    case["batch"], images)
        out = timed_samples(timed, case["batch"], case["prompt_tokens"]) | {"tokens": timed[2]}
        if case["images"]:
            out["vision_ms"] = [vision_ms(self.pipe, self.pixels)]
        return out

    def close(self) -> None:
        self.pipe.close()


def _test_image(pipe):
    """A fixed greyscale radiograph-like image (a smooth gradient with structure) at the encoder's input size."""
    from PIL import Image

    size = int(pipe.bundle.manifest.preprocessing["image"]["height"])
    y, x = np.mgrid[0:size, 0:size] / size
    img = (127 + 100 * np.sin(6 * x) * np.cos(4 * y)).astype(np.uint8)
    return Image.fromarray(img, "L").convert("RGB")


def _runner_for(bundle_dir: Path, threads: int | None, sweep: sweeps.Sweep):
    from medc.manifest import Manifest

    if Manifest.read(bundle_dir).model.get("family") == "gemma3":
        if sweep.components:
            raise MedcError("--component is for embedding bundles; a generative bundle is timed whole.")
        return GenerationRunner(bundle_dir, threads)
    return EncoderRunner(bundle_dir, threads, sweep.components)


def bench(bundles: list[Path], sweep: sweeps.Sweep, baseline_names: tuple[str, ...] = (), source: Path | None = None,
          probe: bool = True, log: Callable[[str], None] = lambda m: None, title: str | None = None) -> Result:
    """Run the sweep over `bundles` (and each baseline asked for) and return the Result, floors attached."""
    if not bundles:
        raise MedcError("name at least one bundle to benchmark.")
    names = [Path(b).name for b in bundles]
    if len(set(names)) < len(names):
        raise MedcError(f"two bundles share a folder name ({', '.join(names)}); rows are named by folder, so rename one.")
    runners, notes = [], []
    infos = {i.name: i for i in (bundle_info(Path(b)) for b in bundles)}  # before the sweep: fail early
    try:
        for threads in sweep.threads:
            for b in bundles:
                log(f"loading {b} ({threads or 'default'} threads)")
                runners.append(_runner_for(Path(b), threads, sweep))
        medc_runners = list(runners)
        for name in baseline_names:
            made, why = baselines.make(name, medc_runners, sweep, source, log)
            runners += made
            notes += why
        kinds = {r.kind for r in runners}
        if len(kinds) > 1:
            raise MedcError("embedding and generative bundles cannot share a sweep (their parameters differ); run "
                            "them in two `medc bench` calls.")
        probe_ = Probe(sweep.threads[0]) if probe else None
        rows = sweeps.run(runners, sweep, probe_, log, gpu_memory_used_mib)
        notes += list(dict.fromkeys(n for r in runners for n in r.notes))
        providers = sorted({p for r in runners for p in getattr(r, "providers", [])})
    finally:
        for r in runners:
            r.close()
    infos |= {r.info.name: r.info for r in runners if getattr(r, "info", None)}
    info = run_info(",".join(str(t or os.cpu_count()) for t in sweep.threads), providers,
                    list(infos.values()),
                    "medc bench " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if sys.argv[1:2] == ["bench"]
                    else None, probe_.metrics() if probe_ else [])
    info.notes += notes
    result = Result(info, rows, title)
    if probe_ is not None:
        workloads = {}
        for b in bundles:
            try:
                workloads[Path(b).name] = roofline.Workload.of_bundle(Path(b), source)
            except (MedcError, ImportError) as e:
                info.notes.append(f"{Path(b).name}: no roofline floor ({e})")
        on_gpu = any(p in ("CUDAExecutionProvider", "TensorrtExecutionProvider") for p in providers)
        info.notes += roofline.attach(rows, workloads, roofline.Peaks.from_probe(info.probe), on_gpu)
    return result
