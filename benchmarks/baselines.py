"""The baselines `medc bench --baseline NAME` times in the same run as the bundles, interleaved with them.

- torch:     the HF PyTorch eager fp32 model the bundle was built from (needs medc[build]); encoders component by
             component on the same inputs, generation with the same token ids and loop shape (generation.py).
- llama.cpp: llama-cpp-python on the GGUF a Gemma 3 bundle was built from, greedy, prompt then one token at a time
             as llama-bench counts pp and tg (medc[baselines]; it compiles from source, so it is never in CI's path).
- ort-genai: ONNX Runtime GenAI on a model its own builder makes from the same source (benchmarks/ortgenai.py).
- openvino-genai: OpenVINO GenAI's LLMPipeline on a stateful IR optimum-intel exports from the same source, NNCF
             int4 / int8 weights beside int4 / int8 bundles, fp32 beside fp32 (benchmarks/ovgenai.py).

A baseline that cannot run here is a note in the result, never a failure of the other rows.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

import numpy as np

from medc.benchmarks.generation import hf_generate_timed, timed_samples
from medc.benchmarks.schema import BundleInfo
from medc.benchmarks.sweep import Sweep
from medc.errors import MedcError

NAMES = ("torch", "llama.cpp", "ort-genai", "openvino-genai")


def _rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def torch_baseline(manifest, source: Path | None = None):
    """The HF PyTorch eager fp32 model the bundle was built from (needs medc[build])."""
    try:
        from medc.compile import loader
        from medc.compile.registry import MODELS
    except ImportError as e:
        raise MedcError(f"--baseline torch needs the build extra (pip install 'medc[build]'): {e}") from None
    src = manifest.model["source"]
    if src["kind"] == "checkpoint":  # a checkpoint folder or a GGUF file
        return loader.load(str(loader.locate_source(src, source)))
    name = manifest.model["name"]
    if name not in MODELS:
        raise MedcError(f"cannot rebuild the reference for {name}: not in this medc's registry.")
    return loader.load(name, random_weights=src["kind"] == "random")


def source_label(manifest) -> str:
    src = manifest.model["source"]
    return src.get("name") or manifest.model["name"]


class _Baseline:
    load_s = load_rss_mib = 0.0
    info: BundleInfo | None = None

    def close(self) -> None:
        pass


class TorchEncoderRunner(_Baseline):
    """HF PyTorch eager fp32, one module per component, on the feeds of the bundle runner it shadows."""

    kind, backend = "encoder", "torch-eager"

    def __init__(self, medc_runner, source: Path | None, threads: int | None):
        import torch

        from medc.compile.export import module_args

        self.threads = threads or torch.get_num_threads()
        m = medc_runner.b.manifest
        rss, t = _rss_mib(), time.perf_counter()
        ref = torch_baseline(m, source)
        specs = {c.name: c for c in ref.family.components(ref.hf_model.config)}
        self.modules = {n: specs[n].extract(ref.hf_model) for n in medc_runner.names}
        self.load_s, self.load_rss_mib = time.perf_counter() - t, _rss_mib() - rss
        self.medc, self.comps, self.module_args = medc_runner, m.components, module_args
        self.bundle, self.notes = f"{source_label(m)} (HF fp32)", []
        self.info = BundleInfo(self.bundle, m.model["name"], "fp32", medc_runner_weights(m), None, None, {})
        self._args: dict = {}

    def cases(self, sweep: Sweep) -> list[dict]:
        return self.medc.cases(sweep)

    def run(self, case: dict) -> dict[str, list[float]]:
        import torch

        key = (case["component"], case["batch"])
        if key not in self._args:  # the same inputs as the bundle runner it shadows
            self._args[key] = self.module_args(self.modules[key[0]], self.comps[key[0]], self.medc.feeds(case))
        torch.set_num_threads(self.threads)
        t = time.perf_counter()
        with torch.inference_mode():
            self.modules[key[0]](*self._args[key])
        ms = (time.perf_counter() - t) * 1e3
        return {"latency_ms": [ms], "items_per_s": [key[1] * 1e3 / ms]}


def medc_runner_weights(manifest) -> str:
    return "random" if manifest.model["source"].get("kind") in ("tiny", "random") else "real"


class _TextGeneration(_Baseline):
    """A text-only, batch-1 generation baseline on the token ids of the medc bundle's own prompts."""

    kind = "generation"

    def __init__(self, medc_runner, threads: int | None):
        self.medc, self.notes, self.threads = medc_runner, [], threads or os.cpu_count() or 1

    def cases(self, sweep: Sweep) -> list[dict]:
        from medc.runtime.gemma import encode_prompt

        out = []
        for case in self.medc.cases(sweep):
            if case["batch"] != 1 or case["images"]:
                self.notes.append(f"{self.backend}: times batch 1, text only (batch {case['batch']}, "
                                  f"images {case['images']} skipped)")
                continue
            out.append(case)
        self._ids = {c["prompt_tokens"]: encode_prompt(self.medc.assets, self.medc.prompt(c["prompt_tokens"]))
                     for c in out}
        return out

    def run(self, case: dict) -> dict[str, list[float]]:
        timed = self.generate(self._ids[case["prompt_tokens"]], case["new_tokens"])
        return timed_samples(timed, 1, case["prompt_tokens"]) | {"tokens": timed[2]}


