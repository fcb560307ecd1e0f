"""Precision conversion with ONNX Runtime's own tools (onnxruntime.quantization, onnxruntime.transformers.float16).

Methods, each a registry entry that writes `dst` from an fp32 graph:
- `fp16`: weights and activations in fp16, graph inputs/outputs kept fp32 so callers never see the change.
- `int8-static-qdq`: explicit QuantizeLinear/DequantizeLinear around MatMul/Gemm/Conv, int8, symmetric (zero point
  0), per-channel weights, activation ranges from calibration data. This is the form TensorRT consumes (implicit
  calibrators are deprecated since TensorRT 10.1). Only MatMuls with a constant weight are quantised: the attention
  score products stay in float, where the softmax range would waste half of a symmetric int8 scale.
- `weight-only`: decoders; blockwise int8 or int4 weights (MatMulNBits, or blocked DequantizeLinear for TensorRT),
  the lm_head at its own precision.
- `int8-dynamic`: per-channel int8 weights, activations quantised per call (MatMulInteger); ONNX Runtime CPU's fast
  path. Dynamic ranges are exact per call, so the attention products can be quantised here too.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def _fp16(src: Path, dst: Path, calibration=None, options=None) -> dict:
    """Whole graph in fp16. Decoders (their options name an "lm_head") keep fp32 islands where Gemma 3 overflows
    fp16, found by structure and by measuring the fp32 graph on `options["feeds"]` (medc.compile.fp16)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from medc.compile.export import save_onnx

    if options and "lm_head" in options:
        from medc.compile.fp16 import convert_fp16

        return convert_fp16(src, dst, options.get("feeds"), {k: v for k, v in options.items() if k != "feeds"})
    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True, disable_shape_infer=True)
    save_onnx(model, dst)
    return {"method": "fp16", "io_types": "float32"}


def _int8_dynamic(src: Path, dst: Path, calibration=None, options=None) -> dict:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True,
                     # The attention products (Q.K^T, P.V) are quantised too: on a 1024-token image they are ~13% of
                     # the FLOPs and, left in fp32, ~20% of the int8 encoder's time (measured, benchmarks/).
                     op_types_to_quantize=["MatMul", "Gemm"], extra_options={"MatMulConstBOnly": False},
                     use_external_data_format=_external(src))
    return {"method": "int8-dynamic", "weights": "int8 per-channel symmetric", "activations": "uint8 per call"}


# Weight-only blocks, by precision: (bits, block size). int8 blocks of 16 and int4 blocks of 32 are the measured
# choices on Gemma 3 270M (perplexity on GPL-3 vs fp32, decode tokens/s at 2 threads; benchmarks/):
# int8: per-tensor dynamic +20% (Gemma's activation outliers); blocks of 32 +0.49%; blocks of 16 +0.15%.
# int4: see WEIGHT_ONLY_NOTES in the README's precision table.
WEIGHT_ONLY = {"int8": (8, 16), "int4": (4, 32)}


def lm_head_node(model, vocab_size: int | None = None) -> str | None:
    """The MatMul that projects to the vocabulary: the one whose constant weight has the most columns."""
    inits = {t.name: t for t in model.graph.initializer}
    best, cols = None, 0
    for node in model.graph.node:
        if node.op_type == "MatMul" and len(node.input) > 1 and node.input[1] in inits:
            dims = inits[node.input[1]].dims
            if len(dims) == 2 and dims[1] > cols and (vocab_size is None or dims[1] == vocab_size):
                best, cols = node.name, dims[1]
    return best


PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def module_path(node) -> str:
    """The torch module a node was exported from (the dynamo exporter's name scopes), e.g.
    'lm.layers.3.mlp.down_proj'; '' when the graph carries no such metadata."""
    import ast

    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            scopes = ast.literal_eval(p.value)
            return scopes[-2] if len(scopes) >= 2 else ""
    return ""


def weight_precision(options: dict, is_head: bool, projections: list[str]) -> str:
    """One MatMul weight's precision under a weight-only recipe: the lm_head's own, int8 for a projection an int4
    decoder keeps out of `int4_projections`, else the decoder's. Shared with the streamed path (compile/stream.py)."""
    precision = options.get("precision", "int8")
    if is_head:
        return options.get("lm_head", precision)
    if precision == "int4" and any(p not in options.get("int4_projections", PROJECTIONS) for p in projections):
        return "int8"
    return precision


