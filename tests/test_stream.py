"""Streamed builds (compile/stream.py), forced on the tiny MedGemma: the same graphs and bytes as the normal path,
a reference computed one module's weights at a time, and a bundle the runtime runs."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

import medc.runtime
from medc.compile import export, loader, optimize, quantize, stream, weight_only
from medc.compile.build import BuildOptions, build
from medc.specs import gate_tolerance
from medc.compile.plan import resolve
from medc.compile.quantize import ConvertOptions
from medc.compile.registry import MODELS
from medc.compile.spec import DecoderSettings, builtin_data
from medc.compile.weight_only import WeightOnlyConfig
from medc.manifest import Manifest
from medc.runtime.session import OrtSession
from medc.runtime.verify import evaluate

SPEC = MODELS["medgemma-tiny"]
INT4 = WeightOnlyConfig(precision="int4", lm_head="int4", form="nbits")


@pytest.fixture(scope="module")
def empty():
    return loader.load("medgemma-tiny", empty=True)


@pytest.fixture(scope="module")
def full():
    return loader.load("medgemma-tiny")


# The decoder forms a build streams: the CPU target's (GroupQueryAttention) and TensorRT's (explicit attention,
# standard ops).
FORMS = {"gqa": DecoderSettings("gqa", 64), "explicit": None}


def _decoder(loaded, form: str = "gqa"):
    comp = {c.name: c for c in loaded.family.components(loaded.config, FORMS[form])}["decoder"]
    return comp, comp.extract(loaded.hf_model), comp.dummy_inputs(loaded, 2, np.random.default_rng(0))


def test_random_weights_are_the_normal_paths_and_deterministic(full):
    source = stream.RandomWeights(SPEC.seed)
    params = dict(full.hf_model.named_parameters())
    for name, p in params.items():
        assert torch.equal(source.get(name, p.shape), p.detach()), name  # == loader.randomize_
    name, p = next(iter(params.items()))
    assert torch.equal(source.get(name, p.shape), source.get(name, p.shape))
    assert not torch.equal(stream.RandomWeights(SPEC.seed + 1).get(name, p.shape), p.detach())


def test_empty_model_holds_no_values_and_keeps_ties(empty, full):
    model = empty.hf_model
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in full.hf_model.named_parameters()]
    for (n, a), (_, b) in zip(model.named_buffers(), full.hf_model.named_buffers()):
        assert torch.equal(a, b), n  # buffers (rotary frequencies) are real


@pytest.fixture(scope="module")
def weightless(empty):
    """form -> the weightless export of that decoder (made on first use)."""
    made = {}

    def get(form: str = "gqa"):
        if form not in made:
            comp, module, example = _decoder(empty, form)
            made[form] = stream.export_weightless(module, comp, example, empty.hf_model)
        return made[form]

    return get


@pytest.fixture(scope="module")
def reference(empty):
    """The decoder's golden cases, referenced on the empty model; and the most parameters held at once."""
    comp, module, _ = _decoder(empty)
    streamer = stream.StreamedBuild(empty, "test")
    peak, get = [0], streamer.source.get

    def counting(name, shape):
        peak[0] = max(peak[0], len(streamer.weights.live) + 1)
        return get(name, shape)

    streamer.source.get = counting
    cases = streamer.reference(comp, module)
    assert not streamer.weights.live  # all released
    return cases, peak[0]


@pytest.fixture(scope="module")
def optimised(tmp_path_factory, full):
    """form -> the normal path's decoder graph before conversion: export with weights + the xformers optimiser."""
    made = {}

    def get(form: str = "gqa"):
        if form not in made:
            comp, module, example = _decoder(full, form)
            folder = tmp_path_factory.mktemp(f"normal-{form}")
            key = export.cache_key(full, comp)  # the builds' caches: a tiny decoder's trace takes ~25 s
            export.export_cached(module, comp, example, folder / "raw.onnx", key)
            optimize.optimize_cached(folder / "raw.onnx", folder / "opt.onnx", "xformers", key)
            made[form] = folder / "opt.onnx"
        return made[form]

    return get


