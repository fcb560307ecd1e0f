"""Quantised token embeddings (compile/embedding.py): tiny MedGemma's embed_tokens at int8 and int4 in ONNX
Runtime's GatherBlockQuantized form and at int8 in the portable (TensorRT) form, against the fp32 table; rows checked
against the stored bytes dequantised by hand; generation through the runtime; the planner's bytes; the lint's rule."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from medc.compile.build import BuildOptions, build
from medc.compile.lint import lint_model
from medc.compile.plan import plan_for
from medc.errors import MedcError
from medc.manifest import Manifest
from medc.runtime.session import OrtSession

from test_planner import check_plan_against_bundle


@pytest.fixture(scope="module")
def embed_int4(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("embed") / "int4"
    build(BuildOptions(model="medgemma-tiny", out=out, precision="embed_tokens=int4"))
    return out


@pytest.fixture(scope="module")
def embed_portable(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("embed") / "portable"
    build(BuildOptions(model="medgemma-tiny", out=out, precision="embed_tokens=int8", flavour="portable"))
    return out


def _embed(bundle: Path, ids: np.ndarray) -> np.ndarray:
    with OrtSession(bundle / "embed_tokens.onnx", ["CPUExecutionProvider"]) as s:
        return s.run({"input_ids": ids})["inputs_embeds"]


def _by_hand(bundle: Path, ids: np.ndarray) -> np.ndarray:
    """The rows the stored bytes hold, dequantised here in numpy from the graph's initializers, times the graph's
    sqrt(hidden) constant."""
    model = onnx.load(str(bundle / "embed_tokens.onnx"))
    inits = {t.name: t for t in model.graph.initializer}
    scales = numpy_helper.to_array(next(t for n, t in inits.items() if n.endswith("_scales")))
    norm = float(numpy_helper.to_array(next(t for n, t in inits.items() if n.endswith("embed_scale"))))
    data = next(t for t in inits.values() if len(t.dims) == 2 and t.data_type in (onnx.TensorProto.UINT8,
                                                                                  onnx.TensorProto.INT8,
                                                                                  onnx.TensorProto.INT4))
    v, h = data.dims
    raw = np.frombuffer(data.raw_data, np.uint8)
    if data.data_type == onnx.TensorProto.UINT8:  # GatherBlockQuantized, 8 bits: default zero point 128
        q = raw.astype(np.int32).reshape(v, h) - 128
    elif data.data_type == onnx.TensorProto.INT8:
        q = raw.view(np.int8).astype(np.int32).reshape(v, h)
    else:  # INT4: two values a byte, low nibble first
        nib = np.stack([raw & 0x0F, raw >> 4], axis=-1).reshape(-1).astype(np.int32)
        q = np.where(nib > 7, nib - 16, nib).reshape(v, h)
    block = h // scales.shape[1]
    rows = (q.reshape(v, -1, block) * scales[..., None].astype(np.float64)).reshape(v, h)
    return (rows[ids] * norm).astype(np.float32)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(-1, a.shape[-1]).astype(np.float64), b.reshape(-1, b.shape[-1]).astype(np.float64)
    return float(((a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))).min())


@pytest.mark.parametrize("which, precision, form, bar", [
    ("gemma_int8", "int8", "GatherBlockQuantized", 0.99),
    ("embed_int4", "int4", "GatherBlockQuantized", 0.98),
    ("embed_portable", "int8", "Gather int8 + DequantizeLinear", 0.99),
])
def test_quantised_rows_are_the_stored_bytes(request, gemma_fp32, which, precision, form, bar):
    bundle = request.getfixturevalue(which)  # gemma_int8: the int8 preset quantises embed_tokens too
    entry = Manifest.read(bundle).components["embed_tokens"]
    assert entry.precision == precision and entry.fidelity["passed"]
    q = entry.quantization
    assert (q["method"], q["format"], q["bits"], q["block_size"]) == ("embedding", form, int(precision[3:]), 32)
    ids = np.array([[0, 1, 2, 7, 100, 383], [5, 5, 300, 42, 9, 11]], np.int64)
    got = _embed(bundle, ids)
    np.testing.assert_allclose(got, _by_hand(bundle, ids), rtol=1e-6, atol=1e-6)
    assert _cosine(got, _embed(gemma_fp32, ids)) >= bar


def test_portable_form_is_standard_ops_and_linted(embed_portable):
    model = onnx.load(str(embed_portable / "embed_tokens.onnx"))
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}
    report = lint_model(model, "jetson-orin-nano-8gb", component="embed_tokens")
    assert not report.errors, [f.message for f in report.errors]
    assert [f.rule for f in report.findings if f.severity == "warning"] == ["embed-int8-gather"]


def test_int4_portable_is_refused_naming_the_rule(tmp_path):
    with pytest.raises(MedcError, match="no portable \\(TensorRT\\) form.*int4 only as a weight"):
        plan_for(BuildOptions(model="medgemma-tiny", out=tmp_path / "x", precision="embed_tokens=int4",
                              flavour="portable"))


def test_generation_runs_and_planner_counts_the_stored_bytes(embed_int4, embed_portable):
    import medc.runtime

    for bundle in (embed_int4, embed_portable):
        with medc.runtime.load(bundle) as model:
            assert len(model.generate("Is there a pneumothorax?", max_new_tokens=4)) > 0
        sizes = check_plan_against_bundle(bundle, "medgemma-tiny", rel=0.01)
        planned, disk = sizes["embed_tokens"]
        assert disk == pytest.approx(planned, rel=0.01)
