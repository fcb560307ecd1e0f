"""W4A16 / W8A16 on GPU targets (compile/weight_only.py `quantize_half`): an int4/int8 decoder keeps its weights
quantised and runs fp16 activations with Gemma 3's fp32 islands (compile/fp16.py) and an fp16 KV cache; CPU targets
keep fp32 activations. Built from the tiny MedGemma for the Orin Nano (TensorRT form: blocked DequantizeLinear) and
the `cuda` target (ONNX Runtime form: MatMulNBits); gated on this CPU with fp16 rounding emulated."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto

import medc.runtime
from medc.compile import planner
from medc.compile.build import BuildOptions, build
from medc.compile.lint import lint_bundle
from medc.compile.plan import resolve
from medc.manifest import Manifest
from medc.runtime.gemma import build_prompt_batch
from conftest import decode, prefill

ORIN = "jetson-orin-nano-8gb"
PROMPTS = ["Is there a pneumothorax?", "List three causes of pleural effusion in an adult patient."]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("w4a16")
    out = {}
    for name, target, precision in (("orin-int4", ORIN, "int4"), ("orin-int8", ORIN, "int8"),
                                    ("cuda-int4", "cuda", "int4"), ("cuda-int8", "cuda", "int8")):
        out[name] = root / name
        build(BuildOptions(model="medgemma-tiny", out=out[name], target=target, precision=precision))
    return out


def _types(graph) -> dict[str, int]:
    types = {v.name: v.type.tensor_type.elem_type for v in (*graph.value_info, *graph.input, *graph.output)}
    types.update({t.name: t.data_type for t in graph.initializer})
    return types


def _check_io(graph, types) -> None:
    """The KV cache in fp16; what callers feed and read (embeddings, logits) stays fp32."""
    kv = [v.name for v in (*graph.input, *graph.output) if v.name.startswith(("past_", "present_"))]
    assert len(kv) == 4 * 4 and all(types[n] == TensorProto.FLOAT16 for n in kv)
    assert types["inputs_embeds"] == types["logits"] == TensorProto.FLOAT


@pytest.mark.parametrize("name, weight", [("orin-int4", TensorProto.INT4), ("orin-int8", TensorProto.INT8)])
def test_tensorrt_form(bundles, name, weight):
    graph = onnx.load(str(bundles[name] / "decoder.onnx")).graph
    types = _types(graph)
    _check_io(graph, types)
    producer = {o: n for n in graph.node for o in n.output}
    weighted = [n for n in graph.node if n.op_type == "MatMul" and n.input[1] in producer
                and producer[n.input[1]].op_type == "DequantizeLinear"]
    assert len(weighted) == 7 * 4  # q k v o gate up down x 4 layers: none kept fp32 on the tiny model
    # the lm_head: int8 rows [V, H] transposed into its MatMul (stored once with the token embeddings)
    head = [producer[producer[n.input[1]].input[0]] for n in graph.node if n.op_type == "MatMul"
            and producer[n.input[1]].op_type == "Transpose" and producer[n.input[1]].input[0] in producer
            and producer[producer[n.input[1]].input[0]].op_type == "DequantizeLinear"]
    assert len(head) == 1 and types[head[0].input[0]] == TensorProto.INT8
    for mm in weighted:
        dq = producer[mm.input[1]]
        assert types[dq.input[0]] == weight and types[dq.input[1]] == TensorProto.FLOAT16  # fp16 scales
        assert types[dq.output[0]] == TensorProto.FLOAT16 and types[mm.input[0]] == TensorProto.FLOAT16
    manifest = Manifest.read(bundles[name])
    q = manifest.components["decoder"].quantization
    bits = 4 if weight == TensorProto.INT4 else 8
    scheme = "W4A16, lm_head W8A16" if bits == 4 else "W8A16"  # TensorRT targets: an int8 lm_head (no rescoring)
    assert q["scheme"] == scheme and q["kv_dtype"] == "float16" and q["activations"].startswith("float16")
    assert q["fp32_islands"]["nodes_fp32"] > 0 and "Softmax" in q["fp32_islands"]["op_types"]
    assert q["gated_on"].startswith("CPU with fp16 rounding emulated")
    assert manifest.generation["kv_dtype"] == "float16"
    assert manifest.components["decoder"].fidelity["passed"] and manifest.build["generation_gate"]["passed"]
    assert "decoder.onnx" in manifest.build["generation_gate"]["gated_on"]  # the whole-model gate emulated fp16 too
    report = lint_bundle(bundles[name], ORIN)
    assert report.ok, report.render()


@pytest.mark.parametrize("name", ["cuda-int4", "cuda-int8"])
def test_onnxruntime_cuda_form(bundles, name):
    graph = onnx.load(str(bundles[name] / "decoder.onnx")).graph
    types = _types(graph)
    _check_io(graph, types)
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 7 * 4 + 1
    assert all(types[n.input[0]] == TensorProto.FLOAT16 and types[n.input[2]] == TensorProto.FLOAT16 for n in nbits)
    manifest = Manifest.read(bundles[name])
    assert manifest.components["decoder"].quantization["scheme"] == "W4A16" if name == "cuda-int4" else "W8A16"
    assert manifest.components["decoder"].fidelity["passed"] and manifest.build["generation_gate"]["passed"]


@pytest.mark.parametrize("form, bits", [("nbits", "int8"), ("nbits", "int4"), ("qdq", "int8"), ("qdq", "int4")])
def test_fp16_weight_quantises_as_fp32(form, bits):
    """An fp16 graph's weight (W4A16 / W8A16) dequantises to what the same weight in fp32 does, within fp16's
    rounding of the scales: ONNX Runtime's 8-bit quantiser signs its scales, and fp16 storage keeps the sign."""
    import onnx_ir as ir
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    from medc.compile import weight_only

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((64, 48)) * 0.1).astype(np.float16)
    a = rng.standard_normal((3, 64)).astype(np.float32)
    out = {}
    for dtype, t in ((np.float32, TensorProto.FLOAT), (np.float16, TensorProto.FLOAT16)):
        g = helper.make_graph([helper.make_node("MatMul", ["A", "W"], ["Y"], name="mm")], "g",
                              [helper.make_tensor_value_info("A", t, [3, 64])],
                              [helper.make_tensor_value_info("Y", t, [3, 48])],
                              [numpy_helper.from_array(w.astype(dtype), "W")])
        model = ir.serde.deserialize_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)]))
        weight_only.quantize_weights(model, weight_only.graph_weights(model),
                                     weight_only.WeightOnlyConfig(precision=bits, lm_head=bits, form=form),
                                     weight_only.MemorySink())
        proto = ir.serde.serialize_model(model).SerializeToString()
        sess = ort.InferenceSession(proto, providers=["CPUExecutionProvider"])
        out[dtype] = sess.run(None, {"A": a.astype(dtype)})[0].astype(np.float32)
    ref = a @ w.astype(np.float32)
    tol = 0.01 if bits == "int8" else 0.1  # relative to the largest output
    assert np.abs(out[np.float32] - ref).max() < tol * np.abs(ref).max()
    assert np.abs(out[np.float16] - out[np.float32]).max() < 0.01 * np.abs(ref).max()


