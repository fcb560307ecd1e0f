"""Quantised token-embedding tables (Gemma 3's is 262k x 2560, the largest single weight of MedGemma 4B).

The fp32 embed_tokens graph is `Gather(table, input_ids) -> Mul(sqrt(hidden))`. Quantising rewrites only the
Gather, so Gemma's normaliser stays the graph's own constant, applied as in fp32. Rows are quantised symmetrically
in blocks along the hidden axis, one fp32 scale per block (the component's output is fp32 in every bundle, and
GatherBlockQuantized's output takes its scales' type). Forms (`FORMS`):

- "GatherBlockQuantized" (ORT flavour: CPU targets and ONNX Runtime CUDA): one com.microsoft op that gathers the
  quantised rows and their scales and dequantises them. int8 as uint8 data with GatherBlockQuantized's default zero
  point 128 (`bits` 8); int4 as an INT4 tensor (symmetric, default zero point 0), the form ONNX Runtime's own
  quantiser writes for a Gather (DefaultWeightOnlyQuantizer.quantize_gather).
- "Gather int8 + DequantizeLinear" (portable flavour, TensorRT): standard ops only. The int8 rows are gathered from an
  int8 initializer, turned into floats by a per-tensor DequantizeLinear (scale 1, zero point 0: exact integers), and
  multiplied by the gathered per-block scales. A blocked DequantizeLinear cannot do it in one step: TensorRT takes a
  DequantizeLinear's scale only as a build-time constant, and the gathered scales are not. int4 has no portable form:
  TensorRT dequantises int4 only as a weight (blocked DequantizeLinear on a constant feeding a MatMul/Conv), never
  rows gathered at run time (medc.compile.lint, rule "embed-int8-gather", states what the int8 form relies on).

The bytes come from ONNX Runtime's block quantisers (the 8-bit one MatMulNBits uses, the 4-bit one of its Gather
quantiser), a slice of rows at a time, so the fp32 table is never copied whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medc.compile.weight_only import CHUNK_BYTES, MemorySink, _initializer, constant
from medc.errors import MedcError

ORT_FORM = "GatherBlockQuantized"
PORTABLE_FORM = "Gather int8 + DequantizeLinear"
FORMS = {"ort": ORT_FORM, "portable": PORTABLE_FORM}  # graph flavour -> form
# GPU targets with tied embeddings: the table is the int8 lm_head's rows, stored once in the decoder's data file
# (weight_only.WeightOnlyConfig.head_rows). The engine holds the lm_head; embed_tokens runs on ONNX Runtime's CPU
# provider, which maps the data file and reads only the rows it gathers, so the table costs no second copy.
SHARED_FORM = "the lm_head's int8 rows (Gather int8 + DequantizeLinear)"
SHARED_PROVIDER = "CPUExecutionProvider"
BITS = {"int8": 8, "int4": 4}
BLOCK_SIZES = (16, 32, 64, 128)  # GatherBlockQuantized: a power of 2, at least 16
DEFAULT_BLOCK = 32
PORTABLE_INT4_RULE = (
    "TensorRT dequantises int4 only as a weight: a blocked DequantizeLinear on a constant initializer feeding a "
    "MatMul/Conv (its int4 weight-only quantization). Rows gathered from an int4 table at run time are an int4 "
    "activation, which TensorRT does not take")


@dataclass(frozen=True)
class EmbeddingConfig:
    """How an embedding table is quantised: precision, the graph form (a value of `FORMS`), rows' block size."""

    precision: str  # "int8" | "int4"
    form: str = ORT_FORM
    block_size: int = DEFAULT_BLOCK

    @property
    def bits(self) -> int:
        return BITS[self.precision]