def weight_only_record(qdq: bool) -> dict:
    return {"method": "weight-only", "format": "DequantizeLinear + MatMul" if qdq else "MatMulNBits",
            "activations": "float" if qdq else "int8 per block, at run time (accuracy level 4)"}


def _weight_only(src: Path, dst: Path, calibration=None, options=None) -> dict:
    """Decoders: block-wise weights, activations left in float (portable) or quantised per block at run time.

    ORT flavour (MatMulNBits, accuracy level 4 = MLAS's int8 kernels; level 1 is fp32 arithmetic: exact but
    1 token/s, as it dequantises every call): int8 symmetric in blocks of 16; int4 asymmetric in blocks of 32, an
    integer (uint4) zero point per block. Not HQQ: its zero points are floats, which MLAS has no int8 kernel for
    (measured: the 262k x 640 lm_head at M=1 took 350 ms, uint4 zero points 15 ms); its error is only ~5% lower.
    An int4 lm_head gets its top `options["rescore"]` logits recomputed from int8 rows (`add_rescoring`).
    Portable flavour (`options["format"] == "qdq"`, for TensorRT): int4 symmetric (zero point 0) as
    DequantizeLinear with a block size (opset 21), int8 per output channel, feeding standard MatMuls.

    Options: `lm_head` (the vocabulary projection's precision, default the decoder's: on small models it is most of
    the bytes read per token), `int4_projections` (which projections are int4 under an int4 decoder, the rest
    int8; default all), `int4_block_size`, `int8_block_size`."""
    import onnx
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    from medc.compile.export import save_onnx

    options = dict(options or {})
    precision = options.get("precision", "int8")
    head_precision = options.get("lm_head", precision)
    int4_projections = tuple(options.get("int4_projections", PROJECTIONS))
    qdq = options.get("format") == "qdq"
    # Quiet: ORT's 4-bit quantizer logs a line per node.
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.ERROR)
    model = onnx.load(str(src))
    head = lm_head_node(model, options.get("vocab_size"))
    inits = {t.name: t for t in model.graph.initializer}
    weighted = [n for n in model.graph.node if n.op_type == "MatMul" and len(n.input) > 1 and n.input[1] in inits]
    chosen = {n.name: weight_precision(options, n.name == head, [module_path(n).rsplit(".", 1)[-1]])
              for n in weighted}
    rescore = None  # (hidden, logits, int8 table, scales) of an int4 lm_head, made before its fp32 weight goes
    if rescores(options) and head is not None:
        from onnx import numpy_helper

        node = next(n for n in weighted if n.name == head)
        rescore = (node.input[0], node.output[0], *int8_rows(numpy_helper.to_array(inits[node.input[1]]).T))
    record = weight_only_record(qdq)
    for prec in ("int4", "int8"):
        nodes = {n for n, p in chosen.items() if p == prec}
        if not nodes:
            continue
        # ORT's quantizer takes every MatMul not excluded (its nodes_to_include *adds* to the op types).
        exclude = [n.name for n in weighted if n.name not in nodes]
        bits, block = WEIGHT_ONLY[prec]
        block = int(options.get(f"{prec}_block_size", block))
        if qdq and bits == 8:  # ORT's quantizer writes Q/DQ for 4 bits only; TensorRT takes int8 weights per channel
            model = _int8_per_channel_dq(model, nodes_to_exclude=exclude)
            form = "int8 symmetric, per output channel"
        elif qdq:  # int4 for TensorRT: positive scales (ORT's symmetric QDQ form signs them; TensorRT refuses that)
            model = _int4_blocked_dq(model, block, nodes_to_exclude=exclude)
            form = f"int4 symmetric, blocks of {block}"
        else:
            config = DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=bits == 8, accuracy_level=4, bits=bits,
                                                  quant_format=QuantFormat.QOperator)
            quantizer = MatMulNBitsQuantizer(model, algo_config=config, nodes_to_exclude=exclude)
            quantizer.process()
            model = quantizer.model.model
            form = nbits_form(bits, block)
        if head in nodes:
            record["lm_head"] = form
        if nodes - {head}:
            record["weights" if prec == precision else "weights_" + prec] = form
    if precision == "int4" and int4_projections != PROJECTIONS:
        record["int4_projections"] = list(int4_projections)
    record.setdefault("lm_head", head_precision)
    if rescore is not None:
        import onnx_ir as ir

        hidden, logits, rows, scales = rescore
        graph = (ir_model := ir.serde.deserialize_model(model)).graph
        values = {v.name: v for n in graph for v in (*n.inputs, *n.outputs) if v is not None}
        add_rescoring(graph, values[logits], values[hidden], _constant(graph, "lm_head.rows_int8", rows),
                      _constant(graph, "lm_head.rows_scales", scales), int(options["rescore"]))
        model = ir.serde.serialize_model(ir_model)
        record["lm_head_rescore"] = rescore_record(options["rescore"])
    save_onnx(model, dst)
    return record