def _nodes(path) -> list:
    """Every node with its constant inputs (the converted weights), in order."""
    model = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return [(n.op_type, [inits[i] for i in n.input if i in inits and inits[i].size > 1],
             {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute})
            for n in model.graph.node if n.op_type in ("MatMulNBits", "DequantizeLinear", "MatMul",
                                                       "GatherBlockQuantized")]


@pytest.mark.parametrize("form, options", [
    ("gqa", replace(INT4, lm_head="int8")),  # int4 projections (uint4 zero points), symmetric int8 lm_head
    # int4 lm_head rescored from int8 rows (two-stage top 16 of 384), some projections int8
    ("gqa", replace(INT4, int4_projections=("q_proj", "k_proj", "o_proj"), rescore=16)),
    ("explicit", replace(INT4, lm_head="int8", form="qdq")),  # portable: blocked int4, per-channel int8 DQ
], ids=["int4", "mixed-rescored", "portable"])
def test_streamed_int4_decoder_is_the_quantisers(tmp_path, full, weightless, optimised, form, options):
    """Weightless export + streamed conversion == export + xformers optimiser + the in-memory weight-only conversion,
    byte for byte: one conversion (compile/weight_only.py) over two weight sources."""
    comp, _, _ = _decoder(full, form)
    normal = tmp_path / "normal.onnx"
    expected = quantize.convert("weight-only", optimised(form), normal, ConvertOptions(weight_only=options))
    assert ("lm_head_rescore" in expected) == bool(options.rescore)
    streamed = tmp_path / "streamed" / "decoder.onnx"
    record, optimizations = stream.write_component(weightless(form), stream.RandomWeights(SPEC.seed), streamed,
                                                   "xformers", "weight-only", options)
    assert {k: v for k, v in record.items() if k != "streamed"} == expected and optimizations["streamed"]
    assert (streamed.parent / "decoder.onnx.data").stat().st_size > 0
    a, b = _nodes(normal), _nodes(streamed)
    assert len(a) == len(b) >= 4 * 7 + 1 + bool(options.rescore)  # 7 projections per layer + lm_head (+ its rows)
    for (op_a, wa, attrs_a), (op_b, wb, attrs_b) in zip(a, b):
        assert (op_a, attrs_a) == (op_b, attrs_b)
        assert len(wa) == len(wb) and all(np.array_equal(x, y) for x, y in zip(wa, wb))
    feeds = comp.dummy_inputs(full, 3, np.random.default_rng(1))  # another batch than the export's
    gated = [t.name for t in comp.outputs if comp.gated_outputs is None or t.name in comp.gated_outputs]
    outs = [ort.InferenceSession(str(p)).run(gated, feeds) for p in (normal, streamed)]  # (cache rows a step does
    assert max(float(np.abs(x - y).max()) for x, y in zip(*outs)) == 0.0                 # not write: unspecified)


@pytest.mark.parametrize("precision, bits, block", [("int4", 4, 32), ("int8", 8, 16)])
def test_weight_only_is_onnxruntimes_quantizer(tmp_path, optimised, precision, bits, block):
    """The weight-only conversion (nbits form) writes what ONNX Runtime's own MatMulNBitsQuantizer writes for the
    same graph: the same MatMulNBits nodes, attributes and bytes."""
    import onnx
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    ours = tmp_path / "ours.onnx"
    quantize.convert("weight-only", optimised("gqa"), ours,
                     ConvertOptions(weight_only=WeightOnlyConfig(precision=precision, lm_head=precision)))
    config = DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=bits == 8, accuracy_level=4, bits=bits,
                                          quant_format=QuantFormat.QOperator)
    quantizer = MatMulNBitsQuantizer(onnx.load(str(optimised("gqa"))), algo_config=config)
    quantizer.process()
    theirs = tmp_path / "theirs.onnx"
    onnx.save(quantizer.model.model, str(theirs))
    a, b = _nodes(ours), _nodes(theirs)
    assert len(a) == len(b) == 4 * 7 + 1
    for (op_a, wa, attrs_a), (op_b, wb, attrs_b) in zip(a, b):
        assert (op_a, attrs_a) == (op_b, attrs_b) == ("MatMulNBits", attrs_a)
        assert len(wa) == len(wb) and all(np.array_equal(x, y) for x, y in zip(wa, wb))


