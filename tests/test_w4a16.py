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
                                    ("cuda-int4", "cuda", "int4")):
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
    assert len(weighted) == 7 * 4 + 1  # q k v o gate up down x 4 layers, lm_head: none kept fp32 on the tiny model
    for mm in weighted:
        dq = producer[mm.input[1]]
        assert types[dq.input[0]] == weight and types[dq.input[1]] == TensorProto.FLOAT16  # fp16 scales
        assert types[dq.output[0]] == TensorProto.FLOAT16 and types[mm.input[0]] == TensorProto.FLOAT16
    manifest = Manifest.read(bundles[name])
    q = manifest.components["decoder"].quantization
    bits = 4 if weight == TensorProto.INT4 else 8
    assert q["scheme"] == f"W{bits}A16" and q["kv_dtype"] == "float16" and q["activations"].startswith("float16")
    assert q["fp32_islands"]["nodes_fp32"] > 0 and "Softmax" in q["fp32_islands"]["op_types"]
    assert q["gated_on"].startswith("CPU with fp16 rounding emulated")
    assert manifest.generation["kv_dtype"] == "float16"
    assert manifest.components["decoder"].fidelity["passed"] and manifest.build["generation_gate"]["passed"]
    assert "decoder.onnx" in manifest.build["generation_gate"]["gated_on"]  # the whole-model gate emulated fp16 too
    report = lint_bundle(bundles[name], ORIN)
    assert report.ok, report.render()


def test_onnxruntime_cuda_form(bundles):
    graph = onnx.load(str(bundles["cuda-int4"] / "decoder.onnx")).graph
    types = _types(graph)
    _check_io(graph, types)
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 7 * 4 + 1
    assert all(types[n.input[0]] == TensorProto.FLOAT16 and types[n.input[2]] == TensorProto.FLOAT16 for n in nbits)
    manifest = Manifest.read(bundles["cuda-int4"])
    assert manifest.components["decoder"].quantization["scheme"] == "W4A16"
    assert manifest.components["decoder"].fidelity["passed"] and manifest.build["generation_gate"]["passed"]


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
