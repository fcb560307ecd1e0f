"""Turn a resolved MODEL (compile/plan.py `resolve`) into a loaded PyTorch model: a built-in tiny model, the real
architecture with random weights, a local Hugging Face checkpoint, or a Gemma 3 GGUF file.

Real weights are read offline with safetensors only and never with trust_remote_code. Registry models without local
weights fail with a message that says where medc looked and how to get them; `--random-weights` builds the real
architecture with random weights instead (for latency work; such bundles are marked not for clinical use).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from medc.compile.cache import intact, publish
from medc.compile.gguf import check_gguf, gguf_cache
from medc.compile.hf import empty_model, hf_class, hf_config
from medc.compile.plan import ResolvedModel, resolve
from medc.compile.registry import MODELS
from medc.compile.spec import Family, ModelSpec
from medc.errors import MedcError
from medc.manifest import sha256_file
from medc.runtime.gemma import PromptAssets
from medc.runtime.preprocess import ImagePreprocessing
from medc.runtime.tokenizer import SiglipTokenizer


@dataclass
class LoadedModel:
    spec: ModelSpec
    hf_model: Any  # torch.nn.Module, fp32, eval mode; released (None) once the torch phase of a build is over
    source: dict  # {"kind": "tiny" | "random" | "checkpoint", ...}: goes into the manifest
    config: Any  # the HF config (kept after hf_model is released)
    preprocessor_config: dict
    checkpoint: Path | None = None
    pad_to_square: bool = False
    text_length: int = 64
    # Filled by the family's `prepare`: tokenizer file, and for generative models the chat template and special ids.
    tokenizer_file: Path | None = None
    chat_template: str | None = None
    special_tokens: dict = field(default_factory=dict)
    special_ids: dict = field(default_factory=dict)
    eos_token_ids: list = field(default_factory=list)

    @property
    def family(self) -> Family:
        return self.spec.family

    @cached_property
    def preprocessing(self) -> ImagePreprocessing:
        return ImagePreprocessing.from_hf_config(self.preprocessor_config, pad_to_square=self.pad_to_square)

    @cached_property
    def tokenizer(self):
        return SiglipTokenizer(self.tokenizer_file, max_length=self.text_length)

    def prompt_assets(self) -> PromptAssets:
        """The runtime's prompt builder inputs (generative models)."""
        from tokenizers import Tokenizer

        return PromptAssets(tokenizer=Tokenizer.from_file(str(self.tokenizer_file)), chat_template=self.chat_template,
                            special_ids=self.special_ids, special_tokens=self.special_tokens,
                            mm_tokens_per_image=getattr(self.config, "mm_tokens_per_image", 0) or 0)

    @property
    def clinical_use(self) -> bool:
        return self.source["kind"] == "checkpoint"


def random_parameter(name: str, shape, seed: int):
    """The random value of parameter `name` (fp32 torch tensor): a pure function of (seed, name, shape), so a model
    randomised whole (`randomize_`) and one streamed a parameter at a time (compile/stream.py) get the same weights.

    Every parameter gets a value at a sane scale (std 1/sqrt(fan_in) for matrices). HF's default init zeroes biases
    and sets norms to 1, so a parity test on such a model can pass while a bias or a norm is dropped from the graph:
    norm scales become 1 + N(0, 0.1) and biases N(0, 0.1) so every one matters.
    """
    import torch

    shape = tuple(int(d) for d in shape)
    key = int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")
    x = np.random.default_rng(key).standard_normal(shape, dtype=np.float32)  # float32 ziggurat: faster than torch
    if len(shape) >= 2:
        x /= float(np.sqrt(np.prod(shape[1:])))
    elif name.endswith("logit_scale"):
        x = x * 0.1 + float(np.log(10.0))
    elif name.endswith("logit_bias"):
        x = x * 0.1 - 2.0
    elif "norm" in name and name.endswith("weight"):
        x = x * 0.1 + 1.0
    else:
        x *= 0.1
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