def test_reference_holds_one_module_at_a_time(full, reference):
    """The bounded-memory reference == the whole model's, holding one module's parameters at a time."""
    cases, peak = reference
    assert peak <= 2  # a Linear's weight and bias
    comp, module, _ = _decoder(full)
    with torch.no_grad():
        for case in cases.values():
            outs = module(*export.module_args(module, comp, case["in"]))
            ref = comp.reference(outs)
            assert ref.keys() == case["ref"].keys()
            for name, arr in ref.items():
                assert np.array_equal(arr, case["ref"][name]), name


@pytest.mark.parametrize("method,precision", [("fp32", "fp32"), ("weight-only", "int8")])
def test_streamed_decoder_passes_its_gate(tmp_path, empty, weightless, reference, method, precision):
    comp, _, _ = _decoder(empty)
    dst = tmp_path / "decoder.onnx"
    stream.write_component(weightless(), stream.RandomWeights(SPEC.seed), dst, "xformers", method,
                           WeightOnlyConfig(precision=precision, lm_head=precision))
    with OrtSession(dst, ["CPUExecutionProvider"]) as sess:
        result = evaluate(sess.run, reference[0], gate_tolerance(comp.name, precision))
    assert result["passed"], result["worst"]


def test_safetensors_source_renames_and_converts(tmp_path, full):
    """A checkpoint as transformers saves it (legacy `language_model.model.*` keys, bf16): read one tensor at a time."""
    model = loader.build_random(SPEC)
    model.to(torch.bfloat16).save_pretrained(tmp_path)
    shutil.copyfile(builtin_data(SPEC.builtin_tokenizer), tmp_path / "tokenizer.json")
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(SPEC.preprocessor))
    loaded = loader.load(str(tmp_path), empty=True)
    source = stream.weight_source(loaded)
    assert isinstance(source, stream.SafetensorsWeights)
    for name, p in full.hf_model.named_parameters():
        assert torch.equal(source.get(name, p.shape), p.detach().to(torch.bfloat16).float()), name


def test_streamed_build_passes_the_gate_and_runs(tmp_path):
    out = tmp_path / "b"
    # Vision encoder fp32: a normal-path component with its weights resident meanwhile, gated once, not timed.
    manifest = build(BuildOptions(model="medgemma-tiny", out=out, precision="decoder=int8", stream=True))
    assert manifest.build["streamed"] == "forced (--stream)"
    for name in ("decoder", "embed_tokens"):
        entry = manifest.components[name]
        assert entry.fidelity["passed"] and "streamed" in entry.quantization and (out / f"{name}.onnx.data").is_file()
    assert manifest.components["decoder"].quantization["weights"] == "int8 symmetric, blocks of 16"
    assert manifest.components["vision_encoder"].fidelity["passed"]  # normal path, weights resident meanwhile
    assert Manifest.read(out).files == manifest.files
    with medc.runtime.load(out) as model:
        ids = model.generate_ids(["Is there a pneumothorax?"], max_new_tokens=4, ignore_eos=True)[0]
    assert len(ids) == 4


