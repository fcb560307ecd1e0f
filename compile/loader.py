"""Turn the `MODEL` argument into a loaded PyTorch model: a registry name, or a local Hugging Face checkpoint.

Real weights are read offline with safetensors only and never with trust_remote_code. Registry models without local
weights fail with a message that says where medc looked and how to get them; `--random-weights` builds the real
architecture with random weights instead (for latency work; such bundles are marked not for clinical use).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from medc.compile.spec import Family, ModelSpec
from medc.errors import MedcError
from medc.runtime.preprocess import ImagePreprocessing


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
        from medc.runtime.tokenizer import SiglipTokenizer

        return SiglipTokenizer(self.tokenizer_file, max_length=self.text_length)

    def prompt_assets(self):
        """The runtime's prompt builder inputs (generative models)."""
        from tokenizers import Tokenizer

        from medc.runtime.gemma import PromptAssets

        return PromptAssets(tokenizer=Tokenizer.from_file(str(self.tokenizer_file)), chat_template=self.chat_template,
                            special_ids=self.special_ids, special_tokens=self.special_tokens,
                            mm_tokens_per_image=getattr(self.config, "mm_tokens_per_image", 0) or 0)

    @property
    def clinical_use(self) -> bool:
        return self.source["kind"] == "checkpoint"


def model_search_dirs(spec: ModelSpec) -> list[Path]:
    """Where a registry model's real weights are looked for, in order."""
    dirs = []
    if os.environ.get("MEDC_MODELS"):
        dirs.append(Path(os.environ["MEDC_MODELS"]) / spec.name)
    dirs.append(Path.home() / ".cache" / "medc" / "models" / spec.name)
    return dirs


