"""Weight-only quantisation of a decoder's MatMul weights: the choice of precision per weight and the packing, in
place on an onnx_ir graph. One code path for both builds: the in-memory one reads the weights from the graph
(`graph_weights`, `MemorySink`), the streamed one (compile/stream.py) reads them one at a time from a checkpoint and
writes them straight to the graph's data file.

Forms (`WeightOnlyConfig.form`):
- "nbits", for ONNX Runtime: MatMul(A, W) -> com.microsoft.MatMulNBits(A, W_Q, scales[, zero points]), accuracy
  level 4 (MLAS's int8 kernels; level 1 dequantises every call). int8 symmetric in blocks of 16; int4 asymmetric with
  an integer (uint4) zero point per block of 32, the form MLAS has int8 kernels for (HQQ's float zero points have
  none). The bytes come from the routines ONNX Runtime's own MatMulNBitsQuantizer calls, a slice of columns at a
  time, so a 2.7 GB matrix never needs a second copy.
- "qdq", for TensorRT: int8 per output channel as DequantizeLinear(W_int8, scale[N], axis 1); int4 symmetric blocks
  as DequantizeLinear(W_int4, scales, axis 0, block_size) with positive scales (opset 21, `int4_blocks`).
An int4 lm_head in the nbits form can have its top logits recomputed from int8 rows (`add_rescoring`).

Activations (`WeightOnlyConfig.activations`): "float32" on CPU targets; "float16" on GPU targets (W4A16 / W8A16,
`quantize_half`): the graph is first converted to fp16 with Gemma 3's fp32 islands (compile/fp16.py, the fp16
preset's rules) and its KV cache inputs and outputs in fp16, then each weight is quantised with scales of its own
dtype, so a weight an fp16 MatMul reads dequantises straight to fp16 (an island's weight: to fp32).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from typing import Iterable, Protocol

import numpy as np

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BITS = {"int8": 8, "int4": 4}
CHUNK_BYTES = 64 << 20  # fp32 slice of a matrix transposed, packed or written at once
RESCORE_BLOCK = 32  # the int8 rows' block (GatherBlockQuantized)
RESCORE_GROUP = 8  # logits per group in the first, coarse stage of the rescoring top-k


@dataclass(frozen=True)
class WeightOnlyConfig:
    """How a decoder's weights are converted: the recipe's precisions and options, and the graph form."""

    precision: str = "int8"  # the projections'
    lm_head: str | None = None  # the vocabulary projection's; None: the projections'
    form: str = "nbits"  # "nbits" (ONNX Runtime) | "qdq" (TensorRT)
    # Projections an int4 decoder keeps in int4; the others are int8.
    int4_projections: tuple[str, ...] = PROJECTIONS
    int4_block_size: int = 32
    int8_block_size: int = 16
    rescore: int = 0  # an int4 nbits lm_head: this many top logits recomputed from int8 rows (0: none)
    activations: str = "float32"  # | "float16": GPU targets, fp16 with fp32 islands and an fp16 KV cache
    # An int8 qdq lm_head stored as rows [V, H] (the token-embedding table's layout) and transposed into its MatMul, so
    # that embed_tokens reads the same bytes (compile/embedding.py `share_head`): GPU targets' tied embeddings.
    head_rows: bool = False

    @property
    def head_precision(self) -> str:
        return self.lm_head or self.precision

    def precision_of(self, is_head: bool, projections: list[str]) -> str:
        """One MatMul weight's precision: the lm_head's own; int8 for a projection an int4 decoder keeps out of
        `int4_projections`; else the decoder's."""
        if is_head:
            return self.head_precision
        if self.precision == "int4" and any(p not in self.int4_projections for p in projections):
            return "int8"
        return self.precision

    def block_size(self, precision: str) -> int:
        return self.int4_block_size if precision == "int4" else self.int8_block_size

    @property
    def rescores(self) -> bool:
        """Rescoring is ONNX Runtime ops (TopK, GatherBlockQuantized): the nbits form's int4 lm_head only."""
        return bool(self.rescore) and self.form == "nbits" and self.head_precision == "int4"