@pytest.mark.parametrize("name", ["orin-int4", "cuda-int4"])
def test_runtime_fp16_cache(bundles, name):
    """Greedy tokens through the cached fp16 KV (prefill, then one token a step) equal those of the same graph
    recomputing the whole sequence each step from an empty cache."""
    with medc.runtime.load(bundles[name]) as m:
        cached = m.generate_ids(PROMPTS[:1], max_new_tokens=6, ignore_eos=True)[0]
        ids = build_prompt_batch(m.assets, PROMPTS[:1]).input_ids[0].tolist()
        dec = m.decoder(1)
        recomputed = []
        for _ in range(6):
            recomputed.append(int(prefill(m, dec, 0, ids + recomputed)[-1].argmax()))
        assert all(v.dtype == np.float16 for v in dec.cache(0).values())
        decode(m, dec, {0: recomputed[-1]})  # a cached step on an fp16 cache the prefill left
        assert all(v.dtype == np.float16 for v in dec.cache(0).values())
    assert cached == recomputed


def test_planner_kv_halves():
    """fp16 KV on GPU targets for int4/int8 decoders (W4A16 / W8A16); CPU targets keep fp32 KV."""
    model = resolve("medgemma-4b-it")

    def kv(target, precision):
        opts = BuildOptions(model="medgemma-4b-it", out=Path("x"), target=target, precision=precision, context=8192)
        return planner.plan_build(planner.make_plan(opts, model)).kv_bytes

    for target in (ORIN, "cuda", "h100"):
        assert kv(target, "int4") == kv(target, "int8") == kv(target, "fp16") == kv(target, "fp32") // 2
    assert kv("cpu", "int4") == kv("cpu", "fp32")