def _hf_cache_snapshot(hf_id: str) -> Path | None:
    """The locally cached snapshot of a hub repo, if any. Offline: never downloads."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(hf_id, local_files_only=True))
    except Exception:  # not cached (LocalEntryNotFoundError) or hub library missing
        return None


def builtin_data(name: str) -> Path:
    """A file shipped in medc/compile/data (tiny tokenizers)."""
    return Path(str(resources.files("medc.compile").joinpath(f"data/{name}")))


def random_parameter(name: str, shape, seed: int):
    """The random value of parameter `name` (fp32 torch tensor): a pure function of (seed, name, shape), so a model
    randomised whole (`randomize_`) and one streamed a parameter at a time (compile/stream.py) get the same weights.

    Every parameter gets a value at a sane scale (std 1/sqrt(fan_in) for matrices). HF's default init zeroes biases
    and sets norms to 1, so a parity test on such a model can pass while a bias or a norm is dropped from the graph:
    norm scales become 1 + N(0, 0.1) and biases N(0, 0.1) so every one matters.
    """
    import hashlib

    import torch

    shape = tuple(int(d) for d in shape)
    key = int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")
    x = np.random.default_rng(key).standard_normal(shape, dtype=np.float32)  # float32 ziggurat: ~5x torch.randn
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


def _hf_class(family: Family):
    import transformers

    return getattr(transformers, family.hf_class)


def _config_from_dict(family: Family, config: dict):
    from transformers import AutoConfig

    cfg = dict(config)
    return AutoConfig.for_model(cfg.pop("model_type"), **cfg)


def build_random(spec: ModelSpec, seed: int | None = None):
    import torch

    seed = spec.seed if seed is None else seed
    torch.manual_seed(seed)
    model = _hf_class(spec.family)(_config_from_dict(spec.family, spec.config))
    randomize_(model, seed)
    return model.float().eval()


def _empty_model(family: Family, config: dict):
    from medc.compile import stream

    return stream.empty_model(family, config)


def load(model: str, random_weights: bool = False, pad_to_square: bool = False, empty: bool = False) -> LoadedModel:
    """`empty`: parameters without values, filled on demand from the weight source (streamed builds, stream.py)."""
    from medc.compile.registry import MODELS

    if model in MODELS:
        spec = MODELS[model]
        if spec.tiny or random_weights:
            kind = "tiny" if spec.tiny else "random"
            model = _empty_model(spec.family, spec.config) if empty else build_random(spec)
            loaded = LoadedModel(spec=spec, hf_model=model, config=model.config,
                                 source={"kind": kind, "seed": spec.seed, "hf_id": spec.hf_id},
                                 preprocessor_config=dict(spec.preprocessor), pad_to_square=pad_to_square)
            spec.family.prepare(loaded, None)
            return loaded
        looked = model_search_dirs(spec)
        found = next((d for d in looked if d.is_dir()), None)
        if found is None and spec.hf_id:
            found = _hf_cache_snapshot(spec.hf_id)
            looked.append(Path(f"Hugging Face cache ({spec.hf_id}, offline)"))
        if found is None:
            raise MedcError(
                f"no weights for {model}: looked in {', '.join(str(d) for d in looked)}.\n"
                f"On a connected machine, accept the model's terms at huggingface.co/{spec.hf_id} and download it "
                f"(huggingface-cli download {spec.hf_id} --local-dir DIR), copy DIR here, then run "
                f"`medc build DIR ...` or put it at {looked[0]}. For latency work without weights: --random-weights.")
        return load_checkpoint(found, spec=spec, pad_to_square=pad_to_square, empty=empty)

    path = Path(model)
    if path.exists():
        if random_weights:
            raise MedcError("--random-weights applies to registry names, not checkpoint directories.")
        if path.suffix == ".gguf":
            if empty:
                raise MedcError("streamed builds read safetensors checkpoints (or random weights), not GGUF files.")
            return load_gguf(path)
        return load_checkpoint(path, spec=None, pad_to_square=pad_to_square, empty=empty)
    known = ", ".join(sorted(MODELS))
    raise MedcError(f"unknown model {model!r}: not a registered model ({known}) and not a local directory.")


def load_checkpoint(path: Path, spec: ModelSpec | None, pad_to_square: bool = False, empty: bool = False) -> LoadedModel:
    from medc.compile.registry import family_for_model_type

    path = Path(path)
    if not path.is_dir():
        raise MedcError(f"{path} is not a directory; pass a Hugging Face checkpoint directory (config.json + *.safetensors).")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise MedcError(f"{path} is not a Hugging Face checkpoint: config.json is missing.")
    try:
        config = json.loads(cfg_file.read_text())
    except ValueError as e:
        raise MedcError(f"{cfg_file} is not valid JSON ({e}).") from None
    model_type = config.get("model_type")
    family = family_for_model_type(model_type)
    if family is None:
        from medc.compile.registry import FAMILIES

        kinds = ", ".join(f"{f.hf_class} ({'/'.join(f.model_types)})" for f in FAMILIES.values())
        raise MedcError(f"{path} holds a {model_type!r} model; medc builds {kinds}.")
    if spec is not None and family is not spec.family:
        raise MedcError(f"{path} holds a {model_type!r} model, but {spec.name} is a {spec.family.hf_class}.")
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
        model = _empty_model(family, config) if empty else _hf_class(family).from_pretrained(
            path, local_files_only=True, use_safetensors=True, trust_remote_code=False, dtype="float32")
    except Exception as e:  # noqa: BLE001 - transformers raises many types for a bad checkpoint
        raise MedcError(f"cannot load {path} as {family.hf_class}: {str(e).splitlines()[0][:300]}") from None
    from medc.compile.registry import MODELS

    spec = spec or ModelSpec(name=path.name, family=family, description=f"local {family.hf_class} checkpoint",
                             config=config, preprocessor={})
    pre_file = path / "preprocessor_config.json"
    pre = json.loads(pre_file.read_text()) if pre_file.is_file() else {}
    source = {"kind": "checkpoint", "path": str(path.resolve()), "config_sha256": _sha(cfg_file),
              "revision": _revision(path), "registered_as": spec.name if spec.name in MODELS else None}
    loaded = LoadedModel(spec=spec, hf_model=model.float().eval(), config=model.config, source=source,
                         preprocessor_config=pre, checkpoint=path, pad_to_square=pad_to_square)
    family.prepare(loaded, path)
    return loaded


# GGUF metadata value types (ggml's gguf.h): fixed sizes; 8 is a string, 9 an array (element type, count, items).
_GGUF_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def gguf_architecture(path: Path) -> str:
    """The `general.architecture` of a GGUF file, read from the first header entries.

    Not gguf.GGUFReader: it parses every field up front, and the 262k-entry vocabulary of a Gemma 3 file takes it
    18 s; the architecture is the first key llama.cpp's writers emit, so this reads a few hundred bytes."""
    import struct

    def read(f, n: int) -> bytes:
        b = f.read(n)
        if len(b) != n:
            raise EOFError
        return b

    def skip(f, kind: int) -> None:
        if kind == 8:
            f.seek(struct.unpack("<Q", read(f, 8))[0], 1)
        elif kind == 9:
            item, count = struct.unpack("<IQ", read(f, 12))
            if item in _GGUF_SIZES:
                f.seek(_GGUF_SIZES[item] * count, 1)
            else:
                for _ in range(count):
                    skip(f, item)
        else:
            f.seek(_GGUF_SIZES[kind], 1)

    try:
        with open(path, "rb") as f:
            magic, version = struct.unpack("<4sI", read(f, 8))
            if magic != b"GGUF" or version < 2:
                raise ValueError("not GGUF v2+")
            _, kv_count = struct.unpack("<QQ", read(f, 16))
            for _ in range(kv_count):
                key = read(f, struct.unpack("<Q", read(f, 8))[0]).decode()
                kind = struct.unpack("<I", read(f, 4))[0]
                if key == "general.architecture" and kind == 8:
                    return read(f, struct.unpack("<Q", read(f, 8))[0]).decode()
                skip(f, kind)
        raise KeyError("general.architecture")
    except Exception as e:  # noqa: BLE001 - truncated/corrupt files raise EOFError, KeyError, struct errors...
        raise MedcError(f"{path.name} is not a readable GGUF file ({type(e).__name__}); download it again.") from None