def record_of(config: WeightOnlyConfig | None) -> dict:
    """The manifest's `quantization` record before any weight is converted."""
    if config is None:
        return {"method": "none"}
    qdq = config.form == "qdq"
    return {"method": "weight-only", "format": "DequantizeLinear + MatMul" if qdq else "MatMulNBits",
            "activations": "float" if qdq else "int8 per block, at run time (accuracy level 4)"}


KV_IO = ("past_", "present_")  # a decoder's KV cache inputs and outputs: fp16 with fp16 activations


def quantize_half(src, dst, config: WeightOnlyConfig, feeds: list | None) -> dict:
    """W4A16 / W8A16 (GPU targets): write `dst` from the fp32 decoder `src` converted to fp16 with fp32 islands and
    an fp16 KV cache (fp16.convert_fp16, the fp16 preset's rules; `feeds` measure the islands), then its weights
    quantised with fp16 scales. Returns the manifest's `quantization` record."""
    import onnx_ir as ir

    from medc.compile import fp16
    from medc.compile.export import save_onnx

    half = dst.with_name(f"{dst.stem}.fp16{dst.suffix}")
    try:
        islands = fp16.convert_fp16(src, half, feeds, half_io=KV_IO)["fp32_islands"]
        model = ir.load(str(half))
        ir.external_data.load_to_model(model)
        record = quantize_weights(model, graph_weights(model), config, MemorySink())
        save_onnx(ir.serde.serialize_model(model), dst)
    finally:
        for leftover in (half, half.with_name(f"{half.name}.data")):
            leftover.unlink(missing_ok=True)
    return {**record, **half_record(config, islands)}


def halve_quantized(src, dst, config: WeightOnlyConfig, feeds: list | None) -> dict:
    """W4A16 / W8A16 for the streamed build, whose fp32 decoder never exists whole: `src` is the decoder already
    quantised with fp32 activations (a few GB at 4B), converted to fp16 with the same islands and fp16 KV cache. The
    scales are rounded to fp16 after the weights were quantised with their fp32 values (a relative error of 2^-11 on
    each block's scale, far below int4's or int8's own). Returns the fp16 part of the manifest's record."""
    from medc.compile import fp16

    islands = fp16.convert_fp16(src, dst, feeds, half_io=KV_IO)["fp32_islands"]
    return half_record(config, islands)


def half_record(config: WeightOnlyConfig, islands: dict) -> dict:
    """The manifest's record of a weight-only decoder with fp16 activations: its scheme, KV dtype and islands."""
    bits = {"int4": 4, "int8": 8}
    scheme = f"W{bits[config.precision]}A16" if config.precision in bits else "A16"
    if config.head_precision != config.precision and config.head_precision in bits:
        scheme += f", lm_head W{bits[config.head_precision]}A16"
    return {"scheme": scheme, "scales": "float16 (fp32 in islands)",
            "activations": "float16 with fp32 islands (compile/fp16.py)", "kv_dtype": "float16",
            "io_types": "float32; fp16: past_*, present_*", "fp32_islands": islands}


def nbits_form(bits: int, block: int) -> str:
    return f"int8 symmetric, blocks of {block}" if bits == 8 else f"int4 asymmetric (uint4 zero points), blocks of {block}"


def rescore_record(top_k: int) -> dict:
    return {"top_k": top_k, "rows": f"int8 symmetric, blocks of {RESCORE_BLOCK} (GatherBlockQuantized)"}


# -- where weights come from and where converted tensors go ----------------------------------------------------------
class Weight(Protocol):
    """One 2-D initializer's values, read when it is converted."""

    def read(self) -> np.ndarray:
        """The [K, N] matrix as the graph's MatMul reads it (a transposed view is fine)."""


class Sink(Protocol):
    """Where converted tensors are stored."""

    def add(self, name: str, chunks: Iterable[np.ndarray], dtype, shape):
        """A tensor whose bytes are `chunks`' bytes in order (a generator is consumed as it is written), as an
        onnx_ir tensor of `dtype` and `shape`."""

    def keep(self, value, weight: Weight) -> None:
        """A weight that stays fp32."""