def config_for(precision: str, flavour: str, block_size: int = DEFAULT_BLOCK) -> EmbeddingConfig:
    """The embedding's conversion for a recipe precision and graph flavour; a clear error where there is none."""
    if precision not in BITS:
        raise MedcError(f"embed_tokens has no quantised form at {precision}; choose int8 or int4.")
    if block_size not in BLOCK_SIZES:
        raise MedcError(f"embed_block_size {block_size}: choose one of {', '.join(map(str, BLOCK_SIZES))}.")
    if flavour == "portable" and precision == "int4":
        raise MedcError(f"embed_tokens=int4 has no portable (TensorRT) form: {PORTABLE_INT4_RULE}. Use "
                        "embed_tokens=int8 for TensorRT targets, or int4 on the ORT flavour (--flavour ort).")
    return EmbeddingConfig(precision, FORMS[flavour], block_size)


def shares_head(precisions: dict[str, str], flavour: str, gpu: bool, tied: bool, reduced: bool) -> bool:
    """Whether embed_tokens reads the lm_head's rows (SHARED_FORM): the portable flavour on a GPU target (an engine
    folds the rows' transpose into its weights once; ONNX Runtime's CPU provider would dequantise and transpose the
    whole table at every step), both int8, embeddings tied to the lm_head, and every row kept (a reduced
    vocabulary's lm_head has fewer rows)."""
    return (flavour == "portable" and gpu and tied and not reduced and precisions.get("embed_tokens") == "int8"
            and precisions.get("lm_head", precisions.get("decoder")) == "int8")


def stored_bytes(vocab: int, hidden: int, precision: str, block_size: int = DEFAULT_BLOCK) -> int:
    """Bytes of the quantised table as stored: its rows (packed) plus one fp32 scale per block."""
    return vocab * hidden * BITS[precision] // 8 + 4 * vocab * (-(-hidden // block_size))