def test_tied_lm_head_is_stored_once(bundles):
    """GPU targets: embed_tokens gathers the decoder's int8 lm_head rows from the decoder's data file (no copy of its
    own), on the CPU provider, and its output is those rows dequantised by hand times Gemma's sqrt(hidden)."""
    from onnx import numpy_helper
    from onnx.external_data_helper import uses_external_data

    from medc.compile import tensorrt
    from medc.runtime.bundle import open_bundle
    from medc.runtime.session import Pipeline, open_component

    out = bundles["orin-int4"]
    manifest = Manifest.read(out)
    entry = manifest.components["embed_tokens"]
    rows_name, scale_name = entry.quantization["shares"]["tensors"]
    assert entry.quantization["provider"] == "CPUExecutionProvider" and entry.fidelity["passed"]
    assert manifest.components["decoder"].quantization["lm_head_rows"] == {"rows": rows_name, "scale": scale_name}
    assert not (out / "embed_tokens.onnx.data").exists()
    assert (out / "decoder.onnx.data").stat().st_mode & 0o044 == 0o044  # readable by whoever the bundle is copied for
    graph = onnx.load(str(out / "embed_tokens.onnx"), load_external_data=False).graph
    shared = [t for t in graph.initializer if uses_external_data(t)]
    assert {t.name for t in shared} == {rows_name} | ({scale_name} & {t.name for t in shared})
    assert all(e.value == "decoder.onnx.data" for t in shared for e in t.external_data if e.key == "location")
    decoder = {t.name: t for t in onnx.load(str(out / "decoder.onnx")).graph.initializer}
    rows, scale = numpy_helper.to_array(decoder[rows_name]), numpy_helper.to_array(decoder[scale_name])
    assert rows.dtype == np.int8 and rows.shape[0] == scale.shape[0] and scale.dtype == np.float16
    ids = np.array([[2, 105, 4, rows.shape[0] - 1]], np.int64)
    bundle = open_bundle(out)
    with open_component(bundle, "embed_tokens") as sess:
        got = sess.run({"input_ids": ids})["inputs_embeds"]
    by_hand = rows[ids].astype(np.float32) * scale[ids].astype(np.float32)[..., None]
    np.testing.assert_allclose(got, by_hand * np.float32(np.sqrt(rows.shape[1])), rtol=1e-6, atol=1e-6)
    # pinned to the CPU provider whatever the bundle's providers are; no engine is planned for it
    gpu = open_bundle(out, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    pipeline = Pipeline(gpu)
    assert pipeline._sessions["embed_tokens"].providers == ["CPUExecutionProvider"]
    assert pipeline._sessions["decoder"].providers[0] == "CUDAExecutionProvider"
    assert set(tensorrt.engine_components(manifest)) == {"vision_encoder", "decoder"}
    assert "embed_tokens" not in (out / "tensorrt" / "trtexec.sh").read_text()
    report = lint_bundle(out, ORIN)
    assert report.ok and {"weight-dq-transpose", "cpu-component"} <= report.rules(), report.render()
    # the plan stores the table once, in the decoder
    plan = planner.plan_build(planner.make_plan(BuildOptions(model="medgemma-tiny", out=Path("x"), target=ORIN,
                                                             precision="int4"), resolve("medgemma-tiny")))
    weights = {c.name: c.weight_bytes for c in plan.components}
    assert weights["embed_tokens"] == 0 and any("counted once" in n for n in plan.notes)
