"""Bundle contents, manifest round-trip, integrity and target refusal, verify without torch."""

from __future__ import annotations

import json

import numpy as np
import pytest

import medc.runtime
from medc.errors import MedcError
from medc.manifest import Manifest, hash_files
from medc.runtime.verify import verify_bundle


def test_bundle_contents(bundle_fp32):
    m = Manifest.read(bundle_fp32)
    assert set(m.files) == {"image_encoder.onnx", "text_encoder.onnx", "golden.npz", "preprocessor_config.json",
                            "tokenizer/spiece.model"}
    assert m.files == hash_files(bundle_fp32)
    assert m.model["name"] == "medsiglip-tiny" and m.model["source"]["kind"] == "tiny"
    assert m.model["clinical_use"] is False and "NOT FOR CLINICAL USE" in m.model["warning"]
    for key in ("torch", "transformers", "onnx", "onnxruntime", "medc", "git_commit"):
        assert key in m.toolchain
    img = m.components["image_encoder"]
    assert [t.to_json() for t in img.inputs] == [{"name": "pixel_values", "dtype": "float32", "shape": ["batch", 3, 224, 224]}]
    assert set(m.extras) == {"logit_scale", "logit_bias"}
    assert m.preprocessing["image"]["resample_name"] == "bilinear" and m.preprocessing["image"]["pad_to_square"] is False
    assert m.build["seconds"] > 0 and m.build["peak_rss_mib"] > 0


def test_manifest_round_trip(bundle_int8):
    m = Manifest.read(bundle_int8)
    again = Manifest.from_json(json.loads(json.dumps(m.to_json())))
    assert again == m


def test_verify_passes(bundle_int8):
    report = verify_bundle(bundle_int8)
    assert set(report) == {"image_encoder", "text_encoder"}
    assert all(r["passed"] for r in report.values())
    stored = Manifest.read(bundle_int8).components["image_encoder"].fidelity["worst"]["cosine"]
    assert report["image_encoder"]["worst"]["cosine"] == pytest.approx(stored, abs=1e-6)


def test_tampered_bundle_refused(bundle_fp32, copy_bundle):
    b = copy_bundle(bundle_fp32)
    data = bytearray((b / "text_encoder.onnx").read_bytes())
    data[-10] ^= 0xFF
    (b / "text_encoder.onnx").write_bytes(bytes(data))
    with pytest.raises(MedcError, match="integrity check.*text_encoder.onnx"):
        medc.runtime.load(b)


def test_partial_bundle_refused(bundle_fp32, copy_bundle):
    b = copy_bundle(bundle_fp32)
    (b / "tokenizer" / "spiece.model").unlink()
    with pytest.raises(MedcError, match="incomplete: missing tokenizer/spiece.model"):
        medc.runtime.load(b)


def test_wrong_target_refused(bundle_fp32, bundle_fp16):
    with pytest.raises(MedcError, match="built for target 'cpu', not 'cuda'"):
        medc.runtime.load(bundle_fp32, target="cuda")
    with pytest.raises(MedcError, match="built for target 'cuda', not 'cpu'"):
        medc.runtime.load(bundle_fp16, target="cpu")


def test_not_a_bundle(tmp_path):
    with pytest.raises(MedcError, match="manifest.json is missing"):
        medc.runtime.load(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format_version": 99}))
    with pytest.raises(MedcError, match="format 99"):
        medc.runtime.load(tmp_path)


def test_golden_holds_real_inputs(bundle_fp32):
    golden = np.load(bundle_fp32 / "golden.npz")
    real = golden["image_encoder/real_images_b3/in/pixel_values"]
    assert real.shape == (3, 3, 224, 224) and real.std() > 0.1
    assert golden["image_encoder/real_images_b3/ref/image_embeds"].shape == (3, 64)


def test_optimised_graph_cached_under_its_export(tmp_path, monkeypatch, caplog):
    """A build of another precision reuses the optimised graph (the 270M decoder's pass: ~30 s): the same bytes and
    record as optimising again; a different export key or optimiser misses; no key, no cache."""
    import logging

    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from medc.compile import optimize

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("Relu", ["y"], ["z"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", 8])], [w])
    raw = tmp_path / "raw.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), raw)
    caplog.set_level(logging.INFO, logger="medc.compile.optimize")
    first = optimize.optimize_cached(raw, tmp_path / "a.xformers.onnx", "xformers", "k1")
    assert "reused" not in caplog.text
    (tmp_path / "b").mkdir()
    again = optimize.optimize_cached(raw, tmp_path / "b" / "a.xformers.onnx", "xformers", "k1")
    assert "reused from ~/.cache/medc/exports" in caplog.text
    assert again == first and first["nodes_after"] == 2
    assert (tmp_path / "b" / "a.xformers.onnx").read_bytes() == (tmp_path / "a.xformers.onnx").read_bytes()
    cached = sorted(p.name for p in (tmp_path / "home" / ".cache" / "medc" / "exports").iterdir())
    assert len(cached) == 1 and cached[0].startswith("k1-opt-")
    optimize.optimize_cached(raw, tmp_path / "a.none.onnx", "none", "k1")  # another optimiser: its own entry
    optimize.optimize_cached(raw, tmp_path / "c.xformers.onnx", "xformers", None)  # no export key: not cached
    assert len(list((tmp_path / "home" / ".cache" / "medc" / "exports").iterdir())) == 2
    optimize.optimize_cached(raw, tmp_path / "a.xformers.onnx", "xformers", "k1", split=True)  # CPU form: its own
    assert len(list((tmp_path / "home" / ".cache" / "medc" / "exports").iterdir())) == 3