def check_gguf(path: Path) -> None:
    arch = gguf_architecture(path)
    if arch != "gemma3":
        raise MedcError(f"{path.name} is a GGUF of a {arch!r} model; medc builds Gemma 3 GGUF files (gemma3).")


def gguf_cache(path: Path, digest: str | None = None) -> tuple[Path, Path]:
    """(tokenizer folder, fp32 checkpoint folder) of a GGUF file's conversion under ~/.cache/medc/gguf/<sha256>/.
    The checkpoint is keyed by the transformers version too: it is that version's dequantisation."""
    from importlib import metadata

    from medc.manifest import sha256_file

    cache = Path.home() / ".cache" / "medc" / "gguf" / (digest or sha256_file(path))[:16]
    return cache, cache / f"fp32-transformers-{metadata.version('transformers')}"


def gguf_config(path: Path) -> dict:
    """A Gemma 3 GGUF's config: from its cached conversion when there is one (parsing the file costs ~20 s)."""
    check_gguf(path)
    converted = gguf_cache(path)[1] / "config.json"
    if converted.is_file():
        return json.loads(converted.read_text())
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path.parent, gguf_file=path.name).to_dict()


def load_gguf(path: Path) -> LoadedModel:
    """A Gemma 3 GGUF file (e.g. Gemma 3 270M Q4_K_M): dequantised to fp32 by transformers, as Gemma3ForCausalLM.

    The first load converts: the tokenizer (then the checkpoint folder for the tokenizer and chat template) and the
    fp32 weights as safetensors go to ~/.cache/medc/gguf/<sha256>/, and later loads read those (1 s, not 75 s: the
    GGUF parse and dequantisation). The manifest still names the GGUF file and its hash as the source.
    """
    import shutil

    from medc.compile.registry import FAMILIES
    from medc.manifest import sha256_file

    path = Path(path).resolve()
    check_gguf(path)
    digest = sha256_file(path)
    cache, converted = gguf_cache(path, digest)
    try:
        from transformers import AutoTokenizer, Gemma3ForCausalLM

        if not (cache / "tokenizer.json").is_file():
            tmp = cache.with_name(cache.name + f".tmp-{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(tmp)
            shutil.rmtree(cache, ignore_errors=True)
            tmp.rename(cache)
        if (converted / "model.safetensors").is_file():
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
            os.replace(tmp, converted)  # whole or absent: a killed conversion leaves only a .tmp folder
    except MedcError:
        raise
    except Exception as e:  # noqa: BLE001
        raise MedcError(f"cannot load {path.name} as Gemma3ForCausalLM: {str(e).splitlines()[0][:300]}") from None
    family = FAMILIES["Gemma3ForCausalLM"]
    spec = ModelSpec(name=path.stem, family=family, description=f"Gemma 3 GGUF ({path.name}), dequantised to fp32",
                     config=model.config.to_dict(), preprocessor={})
    loaded = LoadedModel(spec=spec, hf_model=model.eval(), config=model.config,  # already fp32 (dtype above)
                         source={"kind": "checkpoint", "format": "gguf", "path": str(path), "sha256": digest},
                         preprocessor_config={}, checkpoint=cache)
    family.prepare(loaded, cache)
    return loaded


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


def _sha(path: Path) -> str:
    from medc.manifest import sha256_file

    return sha256_file(path)


def _revision(path: Path) -> str | None:
    # A hub snapshot folder is named after its commit hash.
    name = path.resolve().name
    return name if len(name) == 40 and all(c in "0123456789abcdef" for c in name) else None
