"""fp16 with fp32 islands for Gemma 3 decoders (medc.compile.fp16): finite and close to fp32 where whole-graph fp16
overflows.

fp16 outputs are checked through `fp16.cpu_emulation`: on x86, ONNX Runtime's CPU provider runs most fp16 ops in fp32
and drops the rounding between them, so an fp16 graph run as is would hide an overflow
(test_emulation_shows_fp16_overflow).
"""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from medc.compile import export, fp16, loader, optimize, quantize
from medc.compile.models import gemma3
from medc.compile.quantize import ConvertOptions

SCALE = 1e5  # layer 0's up_proj weights: its activations reach ~7e5 and down_proj's ~1e6, far above fp16's 65504
DECODER = ConvertOptions(fp16_islands=True)  # what makes quantize's "fp16" a decoder conversion


def _cosine(a, b) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _run(model, feeds: dict) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    return session.run(["logits"], {k: v for k, v in feeds.items() if k in names})[0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny MedGemma decoder exported once, its golden cases (prefill with an image, cached decode at batch 3)
    and the torch fp32 logits, as-is and with layer 0's up_proj scaled by SCALE (the ONNX weight is scaled by value,
    no second export). Gemma's post-feed-forward RMSNorm cancels the scale: the logits barely move."""
    loaded = loader.load("medgemma-tiny")
    comp = {c.name: c for c in loaded.family.components(loaded.config)}["decoder"]
    module = comp.extract(loaded.hf_model)
    work = tmp_path_factory.mktemp("fp16")
    example = comp.dummy_inputs(loaded, 2, np.random.default_rng(0))
    export.export_cached(module, comp, example, work / "raw.onnx", export.cache_key(loaded, comp))  # builds' export
    mlp = gemma3._parts(loaded.hf_model)[0].layers[0].mlp
    peaks = {}  # max |output| of layer 0's up_proj and down_proj in torch fp32

    def peak(name):
        return lambda mod, args, out: peaks.__setitem__(name, max(peaks.get(name, 0.0), out.abs().max().item()))

    hooks = [mlp.up_proj.register_forward_hook(peak("up_proj")), mlp.down_proj.register_forward_hook(peak("down_proj"))]
    with torch.no_grad():
        golden = comp.golden_inputs(loaded)
        ref = {k: module(*export.module_args(module, comp, f))[0].numpy() for k, f in golden.items()}
        peaks.clear()
        original = mlp.up_proj.weight.detach().clone()
        mlp.up_proj.weight.copy_(original * SCALE)
        try:
            ref_scaled = {k: module(*export.module_args(module, comp, f))[0].numpy() for k, f in golden.items()}
        finally:
            mlp.up_proj.weight.copy_(original)  # the loaded model is shared by nothing else, but leave it as found
    for h in hooks:
        h.remove()
    model = onnx.load(str(work / "raw.onnx"))
    weight = original.numpy().T  # the exporter stores Linear weights transposed, under its own names
    hits = [t for t in model.graph.initializer if tuple(t.dims) == weight.shape
            and np.array_equal(numpy_helper.to_array(t), weight)]
    assert len(hits) == 1
    hits[0].CopyFrom(numpy_helper.from_array(weight * np.float32(SCALE), hits[0].name))
    onnx.save(model, str(work / "scaled.onnx"))
    graphs = {}

    def graph(name: str, optimizer: str):  # the build's order: export, optimise, convert
        if (name, optimizer) not in graphs:
            dst = work / f"{name}.{optimizer}.onnx"
            optimize.optimize(work / f"{name}.onnx", dst, optimizer, isolate=False)
            graphs[name, optimizer] = dst
        return graphs[name, optimizer]

    return SimpleNamespace(golden=golden, ref=ref, ref_scaled=ref_scaled, peaks=peaks, graph=graph,
                           calibration=[golden["prefill_b1"]])  # decode_b3 stays held out


