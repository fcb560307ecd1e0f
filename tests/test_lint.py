"""TensorRT-readiness lint (medc.compile.lint): real tiny bundles built for GPU targets pass, a CPU bundle fails, and
small hand-made graphs are rejected or accepted rule by rule. No TensorRT here: the lint is the CPU-side proof."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from medc.compile import tensorrt
from medc.compile.lint import lint_bundle, lint_model, parser_spec
from medc.compile.tensorrt import make_trt_ready
from medc.errors import MedcError

F, I64, I8 = TensorProto.FLOAT, TensorProto.INT64, TensorProto.INT8


# -- real bundles --------------------------------------------------------------------------------------------------------
def _build(tmp_path_factory, model: str, precision: str, target: str):
    from medc.compile.build import BuildOptions, build

    out = tmp_path_factory.mktemp("trt") / f"{model}-{precision}-{target}"
    build(BuildOptions(model=model, out=out, precision=precision, target=target))
    return out


@pytest.fixture(scope="session")
def siglip_t4_int8(tmp_path_factory):
    return _build(tmp_path_factory, "medsiglip-tiny", "int8", "t4")


@pytest.fixture(scope="session")
def gemma_orin_int4(tmp_path_factory):
    # Orin lists TensorRT 10.3 (JetPack 6.1/6.2) and 11.4 (JetPack 7.2): both parsers are checked.
    return _build(tmp_path_factory, "medgemma-tiny", "int4", "jetson-orin-nano-8gb")


def test_gpu_siglip_int8_bundle_is_trt_ready(siglip_t4_int8):
    report = lint_bundle(siglip_t4_int8, "t4")
    assert report.ok, report.render()
    assert set(report.components) == {"image_encoder", "text_encoder"} and report.tensorrt == ("10.13",)
    manifest = json.loads((siglip_t4_int8 / "manifest.json").read_text())
    for comp in manifest["components"].values():  # static Q/DQ, float bias (no int32 DequantizeLinear)
        assert comp["quantization"]["method"] == "int8-static-qdq" and comp["quantization"]["bias"] == "float"
        assert "ort-transformers" not in json.dumps(comp["optimizations"])  # no ORT contrib fusions for TensorRT


def test_gpu_gemma_int4_bundle_is_trt_ready(gemma_orin_int4):
    report = lint_bundle(gemma_orin_int4, "jetson-orin-nano-8gb")
    assert report.ok, report.render()
    assert report.tensorrt == ("10.3", "11.4")
    # The int4 decoder is opset 21 (blocked int4): above 10.3's documented range, a warning for 10.3 only.
    newer = [f for f in report.findings if f.rule == "opset-newer"]
    assert newer and all(f.component == "decoder" and f.tensorrt == ("10.3",) for f in newer)
    decoder = onnx.load(str(gemma_orin_int4 / "decoder.onnx"))
    inits = {t.name: t for t in decoder.graph.initializer}
    blocked = [n for n in decoder.graph.node if n.op_type == "DequantizeLinear"
               and inits[n.input[0]].data_type == TensorProto.INT4]
    assert blocked and all(any(a.name == "block_size" for a in n.attribute) for n in blocked)
    assert all((numpy_helper.to_array(inits[n.input[1]]) > 0).all() for n in blocked)  # TensorRT: scales > 0
    if (gemma_orin_int4 / "tensorrt" / "profiles.json").is_file():  # written by the TensorRT stage of the build
        assert "profiles-absent" not in report.rules() and "profile-missing" not in report.rules()


def test_cpu_bundle_is_not_trt_ready(bundle_int8):
    report = lint_bundle(bundle_int8, "t4")
    assert not report.ok
    errors = report.rules("error")
    assert "bundle-target" in errors and errors & {"op-contrib", "op-unsupported"}


def test_cli_exit_status_and_message(bundle_int8, siglip_t4_int8):
    from click.testing import CliRunner

    from medc.cli import main

    runner = CliRunner()
    bad = runner.invoke(main, ["lint", str(bundle_int8), "--target", "t4"])
    assert bad.exit_code == 1 and "not TRT-ready: rebuild with --target t4" in bad.output
    good = runner.invoke(main, ["lint", str(siglip_t4_int8), "--target", "t4", "--json"])
    assert good.exit_code == 0, good.output
    assert json.loads(good.stdout)["ok"] is True
    cpu = runner.invoke(main, ["lint", str(siglip_t4_int8), "--target", "cpu"])
    assert cpu.exit_code == 2 and "does not run TensorRT" in cpu.output


# -- the parser tables --------------------------------------------------------------------------------------------------
def test_parser_tables_per_version():
    v103, v1013, v114 = parser_spec("10.3"), parser_spec("10.13"), parser_spec("11.4")
    assert (v103.opset_max, v1013.opset_max, v114.opset_max) == (20, 23, 25)
    assert "HannWindow" not in v103.ops and "HannWindow" in v1013.ops  # added in 10.4
    assert "Attention" not in v1013.ops and "Attention" in v114.ops  # added in 10.14
    assert "FP4" not in v103.ops["DequantizeLinear"] and "INT4" in v103.ops["DequantizeLinear"]
    assert v103.ops["CumSum"] == {"FP32", "FP16", "BF16"} and "INT64" in v103.ops["Gather"]
    with pytest.raises(MedcError, match="8.6"):
        parser_spec("8.6")


# -- hand-made graphs ---------------------------------------------------------------------------------------------------
def _model(nodes, inputs, outputs, inits=(), opset=21, domains=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    opsets = [helper.make_opsetid("", opset), *(helper.make_opsetid(d, 1) for d in domains)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10)


def _vi(name, elem, shape):
    return helper.make_tensor_value_info(name, elem, shape)


def _qdq_matmul(zp=np.int8(0), scale=0.05, w_axis=1, w_scale=None, opset=21, qtype=I8):
    """x -> Q/DQ (activation, per tensor) -> MatMul(., DQ(W int8 per channel))."""
    w = np.arange(-8, 8, dtype=np.int8).reshape(4, 4)
    w_scale = np.full(4, 0.01, np.float32) if w_scale is None else w_scale
    inits = [numpy_helper.from_array(np.array(scale, np.float32), "s"), numpy_helper.from_array(w, "w"),
             numpy_helper.from_array(w_scale, "ws")]
    q_inputs = ["x", "s"]
    if zp is not None:
        inits.append(helper.make_tensor("zp", qtype, [], [int(zp)]))
        q_inputs.append("zp")
    nodes = [helper.make_node("QuantizeLinear", q_inputs, ["xq"], name="q"),
             helper.make_node("DequantizeLinear", ["xq", *q_inputs[1:]], ["xd"], name="dq"),
             helper.make_node("DequantizeLinear", ["w", "ws"], ["wd"], name="wdq", axis=w_axis),
             helper.make_node("MatMul", ["xd", "wd"], ["y"], name="mm")]
    return _model(nodes, [_vi("x", F, [2, 4])], [_vi("y", F, [2, 4])], inits, opset)


def _int4_matmul(block_size=32, zero_point=None, opset=21, per_channel=False):
    w = np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32)
    packed, scale = __import__("medc.compile.weight_only", fromlist=["x"]).int4_blocks(w, 32)
    wq = TensorProto(name="w4", data_type=TensorProto.INT4, dims=[64, 8], raw_data=packed.tobytes())
    if per_channel:
        scale = scale[0]
    inits = [wq, numpy_helper.from_array(scale, "s4")]
    ins = ["w4", "s4"]
    if zero_point is not None:
        inits.append(helper.make_tensor("z4", TensorProto.INT4, list(scale.shape), [zero_point] * scale.size))
        ins.append("z4")
    attrs = {"axis": 1 if per_channel else 0, **({"block_size": block_size} if block_size else {})}
    nodes = [helper.make_node("DequantizeLinear", ins, ["wd"], name="dq4", **attrs),
             helper.make_node("MatMul", ["x", "wd"], ["y"], name="mm")]
    return _model(nodes, [_vi("x", F, [2, 64])], [_vi("y", F, [2, 8])], inits, opset)


def _single(op, inputs, outputs, inits=(), opset=20, domain="", **attrs):
    node = helper.make_node(op, [i.name for i in inputs] + [t.name for t in inits], [o.name for o in outputs],
                            name="n", domain=domain, **attrs)
    return _model([node], inputs, outputs, inits, opset, domains=(domain,) if domain else ())


def _fp8_qdq():
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="q8"),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["y"], name="dq8")]
    inits = [numpy_helper.from_array(np.array(0.1, np.float32), "s"),
             helper.make_tensor("z", TensorProto.FLOAT8E4M3FN, [], [0.0])]
    return _model(nodes, [_vi("x", F, [2, 4])], [_vi("y", F, [2, 4])], inits, opset=20)


REJECTED = {
    "contrib op": (lambda: _single("MatMulNBits", [_vi("a", F, [2, 8])], [_vi("b", F, [2, 8])],
                                   domain="com.microsoft", K=8, N=8, bits=4, block_size=32), "t4", "op-contrib"),
    "double tensor": (lambda: _single("Cast", [_vi("a", F, [2])], [_vi("b", TensorProto.DOUBLE, [2])],
                                      to=TensorProto.DOUBLE), "t4", "dtype-double"),
    "asymmetric int8 zero point": (lambda: _qdq_matmul(zp=np.int8(3)), "t4", "qdq-zero-point"),
    "uint8 Q/DQ": (lambda: _qdq_matmul(zp=np.uint8(128), qtype=TensorProto.UINT8), "t4", "qdq-uint8"),
    "uint8 by default (no zero point)": (lambda: _qdq_matmul(zp=None), "t4", "qdq-uint8"),
    "negative weight scale": (lambda: _qdq_matmul(w_scale=np.array([0.01, -0.01, 0.01, 0.01], np.float32)), "t4",
                              "qdq-scale"),
    "int4 without block_size": (lambda: _int4_matmul(block_size=0, per_channel=True), "t4", "int4-not-blocked"),
    "int4 zero point != 0": (lambda: _int4_matmul(zero_point=1), "t4", "qdq-zero-point"),
    "int4 blocked below opset 21": (lambda: _int4_matmul(opset=20), "t4", "int4-opset"),
    "fp8 on Orin": (_fp8_qdq, "jetson-orin-nano-8gb", "fp8-target"),
    "int32 bias DequantizeLinear": (lambda: _single(
        "DequantizeLinear", [], [_vi("b", F, [4])], [helper.make_tensor("bq", TensorProto.INT32, [4], [1, 2, 3, 4]),
                                                    numpy_helper.from_array(np.array(0.1, np.float32), "bs")]),
                                    "t4", "qdq-type"),
    "unsupported ONNX op": (lambda: _single("Unique", [_vi("a", F, [4])], [_vi("b", F, [None])]), "t4",
                            "op-unsupported"),
    "CumSum on int64": (lambda: _single("CumSum", [_vi("a", I64, [2, 4])], [_vi("b", I64, [2, 4])],
                                        [numpy_helper.from_array(np.array(1, np.int64), "ax")]), "t4", "op-type"),
    "Resize cubic": (lambda: _single("Resize", [_vi("a", F, [1, 1, 4, 4])], [_vi("b", F, [1, 1, 8, 8])],
                                     [numpy_helper.from_array(np.array([], np.float32), "roi"),
                                      numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "sc")],
                                     mode="cubic"), "t4", "op-restriction"),
    "opset too old": (lambda: _single("Relu", [_vi("a", F, [4])], [_vi("b", F, [4])], opset=8), "t4",
                      "opset-too-old"),
}


@pytest.mark.parametrize("case", sorted(REJECTED))
def test_rejected(case):
    make, target, rule = REJECTED[case]
    report = lint_model(make(), target)
    assert not report.ok and rule in report.rules("error"), report.render()


def test_activation_per_channel_rejected():
    model = _qdq_matmul()
    s = next(t for t in model.graph.initializer if t.name == "s")
    s.CopyFrom(numpy_helper.from_array(np.full(4, 0.05, np.float32), "s"))
    z = next(t for t in model.graph.initializer if t.name == "zp")
    z.CopyFrom(numpy_helper.from_array(np.zeros(4, np.int8), "zp"))
    for node in model.graph.node[:2]:
        node.attribute.append(helper.make_attribute("axis", 1))
    assert "qdq-activation-per-channel" in lint_model(model, "t4").rules("error")


def test_accepted_graphs():
    assert lint_model(_qdq_matmul(), "t4").findings == []  # symmetric int8: per-tensor activation, per-channel W
    assert lint_model(_int4_matmul(), "jetson-orin-nano-8gb").ok  # blocked int4 weight-only, opset 21
    assert lint_model(_fp8_qdq(), "h100").ok  # fp8 where the hardware has it
    wrong_axis = lint_model(_qdq_matmul(w_axis=0), "t4")  # parses, but not along the output channels
    assert wrong_axis.ok and wrong_axis.rules() == {"qdq-weight-axis"}


def test_version_dependent_op():
    model = _single("HannWindow", [_vi("n", TensorProto.INT32, [])], [_vi("w", F, [None])])
    report = lint_model(model, "jetson-orin-nano-8gb")  # 10.3 lacks it (added in 10.4), 11.4 has it
    [finding] = [f for f in report.errors if f.rule == "op-unsupported"]
    assert finding.tensorrt == ("10.3",)


def test_dynamic_dims_need_profiles():
    model = _single("Relu", [_vi("x", F, ["batch", 8])], [_vi("y", F, ["batch", 8])])
    assert lint_model(model, "t4").rules() == {"profiles-absent"}  # nothing to check against: a note
    assert "profile-missing" in lint_model(model, "t4", profiles={}).rules("error")
    good = {"x": {"min": [1, 8], "opt": [2, 8], "max": [4, 8]}}
    assert lint_model(model, "t4", profiles=good).findings == []
    assert "profile-shape" in lint_model(model, "t4", profiles={"x": {"min": [1, 8], "opt": [2, 9],
                                                                       "max": [4, 8]}}).rules("error")
    huge = {"x": {"min": [1, 8], "opt": [1, 8], "max": [2**40, 8]}}  # 32 TiB of input: no target fits that
    assert "profile-memory" in lint_model(model, "t4", profiles=huge).rules("error")


def test_fp16_islands_are_info():
    nodes = [helper.make_node("Cast", ["x"], ["xh"], to=TensorProto.FLOAT16, name="c1"),
             helper.make_node("Relu", ["xh"], ["rh"], name="relu_fp16"),
             helper.make_node("Cast", ["rh"], ["r"], to=F, name="c2"),
             helper.make_node("Softmax", ["r"], ["y"], name="softmax_fp32")]
    report = lint_model(_model(nodes, [_vi("x", F, [2, 4])], [_vi("y", F, [2, 4])], opset=20), "t4",
                        precision="fp16")
    assert report.ok and report.rules() == {"fp16-island"} and "softmax_fp32" in report.findings[0].message


# -- make_trt_ready: exact cast islands ----------------------------------------------------------------------------------
def _block_ids_graph():
    """The decoder's image-block ids: token_type_ids == 1, padded left (bool Pad), run starts, CumSum on int64."""
    nodes = [
        helper.make_node("Equal", ["tt", "one"], ["img"], name="eq"),
        helper.make_node("Pad", ["img", "pads", "false"], ["padded"], name="pad"),
        helper.make_node("Slice", ["padded", "s0", "s1", "ax1"], ["prev"], name="slice"),
        helper.make_node("Not", ["prev"], ["notprev"], name="not"),
        helper.make_node("And", ["img", "notprev"], ["start"], name="and"),
        helper.make_node("Cast", ["start"], ["start64"], to=I64, name="cast"),
        helper.make_node("CumSum", ["start64", "ax"], ["cum"], name="cumsum"),
        helper.make_node("Where", ["img", "cum", "zero"], ["block"], name="where"),
    ]
    inits = [numpy_helper.from_array(np.array(1, np.int64), "one"),
             numpy_helper.from_array(np.array([0, 1, 0, 0], np.int64), "pads"),
             numpy_helper.from_array(np.array(False), "false"),
             numpy_helper.from_array(np.array([0], np.int64), "s0"),
             numpy_helper.from_array(np.array([-1], np.int64), "s1"),
             numpy_helper.from_array(np.array([1], np.int64), "ax1"),
             numpy_helper.from_array(np.array(1, np.int64), "ax"),
             numpy_helper.from_array(np.array(0, np.int64), "zero")]
    return _model(nodes, [_vi("tt", I64, ["batch", "seq"])], [_vi("block", I64, ["batch", "seq"])], inits,
                  opset=20)