def nbits_form(bits: int, block: int) -> str:
    """MatMulNBits as medc writes it (here and in compile/stream.py): int8 symmetric, int4 with uint4 zero points."""
    return f"int8 symmetric, blocks of {block}" if bits == 8 else f"int4 asymmetric (uint4 zero points), blocks of {block}"


RESCORE_BLOCK = 32


def int8_rows(w: np.ndarray, block: int = RESCORE_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """A [V, H] table as GatherBlockQuantized's uint8 data (int8 + 128, symmetric) and scales [V, H / block]."""
    v, h = w.shape
    blocks = np.asarray(w, np.float32).reshape(v, h // block, block)
    scales = (np.maximum(np.abs(blocks).max(-1), 1e-30) / 127).astype(np.float32)
    q = np.clip(np.rint(blocks / scales[..., None]), -127, 127).astype(np.int16) + 128
    return q.astype(np.uint8).reshape(v, h), scales


def rescores(options: dict) -> bool:
    """Whether a weight-only conversion rescores its int4 lm_head (ORT flavour only: TensorRT's graphs stay standard
    ops). Shared with the streamed path (compile/stream.py)."""
    return (bool(options.get("rescore")) and options.get("format") != "qdq"
            and weight_precision(options, True, []) == "int4")


RESCORE_GROUP = 8  # logits per group in the first, coarse stage of the top-k


def add_rescoring(graph, logits, hidden, rows, scales, top_k: int) -> None:
    """Recompute the `top_k` highest logits of an int4 lm_head from int8 rows.

    The lm_head (Gemma 3's tied 262k-row vocabulary projection) is most of the bytes and arithmetic of a decode step
    on small models, and in int4 it costs Gemma 3 270M +6.9% perplexity. Rescored, every token that can win a greedy
    or top-k/top-p choice has int8-accurate logits and only the tail of the softmax keeps int4 error (+0.1 to
    +0.3%); the int8 rows cost V x H bytes of memory, but a step reads only the chosen ones (GatherBlockQuantized,
    exact for a table that was int8 to begin with, like that GGUF's Q8_0 one).

    An edit of the converted graph (onnx_ir), not a form of the export: one trace serves every precision. `logits`
    [B, L, V] is the int4 MatMulNBits' output, `hidden` [B, L, H] its input, `rows` [V, H] uint8 (int8 + 128) and
    `scales` [V, H / RESCORE_BLOCK] the table (`int8_rows`). The top-k runs in two exact stages, at half the cost of
    one TopK over the vocabulary (~1.4 ms for k = 1024 of 262144 on one core, ~6% of a 270M decode step): the max
    of each group of 8 logits, the k best groups, then the k best of their 8k logits. Fewer than k groups can hold a
    logit above the k-th best, so its group is always kept."""
    import onnx_ir as ir

    vocab, group = int(rows.shape[0]), RESCORE_GROUP
    consumers, is_output = list(logits.uses()), logits.is_graph_output()
    nodes = []

    def op(op_type, inputs, domain="", outputs=1, **attributes):
        node = ir.node(op_type, inputs, attributes, domain=domain, num_outputs=outputs,
                       name=f"lm_head_rescore/{op_type}_{len(nodes)}")
        nodes.append(node)
        return node.outputs if outputs > 1 else node.outputs[0]

    def const(name, array):
        return _constant(graph, f"lm_head_rescore.{name}", np.asarray(array, np.int64))

    k, last = const("k", [min(top_k, vocab)]), const("last_axis", [-1])
    if vocab % group or vocab // group < top_k:
        top = op("TopK", [logits, k], outputs=2, axis=-1, sorted=0)[1]
    else:
        grouped = op("Reshape", [logits, const("groups", [0, 0, vocab // group, group])])
        best = op("TopK", [op("ReduceMax", [grouped, last], keepdims=0), k], outputs=2, axis=-1, sorted=0)[1]
        first = op("Mul", [op("Unsqueeze", [best, last]), const("group", group)])
        cand = op("Reshape", [op("Add", [first, const("offsets", np.arange(group))]),
                              const("flat", [0, 0, top_k * group])])
        chosen = op("TopK", [op("GatherElements", [logits, cand], axis=-1), k], outputs=2, axis=-1, sorted=0)[1]
        top = op("GatherElements", [cand, chosen], axis=-1)
    picked = op("GatherBlockQuantized", [rows, top, scales], domain="com.microsoft", gather_axis=0, quantize_axis=1,
                block_size=RESCORE_BLOCK, bits=8)  # [B, L, K, H]
    exact = op("Squeeze", [op("MatMul", [picked, op("Unsqueeze", [hidden, last])]), last])
    rescored = op("ScatterElements", [logits, top, exact], axis=-1)
    graph.insert_after(logits.producer(), nodes)
    for use in consumers:
        use.node.replace_input_with(use.idx, rescored)
    if is_output:
        graph.outputs[graph.outputs.index(logits)] = rescored
        rescored.name, logits.name = logits.name, f"{logits.name}_int4"
    graph.opset_imports.setdefault("com.microsoft", 1)


def _constant(graph, name: str, array: np.ndarray):
    import onnx_ir as ir

    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                     const_value=ir.tensor(array, name=name))
    graph.register_initializer(value)
    return value


def rescore_record(top_k) -> dict:
    return {"top_k": top_k, "rows": f"int8 symmetric, blocks of {RESCORE_BLOCK} (GatherBlockQuantized)"}


def _weight_dq(model, make, nodes_to_include=None, nodes_to_exclude=None) -> int:
    """MatMul(x, W) -> MatMul(x, DequantizeLinear(...)) for every 2-D initializer W that only that MatMul reads.
    `make(name, w [K, N]) -> (new initializers, DequantizeLinear input names, attributes)`. Returns how many."""
    import onnx
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    consumers = {}
    for n in model.graph.node:
        for i in n.input:
            consumers[i] = consumers.get(i, 0) + 1
    new_inits, done = [], set()
    for node in list(model.graph.node):
        if node.op_type != "MatMul" or len(node.input) < 2 or node.input[1] not in inits:
            continue
        if (nodes_to_include and node.name not in nodes_to_include) or node.name in (nodes_to_exclude or ()):
            continue
        name = node.input[1]
        if name in done or consumers[name] > 1 or len(inits[name].dims) != 2:
            continue
        tensors, inputs, attrs = make(name, numpy_helper.to_array(inits[name]).astype(np.float32))
        new_inits += tensors
        dq = onnx.helper.make_node("DequantizeLinear", inputs, [f"{name}_dq"], name=f"{node.name}_DequantizeLinear",
                                   **attrs)
        model.graph.node.insert(list(model.graph.node).index(node), dq)
        node.input[1] = f"{name}_dq"
        model.graph.initializer.remove(inits[name])
        done.add(name)
    model.graph.initializer.extend(new_inits)
    return len(done)


def _int8_per_channel_dq(model, nodes_to_include=None, nodes_to_exclude=None):
    """MatMul(x, W) -> MatMul(x, DequantizeLinear(W_int8, scale[N], axis=1)): symmetric int8 per output channel,
    zero point omitted (= 0), the weight-only form TensorRT's explicit quantization accepts for int8."""
    from onnx import numpy_helper

    def make(name, w):
        scale = np.maximum(np.abs(w).max(axis=0), 1e-12) / 127.0
        q = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
        return ([numpy_helper.from_array(q, f"{name}_int8"), numpy_helper.from_array(scale.astype(np.float32),
                                                                                     f"{name}_scale")],
                [f"{name}_int8", f"{name}_scale"], {"axis": 1})

    _weight_dq(model, make, nodes_to_include, nodes_to_exclude)
    return model


def int4_blocks(w: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int4 blocks along K of a [K, N] weight, for DequantizeLinear(axis 0, block_size): returns the values
    packed two per byte (low nibble first, row-major: ONNX's INT4 layout) and scales [ceil(K / block), N].

    Every scale is positive: TensorRT's parser refuses zero or negative scales (onnx-tensorrt QuantDequantLinearHelper,
    "Scale coefficients must all be positive"), and ONNX Runtime's symmetric 4-bit QDQ quantizer signs the scale so
    that the largest |w| maps to -8, negative for a block whose extreme is positive. Here each block's scale is
    positive: the grid [-8, 7] that covers both extremes, scale = max(-min / 8, max / 7), or one up to 15% finer that
    clips the extreme, whichever has the smaller squared error (4 candidates). On N(0, 1) weights in blocks of 32
    that is 8.7% relative error, against 9.3% for the covering grid alone and 8.6% for ORT's signed form (measured).
    Zero maps to 0 (the zero point TensorRT requires)."""
    K, N = w.shape
    kb = -(-K // block)
    wp = np.asarray(w, np.float32)
    if kb * block != K:
        wp = np.pad(wp, ((0, kb * block - K), (0, 0)))
    blocks = wp.reshape(kb, block, N)
    cover = np.maximum(-blocks.min(axis=1) / 8, blocks.max(axis=1) / 7)
    cover = np.where(cover > 0, cover, np.float32(1.0)).astype(np.float32)  # an all-zero block: any positive scale
    scale, error = cover, None
    for f in (1.0, 0.95, 0.9, 0.85):
        s = (cover * np.float32(f)).astype(np.float32)
        e = np.square(np.clip(np.rint(blocks / s[:, None, :]), -8, 7) * s[:, None, :] - blocks).sum(axis=1)
        if error is None:
            error = e
        else:
            scale, error = np.where(e < error, s, scale), np.minimum(e, error)
    q = np.clip(np.rint(blocks / scale[:, None, :]), -8, 7).astype(np.int8).reshape(kb * block, N)[:K]
    nibbles = q.reshape(-1).view(np.uint8) & 0x0F
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    return (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8), scale


def _int4_blocked_dq(model, block: int, nodes_to_exclude=()):
    """MatMul(x, W) -> MatMul(x, DequantizeLinear(W_int4, scales, axis=0, block_size)): int4 weight-only in the form
    TensorRT parses (blocked, zero point omitted = 0, positive scales; opset 21, where int4 and block_size arrived)."""
    import onnx
    from onnx import numpy_helper

    def make(name, w):
        packed, scale = int4_blocks(w, block)
        q = onnx.TensorProto(name=f"{name}_DQ_Q4", data_type=onnx.TensorProto.INT4, dims=list(w.shape),
                             raw_data=packed.tobytes())
        return ([q, numpy_helper.from_array(scale, f"{name}_DQ_scales")], [q.name, f"{name}_DQ_scales"],
                {"axis": 0, "block_size": block})

    if _weight_dq(model, make, nodes_to_exclude=nodes_to_exclude):
        # between opsets 20 and 21 the ops medc exports only gained int4/uint4 types
        for opset in model.opset_import:
            if opset.domain in ("", "ai.onnx"):
                opset.version = max(opset.version, 21)
        model.ir_version = max(model.ir_version, 10)
    return model


class _Reader:
    """onnxruntime CalibrationDataReader over a list of feeds, with the range interface CalibStridedMinMax uses."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self.feeds = feeds
        self.set_range(0, len(feeds))

    def __len__(self) -> int:
        return len(self.feeds)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._it = iter(self.feeds[start_index:end_index])

    def get_next(self):
        return next(self._it, None)


def _int8_static_qdq(src: Path, dst: Path, calibration=None, options=None) -> dict:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    feeds, info = calibration
    # TensorRT (options["quantize_bias"] False): biases stay float. ORT's default int32 bias DequantizeLinear has no
    # TensorRT form (it quantizes to int8/int4/fp8/fp4 only); TensorRT fuses the float bias into the int8 layer.
    quantize_bias = (options or {}).get("quantize_bias", True)
    with _calibration_runs_reductions_early():
        _quantize_static_qdq(quantize_static, src, dst, feeds, CalibrationMethod, QuantFormat, QuantType,
                             quantize_bias)
    return {"method": "int8-static-qdq", "weights": "int8 per-channel symmetric", "activations": "int8 symmetric (zero point 0)",
            **({} if quantize_bias else {"bias": "float"}),
            "calibration": {**info, "digest": calibration_digest(feeds), "algorithm": "minmax"}}


def _quantize_static_qdq(quantize_static, src, dst, feeds, CalibrationMethod, QuantFormat, QuantType,
                         quantize_bias: bool = True) -> None:
    quantize_static(
        str(src), str(dst), _Reader(feeds), quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True,
        op_types_to_quantize=["MatMul", "Gemm", "Conv"], calibrate_method=CalibrationMethod.MinMax,
        use_external_data_format=_external(src),
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "MatMulConstBOnly": True,
                       # Bounded memory: reduce each sample to min/max and merge, instead of holding every
                       # intermediate tensor of every sample (~5 GB per image for full-size SigLIP). Not
                       # CalibMaxIntermediateOutputs: in onnxruntime 1.32 it drops the data it clears.
                       "CalibStridedMinMax": 1, "CalibTensorRangeSymmetric": True, "QuantizeBias": quantize_bias},
    )


@contextlib.contextmanager
def _calibration_runs_reductions_early():
    """ORT's calibrator appends a ReduceMin/ReduceMax pair per activation at the end of the graph and runs it with the
    default node order, which schedules those pairs last: every activation of the image stays alive until the end.
    At MedGemma's 896 px (4096 patches, 1 GB per attention matrix) 3 SigLIP layers took 16 GB and 27 do not fit.
    PRIORITY_BASED order runs each pair as soon as its input exists: 4.8 GB for 3 layers, 5.4 GB for 6 (measured);
    same nodes, same ranges. The patch lives in the isolated child that quantises large graphs (isolate.py)."""
    import onnxruntime
    from onnxruntime.quantization import calibrate

    def create_inference_session(self):
        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL  # as ORT does
        options.execution_order = onnxruntime.ExecutionOrder.PRIORITY_BASED
        self.infer_session = onnxruntime.InferenceSession(self.augmented_model_path, sess_options=options,
                                                          providers=self.execution_providers)

    original = calibrate.CalibraterBase.create_inference_session
    calibrate.CalibraterBase.create_inference_session = create_inference_session
    try:
        yield
    finally:
        calibrate.CalibraterBase.create_inference_session = original


def _external(src: Path) -> bool:
    return Path(str(src) + ".data").exists()


def calibration_digest(feeds: list[dict[str, np.ndarray]]) -> str:
    """sha256 over the calibration tensors' contents: identifies the set without naming files (names can carry PHI)."""
    h = hashlib.sha256()
    for feed in feeds:
        for name in sorted(feed):
            h.update(name.encode())
            h.update(np.ascontiguousarray(feed[name]).tobytes())
    return h.hexdigest()


METHODS = {"fp16": _fp16, "int8-dynamic": _int8_dynamic, "int8-static-qdq": _int8_static_qdq,
           "weight-only": _weight_only}

# The graph each int8 method starts from. Both quantise MatMul/Gemm nodes, so attention must not be fused into one
# Attention op (its QKV projection would stay fp32); other methods use the build's optimiser (default: xformers).
SOURCE_OPTIMIZER = {"int8-dynamic": "ort-transformers", "int8-static-qdq": "ort-transformers"}


def source_optimizer(method: str, target, default: str) -> str:
    """The optimiser whose graph `method` converts. TensorRT targets: none. The ONNX Runtime fusions (Attention,
    SkipLayerNormalization, BiasGelu; SimplifiedLayerNormalization in the default domain) are contrib ops that
    TensorRT's parser has no importer for (medc.compile.lint), and TensorRT fuses attention and norms itself."""
    if getattr(target, "engine", None) == "tensorrt":
        return "none"
    return SOURCE_OPTIMIZER.get(method, default)


def convert(method: str, src: Path, dst: Path, calibration=None, options: dict | None = None,
            isolate: bool | None = None) -> dict:
    from medc.compile import isolate as iso

    return iso.run(METHODS[method], Path(src), Path(dst), calibration, options, isolate=isolate)