class TorchGenerationRunner(_TextGeneration):
    backend = "torch-eager"

    def __init__(self, medc_runner, source: Path | None, threads: int | None):
        super().__init__(medc_runner, threads)
        m = medc_runner.pipe.bundle.manifest
        rss, t = _rss_mib(), time.perf_counter()
        self.model = torch_baseline(m, source).hf_model
        self.load_s, self.load_rss_mib = time.perf_counter() - t, _rss_mib() - rss
        self.bundle = f"{source_label(m)} (HF fp32)"
        self.info = BundleInfo(self.bundle, m.model["name"], "fp32", medc_runner_weights(m), None, None, {})

    def generate(self, ids, n):
        import torch

        torch.set_num_threads(self.threads)
        return hf_generate_timed(self.model, ids, n)


class LlamaCppRunner(_TextGeneration):
    backend = "llama.cpp"

    def __init__(self, medc_runner, source: Path | None, threads: int | None):
        super().__init__(medc_runner, threads)
        m = medc_runner.pipe.bundle.manifest
        src = m.model["source"]
        if src.get("format") != "gguf":
            raise MedcError(f"{medc_runner.bundle} was not built from a GGUF file ({src.get('kind')} weights), so "
                            "it has no llama.cpp baseline.")
        try:
            from llama_cpp import Llama
        except ImportError:
            raise MedcError("--baseline llama.cpp needs llama-cpp-python: pip install 'medc[baselines]' (it compiles "
                            "llama.cpp from source, several minutes).") from None
        from medc.compile.loader import locate_source

        gguf = locate_source(src, source)
        rss, t = _rss_mib(), time.perf_counter()
        self.llm = Llama(model_path=str(gguf), n_threads=self.threads, n_threads_batch=self.threads,
                         n_ctx=medc_runner.assets.max_positions, n_batch=512, n_ubatch=512, verbose=False)
        self.load_s, self.load_rss_mib = time.perf_counter() - t, _rss_mib() - rss
        self.bundle = f"{gguf.name} (llama.cpp)"
        quant = src.get("name", gguf.name).rsplit("-", 1)[-1].removesuffix(".gguf")
        self.info = BundleInfo(self.bundle, m.model["name"], f"gguf {quant}", "real", None, src.get("sha256"), {})

    def generate(self, ids, n):
        """pp then tg, as llama-bench: one eval of the prompt, then one eval per token, greedy on the last logits."""
        llm, n_vocab = self.llm, self.llm.n_vocab()
        llm.reset()  # n_tokens = 0: the next eval clears the KV cache from position 0
        stamps, tokens = [], []
        t0 = time.perf_counter()
        llm.eval(ids)
        for i in range(n):
            tok = int(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,)).argmax())
            stamps.append(time.perf_counter())
            tokens.append(tok)
            if i + 1 < n:
                llm.eval([tok])
        return t0, stamps, tokens

    def close(self) -> None:
        self.llm.close()


