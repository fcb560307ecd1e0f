"""The OpenVINO GenAI baseline (benchmarks/ovgenai.py) on real Gemma 3 270M weights: exported by optimum-intel from
the Q4_K_M GGUF (dequantised to fp32 by medc's loader), greedy tokens checked against HF transformers.

The fp32 export takes about 45 s on a 2-core machine the first time (then ~/.cache/medc/openvino-genai/ has it). The
export needs optimum-intel with a transformers it supports (see ovgenai.EXPORT_RECIPE); without one the test skips."""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import pytest
from medc.errors import MedcError

pytest.importorskip("openvino_genai", reason="openvino-genai is not installed (pip install 'medc[baselines]')")

from medc.benchmarks import ovgenai



@pytest.fixture(scope="module")
def built(gguf_file) -> Path:
    try:
        ovgenai.exporter_versions(ovgenai.exporter_python())
    except MedcError as e:
        pytest.skip(str(e))
    return ovgenai.build_model(gguf_file, "fp32")


def test_greedy_matches_transformers(gguf_file, built):
    from medc.benchmarks.generation import hf_generate_timed
    from medc.compile import loader
    from tokenizers import Tokenizer

    loaded = loader.load(str(gguf_file))
    # f32 compute: the CPU plugin's default on AMX / AVX512-BF16 hosts is bf16, which would test bf16, not the export.
    handle = ovgenai.load(built, threads=2, config={"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f32"})
    text = Tokenizer.from_file(str(built / "tokenizer.json")).encode("A chest radiograph is", add_special_tokens=False)
    ids = [loaded.config.bos_token_id] + text.ids
    t0, stamps, tokens = ovgenai.generate_timed(handle, ids, 16)
    assert len(stamps) == len(tokens) == 16
    assert t0 < stamps[0] and all(a < b for a, b in pairwise(stamps))
    _, _, ref = hf_generate_timed(loaded.hf_model, ids, 16)
    agree = next((i for i, (a, b) in enumerate(zip(tokens, ref)) if a != b), len(ref))
    assert agree >= 8, f"OpenVINO GenAI and transformers agree on only {agree} greedy tokens: {tokens} vs {ref}"
    # A second build of the same source is the cache entry, not a re-export.
    assert ovgenai.build_model(gguf_file, "fp32") == built


def test_bad_weights(gguf_file):
    with pytest.raises(MedcError, match="use one of int4, int8, fp32"):
        ovgenai.build_model(gguf_file, "int3")