def test_make_trt_ready_is_exact_and_clears_the_lint():
    import onnxruntime as ort

    original = _block_ids_graph()
    before = lint_model(original, "jetson-orin-nano-8gb")
    assert {f.name for f in before.errors if f.rule == "op-type"} == {"pad", "cumsum"}
    fixed = onnx.ModelProto()
    fixed.CopyFrom(original)
    make_trt_ready(fixed, "jetson-orin-nano-8gb")
    onnx.checker.check_model(fixed)
    assert lint_model(fixed, "jetson-orin-nano-8gb").ok
    rng = np.random.default_rng(0)
    feeds = {"tt": (rng.random((3, 300)) < 0.6).astype(np.int64)}
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)  # noqa: E731
    [a], [b] = run(original), run(fixed)
    assert a.dtype == b.dtype == np.int64 and np.array_equal(a, b) and a.max() > 10
    nodes = len(fixed.graph.node)
    assert len(make_trt_ready(fixed, "jetson-orin-nano-8gb").graph.node) == nodes  # idempotent


def test_make_trt_ready_file_keeps_external_weights(tmp_path):
    model = _block_ids_graph()
    model.graph.initializer.append(numpy_helper.from_array(np.ones((512, 512), np.float32), "big_unused"))
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path), save_as_external_data=True, location="m.onnx.data", size_threshold=1024)
    data = (tmp_path / "m.onnx.data").read_bytes()
    assert tensorrt.make_trt_ready_file(path, "t4") == {"CumSum:INT64->FLOAT": 1, "Pad:BOOL->INT32": 1}
    assert (tmp_path / "m.onnx.data").read_bytes() == data
    assert lint_model(onnx.load(str(path), load_external_data=False), "t4", base_dir=tmp_path).ok
    assert tensorrt.make_trt_ready_file(path, "t4") == {}