class _EngineBaseline(_TextGeneration):
    """A generation engine whose own tool builds its model from the bundle's real checkpoint (cached), timed with
    the same token ids: ONNX Runtime GenAI, OpenVINO GenAI. `engine()` is its module (build_model, load,
    generate_timed, require)."""

    @staticmethod
    def engine():
        raise NotImplementedError

    @staticmethod
    def weights(manifest) -> str:
        raise NotImplementedError

    def __init__(self, medc_runner, source: Path | None, threads: int | None, log):
        super().__init__(medc_runner, threads)
        from medc.compile.loader import locate_source

        engine = self.engine()
        engine.require()  # a missing package: the install hint before any export
        m = medc_runner.pipe.bundle.manifest
        src = m.model["source"]
        if src.get("kind") != "checkpoint":
            raise MedcError(f"{medc_runner.bundle} was built from {src.get('kind')} weights; the {self.backend} "
                            "baseline builds from the real checkpoint.")
        weights = self.weights(m)
        model_dir = engine.build_model(locate_source(src, source), weights, log=log)
        rss, t = _rss_mib(), time.perf_counter()
        self.handle = engine.load(model_dir, self.threads)
        self.load_s, self.load_rss_mib = time.perf_counter() - t, _rss_mib() - rss
        self._generate = engine.generate_timed
        self.bundle = f"{source_label(m)} ({self.backend} {weights})"
        self.info = BundleInfo(self.bundle, m.model["name"], weights, "real", None, None, {})

    def generate(self, ids, n):
        return self._generate(self.handle, ids, n)


class OrtGenaiRunner(_EngineBaseline):
    backend = "ort-genai"

    @staticmethod
    def engine():
        from medc.benchmarks import ortgenai

        return ortgenai

    @staticmethod
    def weights(manifest) -> str:
        return _genai_precision(manifest)


class OvGenaiRunner(_EngineBaseline):
    backend = "openvino-genai"

    @staticmethod
    def engine():
        from medc.benchmarks import ovgenai

        return ovgenai

    @staticmethod
    def weights(manifest) -> str:
        return _ov_weights(manifest)


def _genai_precision(manifest) -> str:
    return "int4" if manifest.components["decoder"].precision in ("int4", "int8") else "fp32"


def _ov_weights(manifest) -> str:
    """optimum-intel's --weight-format nearest the bundle: int4 if any of its recipe's precisions is int4 (e.g. the
    270M int4 recipe: int8 decoder, int4 lm_head), else int8 if any is int8, else fp32. NNCF has int8 where ORT GenAI's
    builder has only int4, so an int8 bundle is set beside int8 weights."""
    recipe = (manifest.build.get("recipe") or {}).get("precisions") or {}
    found = set(recipe.values()) | {c.precision for c in manifest.components.values()}
    return next((w for w in ("int4", "int8") if w in found), "fp32")


def _baseline_weights(name: str, manifest) -> str:
    return _ov_weights(manifest) if name == "openvino-genai" else _genai_precision(manifest)


def make(name: str, medc_runners: list, sweep: Sweep, source: Path | None,
         log: Callable[[str], None]) -> tuple[list, list[str]]:
    """(runners, notes) of baseline `name` for the bundles' runners: one per distinct model source and thread count.
    Whatever cannot run is a note naming why, and the other rows go on."""
    if name not in NAMES:
        raise MedcError(f"unknown baseline {name!r}; choose from {', '.join(NAMES)}.")
    runners, notes, seen = [], [], set()
    for r in medc_runners:
        m = r.b.manifest if r.kind == "encoder" else r.pipe.bundle.manifest
        key = (m.model["name"], m.model["source"].get("sha256"), r.threads)
        if name in ("ort-genai", "openvino-genai") and r.kind == "generation":  # int4 beside quantised bundles, fp32 beside fp32
            key += (_baseline_weights(name, m),)
        if key in seen:
            continue
        seen.add(key)
        log(f"loading the {name} baseline for {r.bundle} ({r.threads} threads)")
        try:
            if name == "torch":
                made = (TorchEncoderRunner if r.kind == "encoder" else TorchGenerationRunner)(r, source, r.threads)
            elif r.kind == "encoder":
                raise MedcError(f"{r.bundle} is an embedding model; the {name} baseline is for generation.")
            elif name == "llama.cpp":
                made = LlamaCppRunner(r, source, r.threads)
            elif name == "openvino-genai":
                made = OvGenaiRunner(r, source, r.threads, log)
            else:
                made = OrtGenaiRunner(r, source, r.threads, log)
        except (MedcError, ImportError) as e:
            notes.append(f"baseline {name} for {r.bundle}: not run: {e}")
            continue
        runners.append(made)
    return runners, notes