def randomize_(model, seed: int) -> None:
    """Give *every* parameter its `random_parameter` value (tied parameters once, under their first name)."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(random_parameter(name, p.shape, seed))


def build_random(spec: ModelSpec, seed: int | None = None):
    import torch

    seed = spec.seed if seed is None else seed
    torch.manual_seed(seed)
    model = hf_class(spec.family)(hf_config(spec.family, spec.config))
    randomize_(model, seed)
    return model.float().eval()


def load(model: str | ResolvedModel, random_weights: bool = False, pad_to_square: bool = False,
         empty: bool = False) -> LoadedModel:
    """`model`: a MODEL argument or one resolved already. `empty`: parameters without values, filled on demand from
    the weight source (streamed builds, compile/stream.py)."""
    resolved = model if isinstance(model, ResolvedModel) else resolve(model, random_weights)
    spec, source = resolved.spec, resolved.source
    if source.kind in ("tiny", "random"):
        hf_model = empty_model(spec.family, spec.config) if empty else build_random(spec)
        loaded = LoadedModel(spec=spec, hf_model=hf_model, config=hf_model.config,
                             source={"kind": source.kind, "seed": spec.seed, "hf_id": spec.hf_id},
                             preprocessor_config=dict(spec.preprocessor), pad_to_square=pad_to_square)
        spec.family.prepare(loaded, None)
        return loaded
    if source.path is None:
        raise MedcError(
            f"no weights for {spec.name}: looked in {', '.join(source.looked)}.\n"
            f"On a connected machine, accept the model's terms at huggingface.co/{spec.hf_id} and download it "
            f"(huggingface-cli download {spec.hf_id} --local-dir DIR), copy DIR here, then run "
            f"`medc build DIR ...` or put it at {source.looked[0]}. For latency work without weights: --random-weights.")
    if source.format == "gguf":
        if empty:
            raise MedcError("streamed builds read safetensors checkpoints (or random weights), not GGUF files.")
        return load_gguf(resolved)
    return load_checkpoint(resolved, pad_to_square=pad_to_square, empty=empty)


def load_checkpoint(resolved: ResolvedModel, pad_to_square: bool = False, empty: bool = False) -> LoadedModel:
    path, spec, family = resolved.source.path, resolved.spec, resolved.family
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        other = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        hint = f" It has {', '.join(other)}: medc loads safetensors only (pickle files can run code)." if other else ""
        raise MedcError(f"{path} has no *.safetensors weights.{hint} Download the model's safetensors files into it.")
    missing = [f for f in family.required_files if not (path / f).is_file()]
    if missing:
        raise MedcError(f"{path} lacks {', '.join(missing)}; copy the full model repository, not only the weights.")
    _check_safetensors(weights)
    try:
        model = empty_model(family, resolved.config) if empty else hf_class(family).from_pretrained(
            path, local_files_only=True, use_safetensors=True, trust_remote_code=False, dtype="float32")
    except Exception as e:  # noqa: BLE001 - transformers raises many types for a bad checkpoint
        raise MedcError(f"cannot load {path} as {family.hf_class}: {str(e).splitlines()[0][:300]}") from None
    pre_file = path / "preprocessor_config.json"
    pre = json.loads(pre_file.read_text()) if pre_file.is_file() else {}
    source = {"kind": "checkpoint", "path": str(path.resolve()), "config_sha256": sha256_file(path / "config.json"),
              "weights_sha256": {f.name: sha256_file(f) for f in weights},
              "revision": _revision(path), "registered_as": spec.name if spec.name in MODELS else None}
    loaded = LoadedModel(spec=spec, hf_model=model.float().eval(), config=model.config, source=source,
                         preprocessor_config=pre, checkpoint=path, pad_to_square=pad_to_square)
    family.prepare(loaded, path)
    return loaded


def load_gguf(resolved: ResolvedModel) -> LoadedModel:
    """A Gemma 3 GGUF file (e.g. Gemma 3 270M Q4_K_M): dequantised to fp32 by transformers, as Gemma3ForCausalLM.

    The first load converts: the tokenizer (then the checkpoint folder for the tokenizer and chat template) and the
    fp32 weights as safetensors go to ~/.cache/medc/gguf/<sha256>/, and later loads read those instead of parsing and
    dequantising the GGUF again. The manifest still names the GGUF file and its hash as the source.
    """
    path = resolved.source.path
    check_gguf(path)
    digest = sha256_file(path)
    cache, converted = gguf_cache(path, digest)
    try:
        from transformers import Gemma3ForCausalLM

        gguf_tokenizer(path, digest)
        if intact(converted) and (converted / "model.safetensors").is_file():
            model = Gemma3ForCausalLM.from_pretrained(converted, local_files_only=True, use_safetensors=True,
                                                      dtype="float32", trust_remote_code=False)
        else:
            model = Gemma3ForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype="float32",
                                                      trust_remote_code=False)
            # transformers keeps the GGUF quantizer on the model and refuses save_pretrained; the weights are fp32.
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            tmp = converted.with_name(converted.name + f".tmp-{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            model.save_pretrained(tmp, safe_serialization=True)
            publish(tmp, converted)  # whole or absent: a killed conversion leaves only a .tmp folder
    except MedcError:
        raise
    except Exception as e:  # noqa: BLE001
        raise MedcError(f"cannot load {path.name} as Gemma3ForCausalLM: {str(e).splitlines()[0][:300]}") from None
    spec = resolved.spec
    loaded = LoadedModel(spec=spec, hf_model=model.eval(), config=model.config,  # already fp32 (dtype above)
                         source={"kind": "checkpoint", "format": "gguf", "path": str(path), "sha256": digest},
                         preprocessor_config={}, checkpoint=cache)
    spec.family.prepare(loaded, cache)
    return loaded


def gguf_tokenizer(path: Path, digest: str | None = None) -> Path:
    """The folder of a Gemma 3 GGUF file's tokenizer (tokenizer.json, tokenizer_config.json), converted once under
    ~/.cache/medc/gguf/<sha256>/ (`gguf_cache`)."""
    check_gguf(path)
    cache, _ = gguf_cache(path, digest)
    if not (intact(cache) and (cache / "tokenizer.json").is_file()):
        from transformers import AutoTokenizer

        tmp = cache.with_name(cache.name + f".tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, trust_remote_code=False).save_pretrained(tmp)
        publish(tmp, cache)
    return cache


def _check_safetensors(files: list[Path]) -> None:
    from safetensors import safe_open

    for f in files:
        try:
            with safe_open(str(f), framework="np") as st:
                keys = list(st.keys())
                if keys:
                    st.get_slice(keys[-1])
        except Exception as e:  # noqa: BLE001 - SafetensorError and OSError
            raise MedcError(f"weights file {f.name} in {f.parent} is corrupt or truncated ({str(e)[:200]}); "
                            "download it again.") from None


def _revision(path: Path) -> str | None:
    # A hub snapshot folder is named after its commit hash.
    name = path.resolve().name
    return name if len(name) == 40 and all(c in "0123456789abcdef" for c in name) else None


def source_record(source: dict) -> dict:
    """A build's weights as the manifest records them: by name and digest, never by the build host's path (which
    means nothing on a device and can name a user or a study folder)."""
    out = {k: v for k, v in source.items() if k != "path"}
    if "path" in source:
        out["name"] = Path(source["path"]).name
    return out


def locate_source(source: dict, given: Path | None = None) -> Path:
    """The checkpoint folder or GGUF file a bundle was built from (its manifest's `model.source`): `given`, else the
    registry's weights folder, checked by digest against the record."""
    if source.get("kind") != "checkpoint":
        raise MedcError("this needs a bundle built from real weights (a checkpoint or GGUF file); this one was built "
                        f"from {source.get('kind')} weights.")
    path = given
    if path is None and source.get("registered_as") in MODELS:
        path = resolve(source["registered_as"]).source.path
    if path is None:
        raise MedcError(f"the bundle's source ({source.get('name')}) is not in medc's model folders on this machine; "
                        "pass it with --source PATH.")
    path = Path(path)
    if source.get("format") == "gguf":
        same = path.is_file() and sha256_file(path) == source.get("sha256")
    else:
        same = path.is_dir() and {f.name: sha256_file(f) for f in sorted(path.glob("*.safetensors"))} == source.get(
            "weights_sha256")
    if not same:
        raise MedcError(f"{path} is not the source this bundle was built from ({source.get('name')}): its weights' "
                        "sha256 differ from the manifest's record. Pass the checkpoint or GGUF file it was built from.")
    return path


def reference_model(source: dict, given: Path | None = None):
    """The HF fp32 model a bundle was built from, for gates run after the build (`medc eval --reference`)."""
    return load(str(locate_source(source, given))).hf_model