def test_int4_blocks_positive_scales_and_ort_parity():
    import onnxruntime as ort

    from medc.compile.weight_only import int4_blocks

    w = np.random.default_rng(1).standard_normal((70, 6)).astype(np.float32)  # K not a multiple of the block
    w[:32, 0] = np.abs(w[:32, 0])  # a block whose extreme is positive: ORT's symmetric form signs that scale
    packed, scale = int4_blocks(w, 32)
    assert scale.shape == (3, 6) and (scale > 0).all()
    model = _model([helper.make_node("DequantizeLinear", ["w4", "s4"], ["y"], axis=0, block_size=32)], [],
                   [_vi("y", F, [70, 6])],
                   [TensorProto(name="w4", data_type=TensorProto.INT4, dims=[70, 6], raw_data=packed.tobytes()),
                    numpy_helper.from_array(scale, "s4")])
    [deq] = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {})
    nibbles = np.stack([packed & 0x0F, packed >> 4], axis=1).reshape(-1)[:70 * 6].astype(np.int8)
    q = np.where(nibbles > 7, nibbles - 16, nibbles).reshape(70, 6)  # ONNX INT4: low nibble first
    assert np.array_equal(deq, q * np.repeat(scale, 32, axis=0)[:70])  # the layout ONNX Runtime reads
    assert np.linalg.norm(deq - w) / np.linalg.norm(w) < 0.1  # ~8.7% on N(0, 1) blocks of 32
