"""Precision presets and recipe files: what each component (and the decoder's lm_head) is built in."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medc.compile.plan import BuildOptions, plan_for
from medc.compile.spec import DecoderSettings
from medc.errors import MedcError


def _plan(tmp_path, **kw):
    return plan_for(BuildOptions(model="medgemma-tiny", out=tmp_path / "b", **kw))


def test_presets(tmp_path):
    p = _plan(tmp_path, precision="int4")
    assert p.recipe.precisions == {"vision_encoder": "int8", "embed_tokens": "int8", "decoder": "int4",
                                   "lm_head": "int4"}
    dec = {c.name: c for c in p.components}["decoder"]
    assert dec.methods == ["weight-only"] and dec.weight_only.form == "nbits" and dec.weight_only.lm_head == "int4"
    # CPU target, ORT flavour: GroupQueryAttention decoder whose int4 lm_head's conversion rescores its top 1024
    # logits (a graph edit: the export is the same as for any other precision)
    assert p.decoder == DecoderSettings("gqa", 512) and dec.weight_only.rescore == 1024
    # The token embeddings: int8 blocks (compile/embedding.py), GatherBlockQuantized on the ORT flavour.
    emb = {c.name: c for c in p.components}["embed_tokens"]
    assert emb.methods == ["embedding"] and emb.embedding.form == "GatherBlockQuantized"
    # A GPU target: the same int8 embeddings, the vision encoder is calibrated Q/DQ only.
    gp = _plan(tmp_path, precision="int4", target="cuda")
    g = {c.name: c for c in gp.components}
    assert g["embed_tokens"].precision == "int8" and g["vision_encoder"].methods == ["int8-static-qdq"]
    # ... and the explicit decoder: onnxruntime-gpu 1.31.1 refuses the GQA slot form (benchmarks/cuda_check.py, H200)
    assert gp.decoder.form == "explicit" and g["decoder"].weight_only.rescore == 0


def test_explicit_list_and_lm_head(tmp_path):
    p = _plan(tmp_path, precision="decoder=int4,lm_head=int8")
    assert p.recipe.precisions["lm_head"] == "int8" and p.recipe.precisions["vision_encoder"] == "fp32"
    assert _plan(tmp_path, precision="decoder=int4").recipe.precisions["lm_head"] == "int4"  # follows decoder
    # An fp32 decoder with a quantised lm_head is still a weight-only conversion.
    dec = {c.name: c for c in _plan(tmp_path, precision="lm_head=int8").components}["decoder"]
    assert dec.precision == "fp32" and dec.methods == ["weight-only"]


def test_portable_flavour(tmp_path):
    p = _plan(tmp_path, precision="int4", flavour="portable")
    dec = {c.name: c for c in p.components}["decoder"]
    assert dec.weight_only.form == "qdq" and dec.optimizer == "none"
    assert p.decoder == DecoderSettings("explicit", 512) and dec.weight_only.rescore == 0
    assert "portable" in _plan(tmp_path, precision="int4", flavour="portable").render()


def test_recipe_file(tmp_path):
    toml = tmp_path / "r.toml"
    toml.write_text('[precision]\ndecoder = "int4"\nlm_head = "int8"\nvision_encoder = "int8"\n'
                    "[options]\nint4_block_size = 64\n")
    p = _plan(tmp_path, recipe=toml)
    assert p.recipe.source == "file:r.toml" and p.recipe.options == {"int4_block_size": 64}
    dec = {c.name: c for c in p.components}["decoder"]
    assert dec.weight_only.int4_block_size == 64 and dec.weight_only.lm_head == "int8"
    shipped = Path(__file__).parents[1] / "benchmarks" / "recipes" / "gemma3-270m-int4.toml"
    shipped_dec = {c.name: c for c in _plan(tmp_path, recipe=shipped).components}["decoder"]
    assert shipped_dec.precision == "int8" and shipped_dec.weight_only.lm_head == "int4"
    assert shipped_dec.weight_only.rescore == 1024
    js = tmp_path / "r.json"
    js.write_text(json.dumps({"precision": {"decoder": "int8"}}))
    assert _plan(tmp_path, recipe=js).recipe.precisions["decoder"] == "int8"


@pytest.mark.parametrize("kw, message", [
    ({"precision": "int3"}, "unknown precision 'int3'"),
    ({"precision": "decoder=int9"}, "unknown precision 'int9' for decoder"),
    ({"precision": "lm_hed=int8"}, "names component 'lm_hed'; this model has"),
    ({"precision": "embed_tokens=int4", "flavour": "portable"}, "embed_tokens=int4 has no portable \\(TensorRT\\)"),
    ({"precision": "fp16"}, "target cpu does not offer fp16"),
    ({"precision": "int4", "flavour": "tensorrt"}, "unknown graph flavour"),
])
def test_bad_precisions(tmp_path, kw, message):
    with pytest.raises(MedcError, match=message):
        _plan(tmp_path, **kw)


@pytest.mark.parametrize("text, message", [
    ("[precision\n", "not valid TOML"),
    ("[options]\nint4_block_size = 64\n", "needs a 'precision' table"),
    ('[precision]\ndecoder = "int4"\n[options]\nint4_block_size = 48\n', "int4_block_size = 48"),
    ('[precision]\ndecoder = "int4"\n[options]\ngroup = 1\n', "recipe option 'group' is unknown"),
    ('[precision]\ndecoder = "int4"\n[extra]\n', "unknown section"),
    ('[precision]\ndecoder = "int4"\n[options]\nint4_projections = ["o_proj", "x"]\n', "int4_projections"),
])
def test_bad_recipe_files(tmp_path, text, message):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(MedcError, match=message):
        _plan(tmp_path, recipe=f)
    with pytest.raises(MedcError, match="does not exist"):
        _plan(tmp_path, recipe=tmp_path / "missing.toml")