def test_streamed_gpu_build_is_w4a16_with_an_fp16_kv_cache(tmp_path):
    """A GPU target's int4 decoder, streamed (the full-size 4B's path): quantised with fp32 activations, then fp16
    with islands and an fp16 KV cache, gated on fp16 emulation, and TensorRT-lint clean, as the in-memory build."""
    from medc.compile.lint import lint_bundle

    out = tmp_path / "orin"
    manifest = build(BuildOptions(model="medgemma-tiny", out=out, precision="int4", target="jetson-orin-nano-8gb",
                                  stream=True))
    q = manifest.components["decoder"].quantization
    assert q["scheme"] == "W4A16, lm_head W8A16" and q["kv_dtype"] == manifest.generation["kv_dtype"] == "float16"
    assert "streamed" in q and q["fp32_islands"]["nodes_fp32"] > 0 and q["gated_on"].startswith("CPU with fp16")
    assert manifest.components["decoder"].fidelity["passed"] and manifest.build["generation_gate"]["passed"]
    graph = onnx.load(str(out / "decoder.onnx"), load_external_data=False).graph
    kv = [v for v in (*graph.input, *graph.output) if v.name.startswith(("past_", "present_"))]
    assert kv and all(v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 for v in kv)
    assert manifest.components["embed_tokens"].quantization["shares"]["component"] == "decoder"
    assert not (out / "embed_tokens.onnx.data").exists()  # the table is the decoder's lm_head rows
    report = lint_bundle(out, "jetson-orin-nano-8gb")
    assert report.ok, report.render()


def test_decision_by_size():
    tiny, big = resolve("medgemma-tiny"), resolve("medgemma-4b-it", random_weights=True)
    assert stream.reason(tiny, BuildOptions(model="medgemma-tiny", out="x")) is None
    assert stream.reason(tiny, BuildOptions(model="medgemma-tiny", out="x", stream=True)) == "forced (--stream)"
    assert "GiB" in stream.reason(big, BuildOptions(model="medgemma-4b-it", out="x", random_weights=True))  # 17 GB


@pytest.mark.parametrize("K,N,bits,block,qdq", [(96, 50, 4, 32, False), (100, 37, 4, 32, False),
                                                (96, 50, 8, 16, False), (100, 38, 4, 32, True)])
def test_packing_by_slices_is_the_quantisers(monkeypatch, K, N, bits, block, qdq):
    """Slices of columns (MatMulNBits) or of block rows (QDQ), K padded to whole blocks: ORT's bytes for the whole."""
    import onnx_ir as ir
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig,
                                                                 DefaultWeightOnlyQuantizer)

    monkeypatch.setattr(weight_only, "CHUNK_BYTES", 4 * 96 * 7)  # a few columns (or one block of rows) at a time
    w = np.random.default_rng(0).standard_normal((N, K)).astype(np.float32)  # as HF stores a Linear: [N, K]
    config = DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=bits == 8, bits=bits,
                                          quant_format=QuantFormat.QDQ if qdq else QuantFormat.QOperator)
    if qdq:  # the portable form: positive scales (weight_only.int4_blocks; TensorRT refuses ORT's signed ones)
        packed, scales = weight_only.int4_blocks(np.ascontiguousarray(w.T), block)
    else:
        packed, scales, zero_points = DefaultWeightOnlyQuantizer(config).qbits_block_quant(np.ascontiguousarray(w.T))
    written = {}

    class Data:
        def add(self, name, chunks, dtype, shape):
            key = next((k for k in ("scales", "zero_points") if name.endswith(k)), "packed")
            written[key] = b"".join(c.tobytes() for c in chunks)
            return ir.Tensor(np.zeros(1, np.float32), name=name)

    graph = ir.Graph([], [], nodes=[], opset_imports={"": 20})
    value = ir.Value(name="w", shape=ir.Shape([K, N]), type=ir.TensorType(ir.DataType.FLOAT))
    if qdq:  # the graph reads the transposed view, as a streamed Linear weight
        weight_only._write_int4_blocks(ir.Model(graph, ir_version=10), value, [], w.T, block, Data())
    else:
        weight_only._write_nbits(graph, value, [], w.T, bits, block, Data())
    expected = {"packed": packed.tobytes(), "scales": scales.tobytes()}
    if bits == 4 and not qdq:  # int4 MatMulNBits: asymmetric, uint4 zero points
        expected["zero_points"] = zero_points.tobytes()
    assert written == expected
    assert b"".join(c.tobytes() for c in weight_only.row_chunks(w.T)) == w.T.tobytes()