@dataclass(frozen=True)
class GraphWeight:
    """A weight whose values are in the graph already (the in-memory build)."""

    value: object  # onnx_ir.Value

    def read(self) -> np.ndarray:
        return self.value.const_value.numpy()


class MemorySink:
    """Converted tensors held in memory, saved with the graph."""

    def add(self, name: str, chunks, dtype, shape):
        import onnx_ir as ir

        raw = b"".join(memoryview(np.ascontiguousarray(c)).cast("B") for c in chunks)
        shape = [int(d) for d in shape]
        if dtype.bitwidth < 8:  # int4: two values per byte, stored packed
            return ir.PackedTensor(np.frombuffer(raw, np.uint8), dtype, shape=ir.Shape(shape), name=name)
        return ir.Tensor(np.frombuffer(raw, dtype.numpy()).reshape(shape), name=name)

    def keep(self, value, weight: Weight) -> None:
        pass  # already in the graph


def graph_weights(model) -> dict[str, GraphWeight]:
    """The 2-D constant weights a MatMul reads, by initializer name (the in-memory build's weight source)."""
    weights = {}
    for node in model.graph:
        b = node.inputs[1] if node.op_type == "MatMul" and node.domain == "" and len(node.inputs) > 1 else None
        if b is not None and b.is_initializer() and b.const_value is not None and len(b.shape) == 2:
            weights.setdefault(b.name, GraphWeight(b))
    return weights


# -- the conversion ---------------------------------------------------------------------------------------------------
def module_path(node) -> str:
    """The torch module an onnx_ir node was exported from (the dynamo exporter's name scopes), e.g.
    'lm.layers.3.mlp.down_proj'; '' when the graph carries no such metadata."""
    scopes = node.metadata_props.get("pkg.torch.onnx.name_scopes")
    if scopes is None:
        return ""
    scopes = ast.literal_eval(scopes)
    return scopes[-2] if len(scopes) >= 2 else ""


def quantize_weights(model, weights: dict[str, Weight], config: WeightOnlyConfig | None, sink: Sink) -> dict:
    """Convert, in place, every MatMul weight among `weights` to its precision under `config` (None: all stay
    fp32); every other weight among them goes to `sink.keep`. Returns the manifest's `quantization` record.

    The lm_head is the MatMul of the module named "head", else the one whose weight has the most columns."""
    graph = model.graph
    matmuls: dict[str, list] = {}
    for node in graph:
        b = node.inputs[1] if node.op_type == "MatMul" and node.domain == "" and len(node.inputs) > 1 else None
        if b is not None and b.name in weights and len(b.shape) == 2:
            matmuls.setdefault(b.name, []).append(node)
    # The decoders name it "head"; a reduced vocabulary (compile/vocab.py) may have fewer columns than the MLP.
    named = [n for n, nodes in matmuls.items() if any(module_path(x) == "head" for x in nodes)]
    head = named[0] if len(named) == 1 else max(matmuls, key=lambda n: graph.initializers[n].shape[1], default=None)
    forms: dict[str, str] = {}  # record key -> form written
    rescored = head_rows = None
    for init, weight in weights.items():
        value, nodes = graph.initializers[init], matmuls.get(init, [])
        precision = "fp32"
        if config is not None and nodes:
            precision = config.precision_of(init == head, [module_path(n).rsplit(".", 1)[-1] for n in nodes])
        if precision not in BITS or len(list(value.uses())) != len(nodes):
            sink.keep(value, weight)
            continue
        w = weight.read()
        half = w.dtype == np.float16  # an fp16 graph's weight: scales in fp16, dequantised to fp16
        w = w.astype(np.float32) if half else w
        bits, block = BITS[precision], config.block_size(precision)
        if config.form == "qdq" and bits == 8:  # TensorRT takes int8 weights per channel
            rows = init == head and config.head_rows
            form = _write_int8_channels(graph, value, nodes, w, sink, half, rows)
            if rows:  # what embed_tokens reads (compile/embedding.py share_head)
                head_rows = {"rows": f"{init}_int8", "scale": f"{init}_scale"}
        elif config.form == "qdq":
            form = _write_int4_blocks(model, value, nodes, w, block, sink, half)
        else:
            form, made = _write_nbits(graph, value, nodes, w, bits, block, sink, half)
            if init == head and config.rescores:
                rows, scales = _int8_table(graph, "lm_head.rows", w.T, sink)
                add_rescoring(graph, made[0].outputs[0], made[0].inputs[0], rows, scales, config.rescore)
                rescored = config.rescore
        graph.initializers.pop(init)
        forms["lm_head" if init == head else "weights" if precision == config.precision else f"weights_{precision}"] = form
        del w
    record = record_of(config)
    for key in ("lm_head", "weights", "weights_int4", "weights_int8"):  # a fixed order, whatever the graph's
        if key in forms:
            record[key] = forms[key]
    if config is not None:
        if config.precision == "int4" and config.int4_projections != PROJECTIONS:
            record["int4_projections"] = list(config.int4_projections)
        record.setdefault("lm_head", config.head_precision)
        if rescored:
            record["lm_head_rescore"] = rescore_record(rescored)
        if head_rows:
            record["lm_head_rows"] = head_rows
    return record