# -- the quantisation ------------------------------------------------------------------------------------------------
def int8_blocks(table: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 blocks along the rows of a [V, H] table: (uint8 values = int8 + 128, scales [V, H / block]).
    ONNX Runtime's 8-bit block quantiser (the one its MatMulNBits quantiser calls), whose blocks run along K of a
    [K, N] weight: the table's transpose, one slice of rows at a time."""
    from onnxruntime.capi._pybind_state import quantize_matmul_8bits

    v, h = table.shape
    kb = h // block
    rows = np.empty((v, h), np.uint8)
    scales = np.empty((v, kb), np.float32)
    step = max(1, CHUNK_BYTES // (4 * h))
    for r0 in range(0, v, step):
        part = np.ascontiguousarray(np.asarray(table[r0:r0 + step], np.float32).T)  # [H, n]
        n = part.shape[1]
        p, s = np.empty((n, kb, block), np.uint8), np.empty((n, kb), np.float32)
        quantize_matmul_8bits(p, part, s, np.empty((n, 1), np.uint8), block, n, h, True)
        rows[r0:r0 + n], scales[r0:r0 + n] = p.reshape(n, h), s
    return rows, scales


def int4_blocks(table: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int4 blocks along the rows of a [V, H] table: (values packed two per byte, low nibble first: ONNX's
    INT4 layout of [V, H]; scales [V, H / block]). ONNX Runtime's Gather quantiser's routine
    (DefaultWeightOnlyQuantizer.quantize_ndarray), a slice of rows at a time."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantizer

    v, h = table.shape
    packed = np.empty(v * h // 2, np.uint8)
    scales = np.empty((v, h // block), np.float32)
    step = max(2, CHUNK_BYTES // (4 * h)) // 2 * 2  # whole bytes per slice for any H
    for r0 in range(0, v, step):
        part = np.asarray(table[r0:r0 + step], np.float32)
        q, s, _ = DefaultWeightOnlyQuantizer.quantize_ndarray(part, 1, block, True)
        packed[r0 * h // 2:(r0 + len(part)) * h // 2], scales[r0:r0 + len(part)] = q, s.reshape(len(part), -1)
    return packed, scales


def _table_gather(graph):
    """The Gather that reads the embedding table: a 2-D initializer at input 0."""
    for node in graph:
        if node.op_type == "Gather" and node.domain == "" and node.inputs[0] is not None \
                and node.inputs[0].is_initializer() and len(node.inputs[0].shape) == 2:
            return node
    raise MedcError("internal: the embed_tokens graph has no Gather of a 2-D table to quantise")


def quantize_embedding(model, config: EmbeddingConfig) -> dict:
    """Rewrite, in place, the table Gather of an onnx_ir embedding graph into `config`'s form; returns the manifest's
    `quantization` record."""
    import onnx_ir as ir

    graph = model.graph
    gather = _table_gather(graph)
    value, ids = gather.inputs[0], gather.inputs[1]
    table = value.const_value.numpy()
    v, h = table.shape
    block = config.block_size
    if h % block:
        raise MedcError(f"embed_tokens: hidden size {h} is not a multiple of the block size {block}; choose an "
                        f"embed_block_size that divides it ({', '.join(str(b) for b in BLOCK_SIZES if h % b == 0)}).")
    sink, name = MemorySink(), value.name
    if config.form == PORTABLE_FORM and config.bits != 8:
        raise MedcError(f"embed_tokens={config.precision} has no portable (TensorRT) form: {PORTABLE_INT4_RULE}.")
    if config.bits == 8:
        data, scales = int8_blocks(table, block)
    else:
        data, scales = int4_blocks(table, block)
    del table
    s = _initializer(graph, f"{name}_scales", sink.add(f"{name}_scales", [scales], ir.DataType.FLOAT, scales.shape))
    if config.form == ORT_FORM:
        dtype = ir.DataType.UINT8 if config.bits == 8 else ir.DataType.INT4
        q = _initializer(graph, f"{name}_Q{config.bits}", sink.add(f"{name}_Q{config.bits}", [data], dtype, (v, h)))
        new = [ir.node("GatherBlockQuantized", [q, ids, s], domain="com.microsoft", name=f"{gather.name}_Q",
                       attributes={"bits": config.bits, "block_size": block, "gather_axis": 0, "quantize_axis": 1})]
        graph.opset_imports.setdefault("com.microsoft", 1)
    else:
        int8 = (data.view(np.int8) ^ np.int8(-128)).view(np.int8)  # uint8 (int8 + 128) -> int8: flip the top bit
        q = _initializer(graph, f"{name}_int8", sink.add(f"{name}_int8", [int8], ir.DataType.INT8, (v, h)))
        one = constant(graph, f"{name}_unit_scale", np.array(1.0, np.float32))
        zero = constant(graph, f"{name}_zero_point", np.array(0, np.int8))
        split = constant(graph, f"{name}_blocks", np.array([0, 0, h // block, block], np.int64))
        rows_shape = constant(graph, f"{name}_rows", np.array([0, 0, h], np.int64))
        last = constant(graph, f"{name}_last_axis", np.array([-1], np.int64))
        rows = ir.node("Gather", [q, ids], attributes={"axis": 0}, name=f"{gather.name}_int8")
        exact = ir.node("DequantizeLinear", [rows.outputs[0], one, zero], name=f"{gather.name}_DequantizeLinear")
        blocks = ir.node("Reshape", [exact.outputs[0], split], name=f"{gather.name}_blocks")
        picked = ir.node("Gather", [s, ids], attributes={"axis": 0}, name=f"{gather.name}_scales")
        per_block = ir.node("Unsqueeze", [picked.outputs[0], last], name=f"{gather.name}_scales_unsqueeze")
        scaled = ir.node("Mul", [blocks.outputs[0], per_block.outputs[0]], name=f"{gather.name}_scale")
        new = [rows, exact, blocks, picked, per_block, scaled,
               ir.node("Reshape", [scaled.outputs[0], rows_shape], name=f"{gather.name}_dequantized")]
    ir.convenience.replace_nodes_and_values(graph, gather, [gather], new, gather.outputs, new[-1].outputs)
    graph.initializers.pop(name)
    return record(config)


def record(config: EmbeddingConfig) -> dict:
    """The manifest's `quantization` record of a quantised embedding."""
    return {"method": "embedding", "format": config.form, "bits": config.bits, "block_size": config.block_size,
            "weights": f"{config.precision} symmetric per block of {config.block_size} along the hidden axis, "
                       "fp32 scales", "normaliser": "sqrt(hidden) Mul kept from the fp32 graph"}


def share_head(raw: Path, decoder: Path, dst: Path, head_rows: dict[str, str]) -> dict:
    """Write `dst`, the embed_tokens graph `raw` (fp32, as exported) with its table replaced by the decoder's int8
    lm_head rows: `head_rows` names the rows [V, H] and their per-row scales [V] (weight_only's record), which stay
    in the decoder's data file and are referenced from there. Gather rows -> DequantizeLinear (scale 1: exact
    integers) -> Mul by the gathered row scales (fp32) -> the graph's own normaliser. Returns the manifest record."""
    import onnx
    from onnx import TensorProto, helper
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    stored = {t.name: t for t in onnx.load(str(decoder), load_external_data=False).graph.initializer}
    rows, scale = stored[head_rows["rows"]], stored[head_rows["scale"]]
    if not uses_external_data(rows):
        raise MedcError(f"internal: the lm_head rows {rows.name} are not in {decoder.name}'s data file")
    for t in (rows, scale):  # paths are relative to the graph: the decoder's file, beside this one in the bundle
        for entry in t.external_data:
            if entry.key == "location" and (decoder.parent / entry.value).parent != decoder.parent:
                raise MedcError(f"internal: {t.name} is stored outside the bundle folder")
    model = onnx.load(str(raw), load_external_data=False)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    at, gather = next((i, n) for i, n in enumerate(graph.node) if n.op_type == "Gather" and n.input[0] in inits
                      and len(inits[n.input[0]].dims) == 2)
    table = inits[gather.input[0]]
    if tuple(table.dims) != tuple(rows.dims):
        raise MedcError(f"internal: embed_tokens table {list(table.dims)} != lm_head rows {list(rows.dims)}")
    graph.initializer.remove(table)
    for t in graph.initializer:
        if uses_external_data(t):
            load_external_data_for_tensor(t, str(raw.parent))
    ids, out, name = gather.input[1], gather.output[0], gather.name or "embed"
    consts = [helper.make_tensor(f"{name}_unit_scale", TensorProto.FLOAT, [], [1.0]),
              helper.make_tensor(f"{name}_zero_point", TensorProto.INT8, [], [0]),
              helper.make_tensor(f"{name}_last_axis", TensorProto.INT64, [1], [-1])]
    picked = f"{name}_row_scales"
    nodes = [helper.make_node("Gather", [rows.name, ids], [f"{name}_int8"], axis=0, name=f"{name}_int8"),
             helper.make_node("DequantizeLinear", [f"{name}_int8", consts[0].name, consts[1].name], [f"{name}_exact"],
                              name=f"{name}_DequantizeLinear"),
             helper.make_node("Gather", [scale.name, ids], [picked], axis=0, name=f"{name}_scales")]
    if scale.data_type != TensorProto.FLOAT:  # an fp16 decoder's scales (W4A16 / W8A16): the output is fp32
        nodes.append(helper.make_node("Cast", [picked], [f"{picked}_fp32"], to=TensorProto.FLOAT,
                                      name=f"{name}_scales_fp32"))
        picked = f"{picked}_fp32"
    nodes += [helper.make_node("Unsqueeze", [picked, consts[2].name], [f"{name}_scales_unsqueezed"],
                               name=f"{name}_scales_unsqueeze"),
              helper.make_node("Mul", [f"{name}_exact", f"{name}_scales_unsqueezed"], [out], name=f"{name}_scale")]
    graph.node.remove(gather)
    for i, node in enumerate(nodes):
        graph.node.insert(at + i, node)
    graph.initializer.extend([rows, scale, *consts])
    dst.unlink(missing_ok=True)
    onnx.save(model, str(dst))
    return {"method": "embedding", "format": SHARED_FORM, "bits": 8, "block_size": int(rows.dims[1]),
            "weights": "the decoder's int8 lm_head, stored once: symmetric per row (output channel), scales "
                       f"{'fp16' if scale.data_type == TensorProto.FLOAT16 else 'fp32'} as the lm_head keeps them",
            "shares": {"component": "decoder", "tensors": [rows.name, scale.name]},
            "provider": SHARED_PROVIDER, "normaliser": "sqrt(hidden) Mul kept from the fp32 graph"}
