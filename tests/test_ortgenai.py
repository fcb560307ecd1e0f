"""The ONNX Runtime GenAI baseline (benchmarks/ortgenai.py) on real Gemma 3 270M weights: built by ORT GenAI's own
builder from the Q4_K_M GGUF (dequantised to fp32 by medc's loader), greedy tokens checked against HF transformers.

The fp32 build takes about 30 s on a 2-core machine the first time (then ~/.cache/medc/ort-genai/ has it)."""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import pytest
from medc.errors import MedcError

og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed (pip install 'medc[baselines]')")

from medc.benchmarks import ortgenai

BUNDLES = Path(__file__).parents[1] / "bundles"


@pytest.fixture(scope="module")
def built(gguf_file) -> Path:
    return ortgenai.build_model(gguf_file, "fp32")


def test_greedy_matches_transformers(gguf_file, built):
    from medc.benchmarks.generation import hf_generate_timed
    from medc.compile import loader

    loaded = loader.load(str(gguf_file))
    handle = ortgenai.load(built, threads=2)
    ids = [loaded.config.bos_token_id] + handle.tokenizer.encode("A chest radiograph is").tolist()
    t0, stamps, tokens = ortgenai.generate_timed(handle, ids, 16)
    assert len(stamps) == len(tokens) == 16
    assert t0 < stamps[0] and all(a < b for a, b in pairwise(stamps))
    _, _, ref = hf_generate_timed(loaded.hf_model, ids, 16)
    agree = next((i for i, (a, b) in enumerate(zip(tokens, ref)) if a != b), len(ref))
    assert agree >= 8, f"ORT GenAI and transformers agree on only {agree} greedy tokens: {tokens} vs {ref}"
    # A second build of the same source is the cache entry, not a rebuild.
    assert ortgenai.build_model(gguf_file, "fp32") == built


def test_embedding_bundle_is_refused():
    with pytest.raises(MedcError, match="ort-genai is a generation baseline; medsiglip-tiny is an embedding model"):
        ortgenai.source_of(BUNDLES / "medsiglip-tiny")


def test_unsupported_architecture_is_named():
    with pytest.raises(MedcError, match="builder .* does not support BertForCausalLM"):
        ortgenai.check_architecture("BertForCausalLM", "some-bert")
    ortgenai.check_architecture("Gemma3ForCausalLM", "gemma-3-270m")  # the builder's own dispatch names it


def test_bad_precision(gguf_file):
    with pytest.raises(MedcError, match="use one of int4, fp32"):
        ortgenai.build_model(gguf_file, "int3")
