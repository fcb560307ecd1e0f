"""The ONNX Runtime GenAI baseline (`medc bench --baseline ort-genai`): the same model, built by ORT GenAI's own model
builder (`onnxruntime_genai.models.builder`) and run by its generator, timed like `hf_generate_timed`.

    source (HF folder | GGUF) ─ hf_folder() ─ builder (subprocess) ─ ~/.cache/medc/ort-genai/<key>/ ─ load() ─ generate_timed()

- A GGUF source: the builder reads only fp16/fp32 GGUF files, not Q4_K_M, so the file is dequantised by medc's own
  loader (compile/loader.py, cached under ~/.cache/medc/gguf/) and the builder gets that fp32 checkpoint.
- The builder runs in a subprocess (`python -m medc.benchmarks.ortgenai HF OUT PRECISION CACHE`): it loads the whole
  torch model and prints a lot; a crash or the memory it holds must not stay in the bench process.
- onnxruntime-genai 0.18's Gemma 3 path reads the transformers 4 config (`rope_theta`, `rope_local_base_freq`);
  transformers 5 gives per-layer-type `rope_parameters` instead, so the worker restores the old fields first
  (`_legacy_rope`). Nothing else of the builder is changed: this is its default export for the CPU.
- The built folder is cached by (source sha256, precision, builder version, transformers version) and published by
  one rename, so a killed build leaves a `.tmp-*` folder, never a half-built entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medc.errors import MedcError

INSTALL = "--baseline ort-genai needs onnxruntime-genai: pip install 'medc[baselines]'"
PRECISIONS = ("int4", "fp32")  # what the builder makes for the CPU that medc also builds
CACHE = Path.home() / ".cache" / "medc" / "ort-genai"


def _og():
    try:
        import onnxruntime_genai as og
    except ImportError:
        raise MedcError(INSTALL) from None
    return og


require = _og  # the install hint, before any build


def builder_version() -> str:
    return _og().__version__


# -- which models the builder takes ------------------------------------------------------------------------------------
def supported_architectures() -> set[str]:
    """The HF architectures the installed builder exports, read from its dispatch in `create_model` (empty if its
    source no longer has that shape; the builder's own error then decides)."""
    _og()
    from importlib.util import find_spec

    spec = find_spec("onnxruntime_genai.models.builder")
    text = Path(spec.origin).read_text() if spec and spec.origin else ""
    return set(re.findall(r'config\.architectures\[0\] == "(\w+)"', text))


def check_architecture(architecture: str, model: str) -> None:
    """MedcError unless ORT GenAI's builder makes a generator for `architecture` (an HF class name)."""
    known = supported_architectures()
    if architecture in known:
        return
    if not architecture.endswith(("ForCausalLM", "ForConditionalGeneration")):
        raise MedcError(f"ort-genai is a generation baseline; {model} is an embedding model ({architecture}). "
                        "Time embedding bundles with medc's own bench, or --baseline torch.")
    if known:
        raise MedcError(f"ORT GenAI's builder (onnxruntime-genai {builder_version()}) does not support {architecture} "
                        f"({model}); leave out --baseline ort-genai for this bundle.")


def source_of(bundle_dir: Path, given: Path | None = None) -> Path:
    """The checkpoint folder or GGUF file a generative bundle was built from (its manifest's record), after checking
    that the baseline applies to it at all."""
    from medc.manifest import Manifest

    m = Manifest.read(Path(bundle_dir))
    name = m.model.get("name", Path(bundle_dir).name)
    if "decoder" not in m.components:
        raise MedcError(f"ort-genai is a generation baseline; {name} is an embedding model "
                        f"({m.model.get('hf_class', 'no decoder')}). Leave out --baseline ort-genai for it.")
    check_architecture(m.model.get("hf_class", ""), name)
    from medc.compile.loader import locate_source

    return locate_source(m.model.get("source", {}), given)


# -- the builder's input: an HF folder ----------------------------------------------------------------------------------
def _digest(source: Path) -> str:
    from medc.manifest import sha256_file

    if source.is_file():
        return sha256_file(source)
    files = sorted(source.glob("*.safetensors")) + [source / "config.json"]
    return hashlib.sha256(json.dumps({f.name: sha256_file(f) for f in files}).encode()).hexdigest()


def hf_folder(source: Path, staging: Path, log: Callable[[str], Any] = print) -> Path:
    """An HF checkpoint folder for `source`: the folder itself, or for a GGUF file medc's fp32 conversion of it
    (tokenizer and weights are cached apart by the loader; `staging` gets links to both)."""
    if source.is_dir():
        config = source / "config.json"
        if not config.is_file():
            raise MedcError(f"{source} has no config.json; pass the full Hugging Face checkpoint folder.")
        arch = (json.loads(config.read_text()).get("architectures") or ["unknown"])[0]
        check_architecture(arch, source.name)
        return source
    from medc.compile.gguf import gguf_cache

    tokenizer, converted = gguf_cache(source)
    if not ((converted / "model.safetensors").is_file() and (tokenizer / "tokenizer.json").is_file()):
        from medc.compile import loader

        log(f"ort-genai: dequantising {source.name} to fp32 (once; cached under {tokenizer.parent})")
        loader.load(str(source))  # writes both cache folders; the model itself is not needed here
    check_architecture((json.loads((converted / "config.json").read_text()).get("architectures") or ["?"])[0],
                       source.name)
    staging.mkdir(parents=True, exist_ok=True)
    for folder in (converted, tokenizer):
        for f in folder.iterdir():
            wanted = f.is_file() and f.suffix in (".json", ".safetensors", ".jinja") and f.name != "sha256.json"
            if wanted and not (staging / f.name).exists():  # the weights folder's config.json wins
                (staging / f.name).symlink_to(f.resolve())
    return staging


# -- build --------------------------------------------------------------------------------------------------------------
def build_model(source: Path, precision: str, cache_dir: Path | None = None,
                log: Callable[[str], Any] = print) -> Path:
    """An ORT GenAI model folder (genai_config.json, model.onnx, tokenizer) for `source`, built once and cached."""
    og = _og()
    source = Path(source)
    if precision not in PRECISIONS:
        raise MedcError(f"ort-genai baseline precision {precision!r}: use one of {', '.join(PRECISIONS)}.")
    if not source.exists():
        raise MedcError(f"{source} does not exist; pass the checkpoint folder or GGUF file the bundle was built from.")
    from importlib import metadata

    key = hashlib.sha256(json.dumps([_digest(source), precision, og.__version__,
                                     metadata.version("transformers")]).encode()).hexdigest()[:16]
    out = Path(cache_dir or CACHE) / key
    if (out / "genai_config.json").is_file():
        return out
    tmp = out.with_name(f"{key}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        hf = hf_folder(source, tmp / "hf", log)
        log(f"ort-genai: building {source.name} ({precision}, CPU) with onnxruntime-genai {og.__version__}'s builder")
        t = time.perf_counter()
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}  # a local folder: never the hub
        done = subprocess.run([sys.executable, "-m", "medc.benchmarks.ortgenai", str(hf), str(tmp / "model"),
                               precision, str(tmp / "cache")], env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["(no output)"]
            if "NotImplementedError" in tail[0] and "not currently supported" in tail[0]:
                raise MedcError(f"ORT GenAI's builder (onnxruntime-genai {og.__version__}) does not support "
                                f"{source.name}'s architecture: {tail[0]}")
            raise MedcError(f"ORT GenAI's builder failed on {source.name} ({precision}): {tail[0][:400]}")
        log(f"ort-genai: built in {time.perf_counter() - t:.0f} s")
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp / "model", out)  # whole or absent
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _legacy_rope(config) -> None:
    """Give a transformers 5 Gemma 3 config the transformers 4 fields onnxruntime-genai's builder reads."""
    rope = getattr(config, "rope_parameters", None)
    if isinstance(rope, dict) and "full_attention" in rope and "sliding_attention" in rope:
        full, local = rope["full_attention"], rope["sliding_attention"]
        config.rope_parameters = dict(full)
        config.rope_theta = full["rope_theta"]
        config.rope_local_base_freq = local["rope_theta"]


def _build_worker(hf: str, out: str, precision: str, cache: str) -> None:
    """The subprocess: the builder's own two steps (as its __main__ runs them), with the config fixed in between."""
    from onnxruntime_genai.models import builder

    options = builder.parse_extra_options(None, hf, out, precision, "cpu", cache, [])
    _legacy_rope(options["hf_details"]["hf_config"])
    builder.create_model(None, hf, out, precision, "cpu", cache, **options)


# -- run ----------------------------------------------------------------------------------------------------------------
@dataclass
class Handle:
    model: Any  # og.Model
    tokenizer: Any  # og.Tokenizer
    path: Path
    threads: int | None
    window: int  # the decoder's sliding window (0 without one)


def load(model_dir: Path, threads: int | None = None) -> Handle:
    """The built model on the CPU, `threads` intra-op threads (None: ONNX Runtime's default)."""
    og = _og()
    config = og.Config(str(model_dir))
    if threads:
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": int(threads)}}}}))
    model = og.Model(config)
    decoder = json.loads((Path(model_dir) / "genai_config.json").read_text())["model"]["decoder"]
    window = int((decoder.get("sliding_window") or {}).get("window_size", 0))
    return Handle(model=model, tokenizer=og.Tokenizer(model), path=Path(model_dir), threads=threads, window=window)


def generate_timed(handle: Handle, ids: list[int], new_tokens: int) -> tuple[float, list[float], list[int]]:
    """(t0, per-token timestamps, tokens), as `hf_generate_timed`: t0 before the prompt goes in; `append_tokens` runs
    the prefill, and each `generate_next_token` picks a token from the logits it has (then runs the next forward on
    the following call). Greedy (top_k 1), batch 1, exactly `new_tokens` tokens: min_length = max_length, so EOS
    cannot end it early (ORT GenAI masks EOS until min_length, where medc's `ignore_eos` keeps going past it)."""
    og = _og()
    total = len(ids) + new_tokens
    params = og.GeneratorParams(handle.model)
    # The KV buffer holds max_length positions, and the sliding-window attention refuses one shorter than its window.
    params.set_search_options(do_sample=False, top_k=1, num_beams=1, batch_size=1,
                              max_length=max(total, handle.window), min_length=total)
    gen = og.Generator(handle.model, params)
    stamps, tokens = [], []
    t0 = time.perf_counter()
    gen.append_tokens(ids)
    while len(tokens) < new_tokens and not gen.is_done():
        gen.generate_next_token()
        tokens.append(int(gen.get_next_tokens()[0]))
        stamps.append(time.perf_counter())
    return t0, stamps, tokens


if __name__ == "__main__":
    _build_worker(*sys.argv[1:5])