def _kn_columns(w: np.ndarray, n0: int, n1: int) -> np.ndarray:
    """Columns n0:n1 of a [K, N] matrix, C-contiguous."""
    return np.ascontiguousarray(w[:, n0:n1])


def row_chunks(w: np.ndarray):
    """A [K, N] matrix as C-order slices of rows of at most CHUNK_BYTES (one slice when it is contiguous)."""
    if w.flags.c_contiguous:
        yield w
        return
    step = max(1, CHUNK_BYTES // (4 * w.shape[1]))
    for k in range(0, w.shape[0], step):
        yield np.ascontiguousarray(w[k:k + step])


def _initializer(graph, name: str, tensor):
    import onnx_ir as ir

    value = ir.Value(name=name, shape=ir.Shape(list(tensor.shape)), type=ir.TensorType(tensor.dtype),
                     const_value=tensor)
    graph.register_initializer(value)
    return value


def _write_nbits(graph, value, nodes, w: np.ndarray, bits: int, block: int, sink, half: bool = False
                 ) -> tuple[str, list]:
    """MatMul(A, W) -> MatMulNBits(A, W_Q, W_scales[, zero_points]): DefaultWeightOnlyQuantizer's QOperator form,
    int8 symmetric, int4 asymmetric. Returns that form and the new nodes. `half`: fp16 scales (MatMulNBits' scales
    are of A's type)."""
    import onnx_ir as ir
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    K, N = (int(d) for d in value.shape)
    kpack = 8 // bits
    k_blocks = (K + block - 1) // block
    blob = (block + kpack - 1) // kpack
    symmetric = bits == 8
    packed = np.zeros((N, k_blocks, blob), np.uint8)
    scales = np.zeros((N, k_blocks), np.float32)
    zero_points = np.zeros((N, (k_blocks + kpack - 1) // kpack), np.uint8)
    pack = quantize_matmul_4bits if bits == 4 else quantize_matmul_8bits
    step = max(1, CHUNK_BYTES // (4 * K))
    for n0 in range(0, N, step):  # blocks run along K within one column: columns quantise independently
        n1 = min(N, n0 + step)
        part = _kn_columns(w, n0, n1)
        if k_blocks * block > K:
            part = np.pad(part, ((0, k_blocks * block - K), (0, 0)))
        p = np.zeros((n1 - n0, k_blocks, blob), np.uint8)
        s = np.zeros((n1 - n0, k_blocks), np.float32)
        z = np.zeros((n1 - n0, (k_blocks + kpack - 1) // kpack), np.uint8)
        pack(p, part, s, z, block, n1 - n0, K, symmetric)
        packed[n0:n1], scales[n0:n1], zero_points[n0:n1] = p, s, z
    name = value.name
    inputs = [_initializer(graph, f"{name}_Q{bits}", sink.add(f"{name}_Q{bits}", [packed], ir.DataType.UINT8,
                                                                packed.shape)),
              _initializer(graph, f"{name}_scales", sink.add(f"{name}_scales", [_scales(scales, half)],
                                                             _scale_type(half), scales.shape))]
    if not symmetric:  # as ONNX Runtime's quantiser: zero points for the asymmetric (int4) form only
        inputs.append(_initializer(graph, f"{name}_zero_points", sink.add(
            f"{name}_zero_points", [zero_points], ir.DataType.UINT8, zero_points.shape)))
    made = []
    for node in nodes:
        new = ir.node("MatMulNBits", [node.inputs[0], *inputs], domain="com.microsoft",
                      attributes={"K": K, "N": N, "bits": bits, "block_size": block, "accuracy_level": 4},
                      name=f"{node.name}_Q{bits}" if node.name else None)
        ir.convenience.replace_nodes_and_values(graph, node, [node], [new], node.outputs, new.outputs)
        made.append(new)
    graph.opset_imports.setdefault("com.microsoft", 1)
    return nbits_form(bits, block), made


def _write_int8_channels(graph, value, nodes, w: np.ndarray, sink, half: bool = False, rows: bool = False) -> str:
    """MatMul(A, W) -> MatMul(A, DequantizeLinear(W_int8, scale[N], axis 1)): symmetric int8 per output channel, zero
    point omitted (= 0), the weight-only form TensorRT's explicit quantization accepts for int8. `half`: fp16
    scales, so the DequantizeLinear writes fp16. `rows`: W stored transposed, [N, K] (a tied lm_head's rows are the
    token embeddings), as MatMul(A, Transpose(DequantizeLinear(W_int8 [N, K], scale[N], axis 0)))."""
    import onnx_ir as ir

    K, N = (int(d) for d in value.shape)
    scale = np.empty(N, np.float32)
    step = max(1, CHUNK_BYTES // (4 * K))
    for n0 in range(0, N, step):  # a column's scale needs the whole column
        part = _kn_columns(w, n0, min(N, n0 + step))
        scale[n0:n0 + part.shape[1]] = np.maximum(np.abs(part).max(axis=0), 1e-12) / 127.0
    scale = _scales(scale, half).astype(np.float32)  # values rounded with the scale they are stored with

    def values():
        if rows:  # [N, K]: one output channel per row (a streamed weight's transpose is its source layout)
            for n0 in range(0, N, step):
                chunk = np.ascontiguousarray(w[:, n0:n0 + step].T)
                yield np.clip(np.round(chunk / scale[n0:n0 + step, None]), -127, 127).astype(np.int8)
            return
        for chunk in row_chunks(w):
            yield np.clip(np.round(chunk / scale), -127, 127).astype(np.int8)

    name = value.name
    q = _initializer(graph, f"{name}_int8", sink.add(f"{name}_int8", values(), ir.DataType.INT8,
                                                     (N, K) if rows else (K, N)))
    s = _initializer(graph, f"{name}_scale", sink.add(f"{name}_scale", [_scales(scale, half)], _scale_type(half),
                                                      (N,)))
    for node in nodes:
        dq = ir.node("DequantizeLinear", [q, s], attributes={"axis": 0 if rows else 1},
                     name=f"{node.name}_DequantizeLinear")
        _typed(dq, value, half)
        if rows:
            dq.outputs[0].shape = ir.Shape([N, K])
            t = ir.node("Transpose", [dq.outputs[0]], attributes={"perm": [1, 0]}, name=f"{node.name}_Transpose")
            _typed(t, value, half)
            graph.insert_before(node, [dq, t])
            node.replace_input_with(1, t.outputs[0])
        else:
            graph.insert_before(node, dq)
            node.replace_input_with(1, dq.outputs[0])
    return "int8 symmetric, per output channel" + (", stored as rows [N, K]" if rows else "")


def _write_int4_blocks(model, value, nodes, w: np.ndarray, block: int, sink, half: bool = False) -> str:
    """MatMul(A, W) -> MatMul(A, DequantizeLinear(W_int4, scales, axis 0, block_size)): int4 weight-only in the form
    TensorRT parses (blocked, zero point omitted = 0, positive scales `int4_blocks`; opset 21). `half`: fp16 scales,
    so the DequantizeLinear writes fp16 (W4A16)."""
    import onnx_ir as ir

    graph = model.graph
    K, N = (int(d) for d in value.shape)
    scales = np.zeros(((K + block - 1) // block, N), np.float32)

    def packed_rows():  # blocks of rows of the [K, N] matrix; `block` rows of N int4 values are whole bytes
        step = max(block, (CHUNK_BYTES // (4 * N)) // block * block)
        for k0 in range(0, K, step):
            p, s = int4_blocks(np.ascontiguousarray(w[k0:k0 + step]), block, half)
            scales[k0 // block:k0 // block + len(s)] = s
            yield p

    name = value.name
    bq = _initializer(graph, f"{name}_DQ_Q4", sink.add(f"{name}_DQ_Q4", packed_rows(), ir.DataType.INT4, (K, N)))
    sc = _initializer(graph, f"{name}_DQ_scales", sink.add(f"{name}_DQ_scales", [_scales(scales, half)],
                                                           _scale_type(half), scales.shape))
    for node in nodes:
        dq = ir.node("DequantizeLinear", [bq, sc], attributes={"axis": 0, "block_size": block},
                     name=f"{node.name}_DequantizeLinear" if node.name else None)
        _typed(dq, value, half)
        mm = ir.node("MatMul", [node.inputs[0], dq.outputs[0]], name=f"{node.name}_matmul_Q4" if node.name else None)
        ir.convenience.replace_nodes_and_values(graph, node, [node], [dq, mm], node.outputs, mm.outputs)
    # int4 and block_size arrived in opset 21, which needs IR version 10
    graph.opset_imports[""] = max(21, graph.opset_imports.get("", 21))
    model.ir_version = max(10, model.ir_version)
    return f"int4 symmetric, blocks of {block}"


def _scales(scales: np.ndarray, half: bool) -> np.ndarray:
    """Scales as stored: fp32, or fp16 whose magnitude is kept at least fp16's smallest normal (a smaller one would
    round to zero or lose bits; TensorRT refuses a zero scale). The sign is kept: ONNX Runtime's symmetric 8-bit
    quantiser (MatMulNBits) signs each block's scale so that its largest |w| maps to -128."""
    if not half:
        return scales
    f16 = np.finfo(np.float16)
    return (np.where(scales < 0, -1, 1) * np.clip(np.abs(scales), f16.tiny, f16.max)).astype(np.float16)


def _scale_type(half: bool):
    import onnx_ir as ir

    return ir.DataType.FLOAT16 if half else ir.DataType.FLOAT


def _typed(dq, weight, half: bool) -> None:
    """The DequantizeLinear's output typed as it computes (fp16 from fp16 scales), for readers of the saved graph
    (fp16.cpu_emulation rounds every fp16 tensor; the TensorRT lint checks types)."""
    import onnx_ir as ir

    dq.outputs[0].dtype = ir.DataType.FLOAT16 if half else ir.DataType.FLOAT
    dq.outputs[0].shape = ir.Shape(list(weight.shape))


def int4_blocks(w: np.ndarray, block: int, half: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int4 blocks along K of a [K, N] weight, for DequantizeLinear(axis 0, block_size): returns the values
    packed two per byte (low nibble first, row-major: ONNX's INT4 layout) and scales [ceil(K / block), N].

    Every scale is positive: TensorRT's parser refuses zero or negative scales (onnx-tensorrt QuantDequantLinearHelper,
    "Scale coefficients must all be positive"), and ONNX Runtime's symmetric 4-bit QDQ quantizer signs the scale so
    that the largest |w| maps to -8, negative for a block whose extreme is positive. Here each block's scale is
    positive: the grid [-8, 7] that covers both extremes, scale = max(-min / 8, max / 7), or one up to 15% finer that
    clips the extreme, whichever has the smaller squared error (4 candidates; tests/test_lint.py compares the error
    with ONNX Runtime's signed form). Zero maps to 0 (the zero point TensorRT requires). `half`: the chosen scales
    rounded to the fp16 values they are stored as (`_scales`) before the values are rounded with them."""
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
    if half:
        scale = _scales(scale, True).astype(np.float32)
    q = np.clip(np.rint(blocks / scale[:, None, :]), -8, 7).astype(np.int8).reshape(kb * block, N)[:K]
    nibbles = q.reshape(-1).view(np.uint8) & 0x0F
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    return (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8), scale


# -- rescoring an int4 lm_head ------------------------------------------------------------------------------------------
def int8_rows(w: np.ndarray, block: int = RESCORE_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """A [V, H] table as GatherBlockQuantized's uint8 data (int8 + 128, symmetric) and scales [V, H / block]."""
    v, h = w.shape
    blocks = np.asarray(w, np.float32).reshape(v, h // block, block)
    scales = (np.maximum(np.abs(blocks).max(-1), 1e-30) / 127).astype(np.float32)
    q = np.clip(np.rint(blocks / scales[..., None]), -127, 127).astype(np.int16) + 128
    return q.astype(np.uint8).reshape(v, h), scales


def _int8_table(graph, name: str, w: np.ndarray, sink):
    """A [V, H] table as `int8_rows`' rows and scales, a slice of rows at a time (MedGemma's is 2.7 GB in fp32)."""
    import onnx_ir as ir

    v, h = w.shape
    scales = np.zeros((v, h // RESCORE_BLOCK), np.float32)
    step = max(1, CHUNK_BYTES // (4 * h))

    def rows():
        for r in range(0, v, step):
            q, scales[r:r + step] = int8_rows(w[r:r + step])
            yield q

    rows_value = _initializer(graph, f"{name}_int8", sink.add(f"{name}_int8", rows(), ir.DataType.UINT8, (v, h)))
    return rows_value, _initializer(graph, f"{name}_scales", sink.add(f"{name}_scales", [scales], ir.DataType.FLOAT,
                                                                       scales.shape))


def add_rescoring(graph, logits, hidden, rows, scales, top_k: int) -> None:
    """Recompute the `top_k` highest logits of an int4 lm_head from int8 rows.

    The lm_head (Gemma 3's tied 262k-row vocabulary projection) is most of the bytes and arithmetic of a decode step
    on small models, and int4 costs it the most accuracy (README "Precisions"). Rescored, every token that can win a
    greedy or top-k/top-p choice has int8-accurate logits and only the tail of the softmax keeps int4 error; the
    int8 rows cost V x H bytes of memory, but a step reads only the chosen ones (GatherBlockQuantized, exact for a
    table that was int8 to begin with, like the Gemma 3 GGUF's Q8_0 one).

    An edit of the converted graph (onnx_ir), not a form of the export: one trace serves every precision. `logits`
    [B, L, V] is the int4 MatMulNBits' output, `hidden` [B, L, H] its input, `rows` [V, H] uint8 (int8 + 128) and
    `scales` [V, H / RESCORE_BLOCK] the table (`int8_rows`). The top-k runs in two exact stages, at half the cost of
    one TopK over the vocabulary: the max of each group of RESCORE_GROUP logits, the k best groups, then the k best
    of their logits. Fewer than k groups can hold a logit above the k-th best, so its group is always kept."""
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
        return constant(graph, f"lm_head_rescore.{name}", np.asarray(array, np.int64))

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


def constant(graph, name: str, array: np.ndarray):
    """An initializer holding `array`, registered in `graph`."""
    import onnx_ir as ir

    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                     const_value=ir.tensor(array, name=name))
    graph.register_initializer(value)
    return value