@pytest.mark.parametrize("optimizer", ["none", "xformers"])
def test_islands_match_fp32(tiny, optimizer, tmp_path):
    record = quantize.convert("fp16", tiny.graph("raw", optimizer), tmp_path / "d.onnx",
                              replace(DECODER, fp16_feeds=tiny.calibration), isolate=False)
    model = onnx.load(str(tmp_path / "d.onnx"))
    for case, feeds in tiny.golden.items():
        for graph in (model, fp16.cpu_emulation(model)):
            logits = _run(graph, feeds)
            assert np.isfinite(logits).all()
            assert _cosine(logits, tiny.ref[case]) >= 0.999, case
    islands = record["fp32_islands"]
    if optimizer == "none":  # 4 layers: 2 residual Adds each, and the norms that read the stream
        assert islands["why"]["residual stream"]["count"] >= 8
    else:  # fused: SkipSimplifiedLayerNormalization carries the stream and is kept by op type
        assert "SkipSimplifiedLayerNormalization" in islands["op_types"]
    assert 0 < islands["why"]["rotary angles"]["count"] <= 12  # the angle subgraph only, not the network
    assert "Softmax" in islands["op_types"] and islands["measured"]["feeds"] == 1
    if optimizer == "none":
        onnx.checker.check_model(model)  # standard ops only: the result is valid ONNX (topologically sorted)
    # Without feeds (the structural islands only) the unscaled decoder is fine too
    record = quantize.convert("fp16", tiny.graph("raw", optimizer), tmp_path / "s.onnx", DECODER, isolate=False)
    assert record["fp32_islands"]["measured"]["feeds"] == 0
    emulated = fp16.cpu_emulation(onnx.load(str(tmp_path / "s.onnx")))
    assert all(_cosine(_run(emulated, f), tiny.ref[c]) >= 0.999 for c, f in tiny.golden.items())
    # Unscaled, nothing but attention masks (fill value -3.4e38) measures above the threshold: every MatMul is fp16.
    inits = {t.name: t.data_type for t in model.graph.initializer}
    assert all(inits[n.input[1]] == TensorProto.FLOAT16 for n in model.graph.node
               if n.op_type == "MatMul" and n.input[1] in inits)


@pytest.mark.parametrize("optimizer", ["none", "xformers"])
def test_forced_overflow(tiny, optimizer, tmp_path):
    # (a) the overflow is real: fp32 activations above fp16's range, logits unchanged by the scale
    assert tiny.peaks["up_proj"] > 65504 and tiny.peaks["down_proj"] > 1e5
    for case in tiny.golden:
        assert _cosine(tiny.ref_scaled[case], tiny.ref[case]) > 0.99999
    src = tiny.graph("scaled", optimizer)
    quantize.convert("fp16", src, tmp_path / "whole.onnx", isolate=False)
    record = quantize.convert("fp16", src, tmp_path / "islands.onnx", replace(DECODER, fp16_feeds=tiny.calibration),
                              isolate=False)
    measured = record["fp32_islands"]["measured"]
    assert max(v for v in measured["above_threshold"].values() if v < 1e30) > 1e5  # the ONNX graph sees it too
    whole = fp16.cpu_emulation(onnx.load(str(tmp_path / "whole.onnx")))
    islands = onnx.load(str(tmp_path / "islands.onnx"))
    for case, feeds in tiny.golden.items():
        # (b) whole-graph fp16: inf/NaN, or far from fp32
        logits = _run(whole, feeds)
        assert not np.isfinite(logits).all() or _cosine(logits, tiny.ref_scaled[case]) < 0.99, case
        # (c) islands: finite and within the fidelity bar, on the held-out decode case too
        for graph in (islands, fp16.cpu_emulation(islands)):
            logits = _run(graph, feeds)
            assert np.isfinite(logits).all()
            assert _cosine(logits, tiny.ref_scaled[case]) >= 0.999, case
    # The scaled up_proj MatMul is an island, and its weight, read by fp32 nodes only, stays fp32 (no Cast per call)
    scaled = {t.name for t in islands.graph.initializer if t.data_type == TensorProto.FLOAT
              and np.abs(numpy_helper.to_array(t)).max() > 100}
    assert scaled and any(n.op_type == "MatMul" and scaled & set(n.input) for n in islands.graph.node)


def _toy(tmp_path):
    """y = (x * 1e6) * 1e-6 + x: the intermediate overflows fp16, the output does not."""
    nodes = [helper.make_node("Mul", ["x", "big"], ["up"], name="up"),
             helper.make_node("Mul", ["up", "small"], ["down"], name="down"),
             helper.make_node("Add", ["down", "x"], ["logits"], name="add")]
    graph = helper.make_graph(
        nodes, "toy", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [2])],
        [numpy_helper.from_array(np.array([1e6], np.float32), "big"),
         numpy_helper.from_array(np.array([1e-6], np.float32), "small")],
        value_info=[helper.make_tensor_value_info(n, TensorProto.FLOAT, [2]) for n in ("up", "down")])
    path = tmp_path / "toy.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), str(path))
    return path


def test_no_fp16_round_trip_between_fp32_nodes(tmp_path):
    """ORT's converter casts a tensor between two fp32 nodes to fp16 and back; the islands must not."""
    x = {"x": np.array([1.5, -2.0], np.float32)}
    record = fp16.convert_fp16(_toy(tmp_path), tmp_path / "out.onnx", [x])
    assert record["fp32_islands"]["why"]["measured above threshold"]["nodes"] == ["down", "up"]  # writer, reader
    assert record["fp32_islands"]["round_trips_removed"] >= 1
    model = onnx.load(str(tmp_path / "out.onnx"))
    onnx.checker.check_model(model)
    for graph in (model, fp16.cpu_emulation(model)):
        np.testing.assert_allclose(_run(graph, x), 2 * x["x"], rtol=1e-6)


def test_emulation_shows_fp16_overflow(tmp_path):
    """Why the tests emulate: 300 * 300 overflows fp16 on a GPU, and in the emulation on the CPU. ONNX Runtime's CPU
    provider, given the fp16 graph itself, computes the whole chain in fp32 on x86 and returns the fp32 answer."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(_toy(tmp_path)))
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.array([300.0], np.float32), "big"))
    model.graph.initializer[1].CopyFrom(numpy_helper.from_array(np.array([1 / 300], np.float32), "small"))
    half = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=True)
    x = {"x": np.array([300.0, 1.0], np.float32)}  # 300 * 300 = 90000 > 65504
    assert not np.isfinite(_run(fp16.cpu_emulation(half), x)).all()


def test_repeated_casts_from_older_converters_are_dropped():
    """onnxruntime < 1.32's fp16 converter wrote one Cast per fp32 reader of an fp16 tensor, all alike (same name,
    same output): ONNX Runtime refuses such a graph (seen with onnxruntime-gpu 1.31.1 on an H200). One is kept."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT16, [2])
    ys = [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [2]) for i in range(2)]
    cast = lambda: helper.make_node("Cast", ["x"], ["x_cast_to_fp32"], to=TensorProto.FLOAT, name="x_cast_to_fp32_node")  # noqa: E731
    nodes = [cast(), helper.make_node("Softmax", ["x_cast_to_fp32"], ["y0"]), cast(),
             helper.make_node("Relu", ["x_cast_to_fp32"], ["y1"])]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], ys), opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(Exception, match="same node name|Duplicate"):
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    fp16._drop_repeated_casts(model.graph)
    assert [n.op_type for n in model.graph.node] == ["Cast", "Softmax", "Relu"]
    feeds = {"x": np.array([1.0, -2.0], np.float16)}
    y0, y1 = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    np.testing.assert_allclose(y1, [1.0, 0.0])
    np.testing.assert_allclose(y0, np.exp([1.0, -2.0]) / np.exp([1.0, -2.0]).sum(), rtol=1e-6)
