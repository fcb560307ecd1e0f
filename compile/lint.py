"""TensorRT-readiness lint: will TensorRT's ONNX parser take a bundle's graphs, for each TensorRT version its target
names? Proven on the CPU from the graphs alone, weights never loaded (`lint_bundle`, `lint_model`; the rules are
`RULES`). It only checks: the TensorRT stage (compile/tensorrt.py) makes the rewrites."""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

from medc.errors import MedcError
from medc.manifest import Manifest
from medc.system import version_tuple
from medc.targets import TARGETS, get_target

# TensorRT cannot be installed on a machine without an NVIDIA GPU (the PyPI `tensorrt` wheels download from NVIDIA at
# install time), so this proves on the CPU what can be proven from the graphs alone, against what the parser documents
# and what its importers check. `lint_bundle` reads every graph of a bundle without its weights
# (`onnx.load(..., load_external_data=False)`; the few constants a rule reads are memory-mapped), and `lint_model`
# checks one graph, for every TensorRT version the target lists (`targets/profiles/*.json`: "10.3" JetPack 6.1/6.2
# Orin, "10.13" Thor and data-center GPUs, "11.4" JetPack 7.2 Orin). Rules (`RULES`):
#
# - operators: every node's domain and op type against the parser's operator table for that version, with the data
#   types it lists per op, and the cheap-to-check restrictions (Resize modes, Pad modes, constant axes...). ONNX
#   Runtime contrib ops (com.microsoft MatMulNBits, DynamicQuantizeLinear/MatMulInteger, SkipLayerNormalization,
#   BiasGelu, Attention, and SimplifiedLayerNormalization, which ONNX Runtime registers in the default domain) have no
#   importer: the parser looks unknown ops up as plugins, and there are none.
# - data types: no double; bf16 / fp8 only where the target's hardware has them. int64: TensorRT 9.0 made INT64 a
#   native type ("The ONNX parser no longer automatically casts INT64 to INT32 ... models with INT64 I/O require INT64
#   bindings", onnx-tensorrt docs/Changelog.md; ModelImporter.cpp only warns "Make sure output ... has Int64
#   binding"), and shape tensors are int64 in TensorRT 10, so int64 graph inputs and shape arithmetic need no int32
#   conversion on any TensorRT this lint knows (10.x, 11.x). What does need a change is an operator whose table row
#   lacks the type its data arrives in: the decoder's CumSum over int64 image-block ids (CumSum: FP32, FP16, BF16) and
#   its Pad of a bool mask (Pad: no BOOL). The TensorRT stage of the build (compile/tensorrt.py, make_trt_ready) puts
#   exact cast islands around those nodes (`TYPE_ISLANDS`) and re-checks the golden data. This module only checks: it
#   never changes a graph.
# - explicit quantization (onnxOpImporters.cpp, QuantDequantLinearHelper; IDequantizeLayer API): Q/DQ with int8
#   zero points that are 0 (TensorRT is symmetric only; a uint8 zero point is rejected by DequantizeLinear and read as
#   int8 by QuantizeLinear), positive scales, per-tensor activations, per-channel weights along the output channels;
#   no int32 DequantizeLinear (quantised bias); int4 only as weight-only blocked DequantizeLinear on an initializer
#   (`block_size`, opset >= 21, 2-D, zero point 0 or absent; INT4 arrived in TensorRT 10.0); fp8 only on targets
#   whose precisions include fp8 (never on Orin).
# - opset: 9 up to the parser's documented maximum (older is an error; newer is a warning: ModelImporter.cpp has no
#   upper bound, but node versions newer than the parser knows may be refused).
# - dynamic shapes: with optimisation profiles (the bundle's `tensorrt/profiles.json` when the build wrote one),
#   every dynamic input dim needs min/opt/max, static dims must match, and the max shapes must fit the target.
# - fp16 graphs: fp32 islands are reported as info (expected, e.g. Gemma 3's overflow-prone parts).
#
# Sources (read with the `search` tool, cited where used): onnx/onnx-tensorrt docs/operators.md as released with
# TensorRT 10.15 (the table below) and its 10.0 header ("opset 9 to opset 20"); docs/Changelog.md (10.0 EA to 10.15,
# for the versions in between); ModelImporter.cpp and onnxOpImporters.cpp (TensorRT 10.x); the TensorRT API reference
# for IDequantizeLayer; docs.nvidia.com/deeplearning/tensorrt/latest/reference/onnx-opset-guide.html (TensorRT 11.x:
# ONNX 1.20, opset up to 25).

log = logging.getLogger(__name__)

# -- rules -------------------------------------------------------------------------------------------------------------
# Every finding names one of these. Severity "error" = the parser (or the TensorRT builder) refuses the graph, or the
# engine would compute something else than ONNX Runtime; "warning" = parses, but check it; "info" = expected.
RULES: dict[str, tuple[str, str]] = {
    "bundle-target": ("error", "the bundle was built for a target without TensorRT (ONNX Runtime graphs)"),
    "bundle-other-target": ("warning", "the bundle was built for another TensorRT target"),
    "op-contrib": ("error", "an operator outside the ONNX domain (ONNX Runtime contrib op): no TensorRT importer"),
    "op-unsupported": ("error", "an ONNX operator this TensorRT version's parser does not import"),
    "op-type": ("error", "an operator on a data type the parser does not list for it"),
    "op-restriction": ("error", "an operator outside the restrictions the parser documents"),
    "dtype-double": ("error", "a double tensor (TensorRT casts it down to float, clamping)"),
    "dtype-bf16": ("error", "a bf16 tensor on a GPU without bf16"),
    "dtype-int64-io": ("info", "int64 graph inputs/outputs: native in TensorRT >= 9, bound as int64"),
    "opset-too-old": ("error", "default-domain opset below the parser's range"),
    "opset-newer": ("warning", "default-domain opset above the parser's documented range"),
    "qdq-type": ("error", "Q/DQ of a type TensorRT does not quantize to (int32 bias, int16, fp8 e5m2, ...)"),
    "qdq-uint8": ("error", "uint8 Q/DQ: asymmetric, refused or read as int8 by TensorRT"),
    "qdq-zero-point": ("error", "a zero point that is not a constant 0 (TensorRT is symmetric only)"),
    "qdq-scale": ("error", "a scale that is not positive, or of a shape TensorRT does not take"),
    "qdq-activation-per-channel": ("error", "an activation quantized per channel or per block (per-tensor only)"),
    "qdq-weight-per-tensor": ("warning", "int8 weights quantized per tensor (per-channel keeps accuracy)"),
    "qdq-weight-axis": ("warning", "per-channel weights not along the output channels"),
    "qdq-block-type": ("warning", "block quantization of a type other than int4"),
    "int4-unsupported-version": ("error", "INT4 on a TensorRT without INT4 (before 10.0)"),
    "int4-not-weight": ("error", "int4 on an activation: TensorRT has int4 weight-only quantization"),
    "int4-not-blocked": ("error", "int4 DequantizeLinear without blocks (block_size, scale of the input's rank)"),
    "int4-opset": ("error", "int4 DequantizeLinear below opset 21 (where int4 and block_size arrived)"),
    "int4-shape": ("error", "int4 blocked weights that are not 2-D, blocked on another axis, or of odd size"),
    "fp8-target": ("error", "fp8 Q/DQ on a target without fp8"),
    "profile-missing": ("error", "a dynamic input dimension without an optimisation-profile entry"),
    "profile-shape": ("error", "a profile shape of the wrong rank, not min <= opt <= max, or off a static dim"),
    "profile-memory": ("error", "the profile's max input shapes do not fit the target's memory"),
    "profile-context": ("warning", "a profile's max beyond the model's context"),
    "profiles-absent": ("info", "dynamic inputs, no optimisation profiles given to check"),
    "profiles-unreadable": ("warning", "tensorrt/profiles.json is not in a form the lint reads"),
    "fp16-island": ("info", "fp32 islands in an fp16 graph (expected)"),
    "embed-int8-gather": ("warning", "int8 rows gathered from a constant table, then dequantised (a quantised "
                                     "embedding): relies on TensorRT rules this machine cannot run"),
    "weight-dq-transpose": ("warning", "a constant int8 weight dequantised per row, then transposed into a MatMul "
                                       "(an lm_head stored as the token-embedding rows): relies on TensorRT rules "
                                       "this machine cannot run"),
    "cpu-component": ("info", "a component the runtime runs on ONNX Runtime's CPU provider, not as an engine"),
}


@dataclass(frozen=True)
class Finding:
    rule: str  # a key of RULES
    severity: str  # "error" | "warning" | "info"
    component: str
    name: str  # the node or tensor; "" for the whole graph or bundle
    message: str  # the problem and the fix
    tensorrt: tuple[str, ...] = ()  # the TensorRT versions it applies to; () = every version checked

    def to_json(self) -> dict:
        return {**asdict(self), "tensorrt": list(self.tensorrt)}


@dataclass
class LintReport:
    target: str
    tensorrt: tuple[str, ...]  # the versions checked
    findings: list[Finding] = field(default_factory=list)
    components: dict[str, dict] = field(default_factory=dict)  # name -> file, nodes, opset, precision
    bundle: str | None = None

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    @property
    def ok(self) -> bool:
        """TRT-ready: no errors (warnings and notes allowed)."""
        return not self.errors

    def rules(self, severity: str | None = None) -> set[str]:
        return {f.rule for f in self.findings if severity is None or f.severity == severity}

    def to_json(self) -> dict:
        return {"bundle": self.bundle, "target": self.target, "tensorrt": list(self.tensorrt), "ok": self.ok,
                "counts": dict(Counter(f.severity for f in self.findings)), "components": self.components,
                "findings": [f.to_json() for f in self.findings]}

    def render(self) -> str:
        head = f"medc lint {self.bundle or '(graph)'} for {self.target} (TensorRT {', '.join(self.tensorrt)})"
        lines = [head]
        for name, c in self.components.items():
            n = Counter(f.severity for f in self.findings if f.component == name)
            state = "ok" if not n["error"] else f"{n['error']} error(s)"
            lines.append(f"  {name}: {c['file'] + ', ' if c.get('file') else ''}{c.get('nodes', 0)} nodes, opset {c.get('opset')}, "
                         f"{c.get('precision') or '-'}: {state}, {n['warning']} warning(s), {n['info']} note(s)")
        # Identical problems on many nodes (37 MatMulNBits) are one line with the node names.
        groups: dict[tuple, list[str]] = defaultdict(list)
        for f in self.findings:
            groups[(f.severity, f.rule, f.component, f.message, f.tensorrt)].append(f.name)
        order = {"error": 0, "warning": 1, "info": 2}
        for (sev, rule, comp, message, trt), names in sorted(groups.items(), key=lambda g: (order[g[0][0]], g[0][2])):
            where = (comp or "bundle") + (f" ({len(names)}x: {', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
                            if any(names) else "")
            trt_note = f" [TensorRT {', '.join(trt)}]" if trt else ""
            lines.append(f"  {sev} [{rule}] {where}: {message}{trt_note}")
        return "\n".join(lines)


# -- the parser's operator table ----------------------------------------------------------------------------------------
# onnx/onnx-tensorrt docs/operators.md as released with TensorRT 10.15 ("supports operators in the inclusive range of
# opset 9 to opset 24"), "Supported Types" column, every row marked Y; F = FP32, FP16, BF16. Ops missing here are N
# (or not in ONNX). Earlier versions are this table minus what docs/Changelog.md says arrived later (_ADDED_IN,
# _TYPES_ADDED_IN). TensorRT 11.x: no 11.x table in our sources; its release notes remove no ONNX operator, so 11.x
# uses this table with the opset range of the TensorRT 11 ONNX Opset Guide (up to 25).
_OPS_TEXT = """
Abs: F INT32 INT64 | Acos: F | Acosh: F | Add: F INT32 INT64 | And: BOOL | ArgMax: F INT32 INT64
ArgMin: F INT32 INT64 | Asin: F | Asinh: F | Atan: F | Atanh: F | Attention: F INT8 FP8 | AveragePool: F
BatchNormalization: F | BlackmanWindow: FP32 FP16 | Cast: F INT32 INT64 UINT8 BOOL
CastLike: F INT32 INT64 UINT8 BOOL | Ceil: F | Celu: F | Clip: F | Concat: F INT32 INT64 BOOL
Constant: F FP8 FP4 INT4 INT32 INT64 BOOL | ConstantOfShape: F FP8 FP4 INT4 INT32 INT64 BOOL | Conv: F
ConvTranspose: F | Cos: F | Cosh: F | CumSum: F | DeformConv: FP32 FP16 | DepthToSpace: F INT32 INT64
DequantizeLinear: INT8 FP8 FP4 INT4 | Div: F INT32 INT64 | Dropout: F | Einsum: F | Elu: F
Equal: F INT32 INT64 | Erf: F | Exp: F | Expand: F INT32 INT64 BOOL | EyeLike: F INT32 INT64 BOOL
Flatten: F INT32 INT64 BOOL | Floor: F | Gather: F INT32 INT64 BOOL | GatherElements: F INT32 INT64 BOOL
GatherND: F INT32 INT64 BOOL | Gelu: F INT8 INT32 INT64 | Gemm: F | GlobalAveragePool: F | GlobalLpPool: F
GlobalMaxPool: F | Greater: F INT32 INT64 | GreaterOrEqual: F INT32 INT64 | GridSample: FP32 FP16
GroupNormalization: F | GRU: F | HammingWindow: FP32 FP16 | HannWindow: FP32 FP16 | HardSigmoid: F | HardSwish: F
Hardmax: F | Identity: F INT32 INT64 BOOL | If: F INT32 INT64 BOOL | ImageScaler: F | InstanceNormalization: F
IsInf: F | IsNaN: F INT32 INT64 | LayerNormalization: F | LeakyRelu: F | Less: F INT32 INT64
LessOrEqual: F INT32 INT64 | Log: F | LogSoftmax: F | Loop: F INT32 INT64 BOOL | LRN: F | LSTM: F
LpNormalization: F | LpPool: F | MatMul: F | Max: F INT32 INT64 | MaxPool: F | Mean: F FP8 INT32 INT64
MeanVarianceNormalization: F | Min: F INT32 INT64 | Mish: FP32 FP16 | Mod: F INT32 INT64 | Mul: F INT32 INT64
Neg: F INT32 INT64 | NonMaxSuppression: FP32 FP16 | NonZero: FP32 FP16 | Not: BOOL | OneHot: F INT32 INT64 BOOL
Or: BOOL | Pad: F INT32 INT64 | ParametricSoftplus: F | Pow: F INT32 INT64 | PRelu: F | QuantizeLinear: F
RandomNormal: F | RandomNormalLike: F | RandomUniform: F | RandomUniformLike: F | Range: F INT32 INT64
Reciprocal: F | ReduceL1: F INT32 INT64 | ReduceL2: F INT32 INT64 | ReduceLogSum: F INT32 INT64
ReduceLogSumExp: F INT32 INT64 | ReduceMax: F INT32 INT64 | ReduceMean: F INT32 INT64 | ReduceMin: F INT32 INT64
ReduceProd: F INT32 INT64 | ReduceSum: F INT32 INT64 | ReduceSumSquare: F INT32 INT64 | Relu: F INT32 INT64
Reshape: F INT32 INT64 BOOL | Resize: F | ReverseSequence: F INT32 INT64 BOOL | RMSNormalization: F | RNN: F
RoiAlign: FP32 FP16 | RotaryEmbedding: F | Round: F | STFT: FP32 | ScaledTanh: F | Scan: F
Scatter: F INT32 INT64 | ScatterElements: F INT32 INT64 | ScatterND: F INT32 INT64 | Selu: F
Shape: F INT32 INT64 BOOL | Shrink: F INT32 INT64 | Sigmoid: F | Sign: F INT32 INT64 | Sin: F | Sinh: F
Size: F INT32 INT64 BOOL | Slice: F INT32 INT64 BOOL | Softmax: F | Softplus: F | Softsign: F
SpaceToDepth: F INT32 INT64 | Split: F INT32 INT64 BOOL | Sqrt: F | Squeeze: F INT32 INT64 BOOL
Sub: F INT32 INT64 | Sum: F INT32 INT64 | Tan: F | Tanh: F | TensorScatter: F INT32 | ThresholdedRelu: F
Tile: F INT32 INT64 BOOL | TopK: F INT32 INT64 | Transpose: F INT32 INT64 BOOL | Trilu: F INT32 INT64 BOOL
Unsqueeze: F INT32 INT64 BOOL | Upsample: F | Where: F INT32 INT64 BOOL | Xor: BOOL
"""


def _parse_ops(text: str) -> dict[str, frozenset[str]]:
    ops = {}
    for entry in text.replace("\n", "|").split("|"):
        if entry.strip():
            op, types = entry.split(":")
            ops[op.strip()] = frozenset(t for tok in types.split() for t in (("FP32", "FP16", "BF16") if tok == "F"
                                                                              else (tok,)))
    return ops


_OPS_10_15 = _parse_ops(_OPS_TEXT)

# docs/Changelog.md: the TensorRT version whose parser first imports an op (ops older than 10.0 are not listed).
# Gelu (ONNX opset 20) is in the 10.0 range ("opset 9 to opset 20"), with TensorRT 10.0's GELU_ERF/GELU_TANH
# activations; the 10.15 table lists it.
_ADDED_IN: dict[str, tuple[int, int]] = {
    "BlackmanWindow": (10, 4), "HammingWindow": (10, 4), "HannWindow": (10, 4),  # 10.4 GA
    "STFT": (10, 5),  # 10.5 GA: real-valued STFT
    "Attention": (10, 14),  # 10.14 GA
    "RotaryEmbedding": (10, 15), "RMSNormalization": (10, 15), "TensorScatter": (10, 15),  # 10.15 GA
}
# Types a row gained after 10.0: FP4 (FLOAT4E2M1) in 10.8; integer Pow exponents in 10.8 and bases in 10.12.
_TYPES_ADDED_IN: dict[tuple[str, str], tuple[int, int]] = {
    **{(op, "FP4"): (10, 8) for op in ("Constant", "ConstantOfShape", "DequantizeLinear")},
    ("Pow", "INT32"): (10, 12), ("Pow", "INT64"): (10, 12),
}
# Default-domain opset range of each parser: operators.md headers (10.0: 9-20; 10.15: 9-24), the ONNX submodule
# updates in docs/Changelog.md (10.6: ONNX 1.17 = opset 22; 10.11: ONNX 1.18 = opset 23) and the TensorRT 11.x ONNX
# Opset Guide (ONNX 1.20, opset 25). Below 9 is unsupported; above the max is only a warning (no check in
# ModelImporter.cpp).
_OPSET_MAX: tuple[tuple[tuple[int, int], int], ...] = (((11, 0), 25), ((10, 15), 24), ((10, 11), 23),
                                                        ((10, 6), 22), ((10, 0), 20))
OPSET_MIN = 9


@dataclass(frozen=True)
class ParserSpec:
    """What one TensorRT version's ONNX parser imports."""

    version: str  # "10.3"
    opset_max: int
    ops: dict[str, frozenset[str]]  # op type -> data types of its data operand

    @property
    def v(self) -> tuple[int, int]:
        return _version(self.version)

    @property
    def int4(self) -> bool:  # docs/Changelog.md, 10.0 EA: "Added support for INT4 quantization"
        return self.v >= (10, 0)


def _version(text: str) -> tuple[int, int]:
    try:
        major, minor = version_tuple(text, 2)
    except ValueError:
        raise MedcError(f"TensorRT version {text!r} is not major.minor (e.g. 10.3); fix the target profile.") from None
    return major, minor


def parser_spec(version: str) -> ParserSpec:
    """The operator table and opset range of TensorRT `version`'s ONNX parser (10.x or 11.x)."""
    v = _version(version)
    if v < (10, 0) or v >= (12, 0):
        raise MedcError(f"medc lints TensorRT 10.x and 11.x graphs, not {version} (8.6 lacks int4 weight-only and "
                        "int64; a newer major is not tabled yet). Use a target profile with TensorRT 10+.")
    ops = {}
    for op, types in _OPS_10_15.items():
        if v < (11, 0) and v < _ADDED_IN.get(op, (0, 0)):
            continue
        ops[op] = frozenset(t for t in types if v >= (11, 0) or v >= _TYPES_ADDED_IN.get((op, t), (0, 0)))
    opset_max = next(m for since, m in _OPSET_MAX if v >= since)
    return ParserSpec(str(version), opset_max, ops)


# -- reading a graph without its weights --------------------------------------------------------------------------------
# ONNX element type -> the names operators.md uses.
_TRT_TYPES = {1: "FP32", 10: "FP16", 16: "BF16", 6: "INT32", 7: "INT64", 3: "INT8", 2: "UINT8", 9: "BOOL",
              17: "FP8", 22: "INT4", 23: "FP4", 11: "DOUBLE"}


def type_name(elem_type: int) -> str:
    import onnx

    return _TRT_TYPES.get(elem_type) or onnx.TensorProto.DataType.Name(elem_type)


class _Graph:
    """One ONNX model as the rules read it: producers, consumers, constants and inferred element types."""

    def __init__(self, model, base_dir: Path | None = None):
        self.model, self.graph, self.base_dir = model, model.graph, base_dir
        self.inits = {t.name: t for t in self.graph.initializer}
        self.constants = {}  # Constant-node outputs -> their TensorProto
        self.consumers: dict[str, list] = defaultdict(list)
        self.producers = {}
        for node in self.graph.node:
            for out in node.output:
                self.producers[out] = node
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                for a in node.attribute:
                    if a.name == "value":
                        self.constants[node.output[0]] = a.t
            for i, name in enumerate(node.input):
                if name:
                    self.consumers[name].append((node, i))
        self.graph_outputs = {o.name for o in self.graph.output}
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
        self.types = infer_types(model)

    def type_of(self, name: str) -> str | None:
        t = self.types.get(name)
        return type_name(t) if t else None

    def const(self, name: str):
        """The TensorProto behind a constant input (initializer or Constant node), else None."""
        return self.inits.get(name) or self.constants.get(name)

    def is_const(self, name: str) -> bool:
        return self.const(name) is not None

    def dims(self, name: str) -> list[int] | None:
        t = self.const(name)
        return list(t.dims) if t is not None else None

    def values(self, name: str):
        """The constant's values (numpy), memory-mapped when stored as external data; None if not constant."""
        import numpy as np
        from onnx import numpy_helper

        t = self.const(name)
        if t is None:
            return None
        external = {e.key: e.value for e in t.external_data} if t.data_location == 1 else None
        if not external:
            return numpy_helper.to_array(t)
        if self.base_dir is None:
            return None
        from onnx import helper

        packed = t.data_type in (21, 22, 23)  # UINT4, INT4, FLOAT4E2M1: two values a byte; raw bytes returned
        dtype = np.uint8 if packed else np.uint16 if t.data_type == 16 else helper.tensor_dtype_to_np_dtype(
            t.data_type)
        offset, length = int(external.get("offset", 0)), external.get("length")
        count = int(length) // np.dtype(dtype).itemsize if length is not None else -1
        arr = np.memmap(self.base_dir / external["location"], dtype=dtype, mode="r", offset=offset,
                        shape=(count,) if count >= 0 else None)
        if t.data_type == 16:  # bfloat16 bits -> float32 (a copy: scales, not weights, are read this way)
            return (arr.astype(np.uint32) << 16).view(np.float32)
        return arr

    def is_zero(self, name: str) -> bool | None:
        """All raw values zero (int8 / packed int4 / fp8 zero points: zero bytes); None if not a readable constant."""
        import numpy as np

        t = self.const(name)
        if t is None:
            return None
        if t.data_location == 1:
            arr = self.values(name)
            return None if arr is None else not np.asarray(arr.view(np.uint8)).any()
        if t.raw_data:
            return not any(t.raw_data)
        return not self.values(name).any()

    def attr(self, node, name: str, default=None):
        from onnx import helper

        for a in node.attribute:
            if a.name == name:
                return helper.get_attribute_value(a)
        return default


def infer_types(model) -> dict[str, int]:
    """Element type of every tensor: declared, then ONNX shape inference on a weightless skeleton of the graph
    (initializers become typed inputs), so a multi-GB model with loaded weights is never copied."""
    import onnx
    from onnx import helper, shape_inference

    g = model.graph
    skeleton = onnx.ModelProto(ir_version=model.ir_version)
    skeleton.opset_import.extend(model.opset_import)
    skeleton.functions.extend(model.functions)
    sg = skeleton.graph
    sg.node.extend(g.node)
    sg.input.extend(g.input)
    sg.output.extend(g.output)
    sg.value_info.extend(g.value_info)
    declared = {i.name for i in g.input}
    sg.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                    for t in g.initializer if t.name not in declared)
    try:
        skeleton = shape_inference.infer_shapes(skeleton, strict_mode=False, data_prop=False)
    except Exception as e:  # noqa: BLE001 - a graph the checker refuses still gets its declared types checked
        log.info("shape inference failed (%s); checking declared types only", e)
    types = {}
    for vi in (*skeleton.graph.input, *skeleton.graph.output, *skeleton.graph.value_info):
        if vi.type.tensor_type.elem_type:
            types[vi.name] = vi.type.tensor_type.elem_type
    for t in g.initializer:
        types[t.name] = t.data_type
    for node in g.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    types[node.output[0]] = a.t.data_type
    return types


# (op, type of its data operand) -> (ONNX type it is computed in, inputs cast, why it is exact): the operators whose
# parser row lacks a type medc's graphs give them, and the exact cast island that fixes each (the rewrite itself is
# the TensorRT stage's, medc.compile.tensorrt.make_trt_ready).
TYPE_ISLANDS: dict[tuple[str, str], tuple[int, tuple[int, ...], str]] = {
    ("CumSum", "INT64"): (1, (0,), "float32 sums: exact for partial sums below 2**24, e.g. counts over a sequence"),
    ("CumSum", "INT32"): (1, (0,), "float32 sums: exact for partial sums below 2**24, e.g. counts over a sequence"),
    ("Pad", "BOOL"): (6, (0, 2), "bool as int32 0/1 and back: exact"),
}


# -- per-op checks --------------------------------------------------------------------------------------------------------
# Which operand's type the "Supported Types" column constrains: (kind, index); default ("in", 0).
_TYPED_OPERAND = {"Where": ("in", 1), "Constant": ("out", 0), "ConstantOfShape": ("out", 0),
                  "RandomNormal": ("out", 0), "RandomUniform": ("out", 0)}
_TYPE_UNCHECKED = {"QuantizeLinear", "DequantizeLinear", "If", "Loop", "Scan"}  # Q/DQ: their own rules


def typed_operand(node) -> str | None:
    kind, i = _TYPED_OPERAND.get(node.op_type, ("in", 0))
    names = node.output if kind == "out" else node.input
    return names[i] if len(names) > i and names[i] else None


_RESIZE = {"mode": {"nearest", "linear"},
           "coordinate_transformation_mode": {"half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn",
                                              "asymmetric", "align_corners"},
           "nearest_mode": {"floor", "ceil", "round_prefer_floor", "round_prefer_ceil"},
           "keep_aspect_ratio_policy": {"stretch"}}
_RESIZE_DEFAULTS = {"mode": "nearest", "coordinate_transformation_mode": "half_pixel",
                    "nearest_mode": "round_prefer_floor", "keep_aspect_ratio_policy": "stretch"}


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _r_resize(node, g, spec):  # operators.md Resize row
    for key, allowed in _RESIZE.items():
        value = _text(g.attr(node, key, _RESIZE_DEFAULTS[key]))
        if value not in allowed:
            return f"Resize {key}={value!r}; TensorRT supports {', '.join(sorted(allowed))}. Re-export with one of those."
    if g.attr(node, "antialias", 0):
        return "Resize with antialias=1; TensorRT does not antialias. Resize without antialiasing (or before export)."
    return None


def _r_pad(node, g, spec):
    # Modes: constant; edge/reflect since 8.2; wrap since 10.0 EA. Tensor `axes` since 10.4 (docs/Changelog.md).
    mode = _text(g.attr(node, "mode", "constant"))
    if mode not in ("constant", "reflect", "edge", "wrap"):
        return f"Pad mode {mode!r}; TensorRT pads constant, reflect, edge or wrap."
    if spec.v < (10, 4) and len(node.input) > 3 and node.input[3] and not g.is_const(node.input[3]):
        return "Pad with computed `axes`; this TensorRT needs them constant (tensor axes arrived in 10.4)."
    return None


def _const_input(index: int, what: str):
    def check(node, g, spec):
        if len(node.input) > index and node.input[index] and not g.is_const(node.input[index]):
            return f"{node.op_type} `{what}` is computed; TensorRT needs it an initializer. Constant-fold the graph."
        return None
    return check


def _r_squeeze(node, g, spec):  # "axes must be resolvable to a constant"; computed axes handled since 10.7
    return _const_input(1, "axes")(node, g, spec) if spec.v < (10, 7) else None


def _r_topk(node, g, spec):
    if not g.attr(node, "sorted", 1):
        return "TopK with sorted=0; TensorRT needs sorted=1."
    k = g.values(node.input[1]) if len(node.input) > 1 else None
    if k is not None and int(k.reshape(-1)[0]) >= 3840:
        return f"TopK with K={int(k.reshape(-1)[0])}; TensorRT needs K < 3840."
    return None


def _r_unused_outputs(first_extra: int, what: str):
    def check(node, g, spec):
        extra = [o for o in node.output[first_extra:] if o and (g.consumers.get(o) or o in g.graph_outputs)]
        return f"{node.op_type} output(s) {', '.join(extra)} used; TensorRT imports {what} only." if extra else None
    return check


def _r_pool(node, g, spec):
    if any(d != 1 for d in g.attr(node, "dilations", []) or []):
        return f"{node.op_type} with dilations; TensorRT needs them empty or all ones."
    return _r_unused_outputs(1, "the pooled output")(node, g, spec) if node.op_type == "MaxPool" else None


def _r_dropout(node, g, spec):
    if len(node.input) > 2 and node.input[2]:
        mode = g.values(node.input[2])
        if mode is None or bool(mode.reshape(-1)[0]):
            return "Dropout in training mode (or computed); TensorRT needs training_mode a constant False."
    return None


def _r_einsum(node, g, spec):  # ellipsis, diagonal, broadcasting arrived in 10.12
    if spec.v < (10, 12) and "..." in _text(g.attr(node, "equation", "")):
        return "Einsum with an ellipsis; this TensorRT (< 10.12) needs explicit subscripts."
    return None


def _r_attention(node, g, spec):
    if any(len(node.input) > i and node.input[i] for i in (4, 5, 6)):
        return "Attention with past_key/past_value/nonpad_kv_seqlen inputs; TensorRT's importer takes none of them."
    if g.attr(node, "softcap", 0.0) or g.attr(node, "qk_matmul_output_mode", 0):
        return "Attention with softcap or qk_matmul_output_mode; TensorRT supports neither."
    return _r_unused_outputs(1, "the attention output")(node, g, spec)


def _r_attr_equals(key: str, allowed, default):
    def check(node, g, spec):
        value = g.attr(node, key, default)
        value = _text(value) if isinstance(value, (bytes, str)) else value
        return None if value == allowed else f"{node.op_type} with {key}={value!r}; TensorRT needs {allowed!r}."
    return check


def _r_constant(node, g, spec):
    bad = [a.name for a in node.attribute if a.name in ("sparse_value", "value_string", "value_strings")]
    return f"Constant with {bad[0]}; TensorRT imports dense numeric constants only." if bad else None


_REDUCE = ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin",
           "ReduceProd", "ReduceSum", "ReduceSumSquare")
# The "Restrictions" column of operators.md, where a node can be checked without running it.
RESTRICTIONS = {
    "Resize": _r_resize, "Pad": _r_pad, "CumSum": _const_input(1, "axis"), "Squeeze": _r_squeeze,
    "Unsqueeze": _r_squeeze, "TopK": _r_topk, "Dropout": _r_dropout, "Einsum": _r_einsum,
    "LayerNormalization": _r_unused_outputs(1, "the first output Y"), "AveragePool": _r_pool, "MaxPool": _r_pool,
    "LpPool": _r_pool, "ScatterND": _r_attr_equals("reduction", "none", "none"),
    "LSTM": lambda n, g, s: _r_attr_equals("input_forget", 0, 0)(n, g, s) or _r_attr_equals("layout", 0, 0)(n, g, s),
    "TensorScatter": _r_attr_equals("axis", -2, -2), "Attention": _r_attention, "Constant": _r_constant,
    **{op: _const_input(1, "axes") for op in _REDUCE},
}

# ONNX Runtime contrib ops it registers in the default domain (not ONNX operators).
_ORT_DEFAULT_DOMAIN = {"SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization"}


def _walk(graph):
    """Nodes of the graph and of its subgraphs (If/Loop/Scan bodies)."""
    from onnx import AttributeProto

    for node in graph.node:
        yield node
        for a in node.attribute:
            if a.type == AttributeProto.GRAPH:
                yield from _walk(a.g)
            elif a.type == AttributeProto.GRAPHS:
                for sub in a.graphs:
                    yield from _walk(sub)


# The portable form of a quantised token-embedding table (medc.compile.embedding): Gather of int8 rows from a
# constant [V, H] table, DequantizeLinear of those rows with a constant per-tensor scale 1 and zero point 0 (exact
# integers), times the gathered per-block scales. It relies on two TensorRT rules, and neither can be run on this
# machine (no TensorRT without an NVIDIA GPU): (1) TensorRT's Gather layer takes INT8 data, which the parser's
# operator table does not list for Gather (F, INT32, INT64, BOOL): an assumption to confirm with trtexec on the
# device; (2) DequantizeLinear of an int8 activation with a constant positive per-tensor scale and zero point 0 is
# TensorRT's explicit quantization of activations (the qdq rules above check it). int4 has no such form: TensorRT
# dequantises int4 only as a weight (blocked DequantizeLinear on an initializer), so medc refuses embed_tokens=int4
# for the portable flavour.
EMBED_INT8_GATHER = (
    "int8 rows gathered from a constant table and dequantised per tensor, then scaled per block (medc's quantised "
    "embedding). Relies on TensorRT's Gather taking INT8 data (not listed in onnx-tensorrt's operator table for "
    "Gather) and on DequantizeLinear of an int8 activation with a constant per-tensor scale (explicit "
    "quantization). Not run here (no TensorRT on this machine): confirm the engine builds with trtexec on the "
    "device, or rebuild with --precision embed_tokens=fp16.")


# A tied lm_head stored as the token-embedding rows (medc.compile.weight_only, `head_rows`): MatMul(A, Transpose(
# DequantizeLinear(W_int8 [V, H], scale[V], axis 0))), so that embed_tokens reads the same bytes. It relies on
# TensorRT's Q/DQ processing moving a DequantizeLinear forward past a Transpose (the developer guide's Q/DQ
# placement rules: DQ layers propagate forward through "commuting" layers, Transpose among them) so the MatMul sees
# a dequantised constant weight it can fuse as int8 weight-only, the per-channel axis following the transpose.
WEIGHT_DQ_TRANSPOSE = (
    "int8 weight stored as rows [N, K], dequantised per row (axis 0), then transposed into its MatMul (the lm_head "
    "stored once with the token embeddings). Relies on TensorRT propagating DequantizeLinear forward through "
    "Transpose and fusing the int8 weight-only MatMul with the per-channel axis transposed. Not run here (no "
    "TensorRT on this machine): confirm the engine builds with trtexec on the device, or rebuild with a recipe "
    "whose embed_tokens is fp16 (the lm_head then keeps its own [K, N] int8 weight).")


def _dq_weight_transpose(node, g: _Graph) -> bool:
    """A Transpose of a DequantizeLinear of a constant INT8 weight, read by MatMuls (WEIGHT_DQ_TRANSPOSE)."""
    if node.op_type != "Transpose" or not node.input:
        return False
    dq = g.producers.get(node.input[0])
    users = g.consumers.get(node.output[0], [])
    return (dq is not None and dq.op_type == "DequantizeLinear" and g.is_const(dq.input[0])
            and g.type_of(dq.input[0]) == "INT8" and bool(users) and all(u.op_type == "MatMul" for u, _ in users))


def _int8_table_gather(node, g: _Graph) -> bool:
    """A Gather of rows from a constant INT8 table whose every consumer is a DequantizeLinear (EMBED_INT8_GATHER)."""
    if node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or not node.input:
        return False
    table = node.input[0]
    users = g.consumers.get(node.output[0], [])
    return (g.is_const(table) and g.type_of(table) == "INT8" and len(g.dims(table) or ()) == 2 and bool(users)
            and all(u.op_type == "DequantizeLinear" for u, _ in users))


def _check_ops(g: _Graph, spec: ParserSpec, emit) -> None:
    for node in _walk(g.graph):
        name = node.name or (node.output[0] if node.output else node.op_type)
        if node.domain not in ("", "ai.onnx"):
            emit("op-contrib", name, f"{node.domain}::{node.op_type} is not an ONNX operator (an ONNX Runtime "
                 "contrib op); TensorRT's parser has no importer for it. Build with standard ONNX ops: "
                 "`medc build MODEL --target T` for a TensorRT target (portable graphs, no ORT fusions).")
            continue
        if node.op_type not in spec.ops:
            why = (" (ONNX Runtime registers it in the default domain; it is not an ONNX operator)"
                   if node.op_type in _ORT_DEFAULT_DOMAIN else "")
            emit("op-unsupported", name, f"{node.op_type} is not imported by TensorRT's ONNX parser{why} "
                 "(onnx-tensorrt docs/operators.md). Replace it with supported ops before export, or rebuild "
                 "for the TensorRT target.")
            continue
        if _int8_table_gather(node, g):
            emit("embed-int8-gather", name, EMBED_INT8_GATHER)
            continue
        if _dq_weight_transpose(node, g):
            emit("weight-dq-transpose", name, WEIGHT_DQ_TRANSPOSE)
        restriction = RESTRICTIONS.get(node.op_type)
        problem = restriction(node, g, spec) if restriction else None
        if problem:
            emit("op-restriction", name, problem)
        if node.op_type in _TYPE_UNCHECKED:
            continue
        allowed = spec.ops[node.op_type]
        operands = [typed_operand(node)]
        if node.op_type == "Cast":
            operands.append(None)
            to = type_name(g.attr(node, "to", 0))
            if to not in allowed:
                emit("op-type", name, f"Cast to {to}; TensorRT's Cast takes {', '.join(sorted(allowed))}.")
        for operand in filter(None, operands):
            t = g.type_of(operand)
            if t is None or t in allowed or t == "DOUBLE":  # DOUBLE: its own rule
                continue
            fix = (" The TensorRT stage (medc.compile.tensorrt.make_trt_ready) computes it in an exact cast island "
                   f"({TYPE_ISLANDS[(node.op_type, t)][2]})." if (node.op_type, t) in TYPE_ISLANDS
                   else " Cast around it to a listed type.")
            emit("op-type", name, f"{node.op_type} on {t}; TensorRT's parser lists "
                 f"{', '.join(sorted(allowed))} for {node.op_type}.{fix}")


def _check_opset(g: _Graph, spec: ParserSpec, emit) -> None:
    if g.opset < OPSET_MIN:
        emit("opset-too-old", "", f"default-domain opset {g.opset}; TensorRT's parser supports opset {OPSET_MIN} to "
             f"{spec.opset_max}. Re-export at opset 17 or newer.")
    elif g.opset > spec.opset_max:
        emit("opset-newer", "", f"default-domain opset {g.opset} is above the parser's documented range "
             f"({OPSET_MIN}-{spec.opset_max}); it imports the graph (no upper bound in ModelImporter.cpp) but may "
             "refuse an operator version it does not know. Every op here is checked against its table.")


# -- explicit quantization ----------------------------------------------------------------------------------------------
_WEIGHT_CONSUMERS = {"Conv": 1, "ConvTranspose": 1, "MatMul": 1, "Gemm": 1}  # op -> weight input index


def _output_channel_axis(node, g, rank: int) -> int:
    """The output-channel axis of a weight feeding `node` (Conv: 0; MatMul: last; Gemm: by transB)."""
    if node.op_type in ("Conv",):
        return 0
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm":
        return 0 if g.attr(node, "transB", 0) else 1
    return rank - 1


def _check_qdq(g: _Graph, target, versions: list[ParserSpec], emit) -> None:
    for node in g.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or node.domain not in ("", "ai.onnx"):
            continue
        name = node.name or node.output[0]
        dq = node.op_type == "DequantizeLinear"
        x, scale = node.input[0], node.input[1] if len(node.input) > 1 else ""
        zp = node.input[2] if len(node.input) > 2 and node.input[2] else None
        if dq:
            qtype = g.type_of(x)
        elif zp:
            qtype = g.type_of(zp)
        else:  # ONNX: uint8 unless output_dtype says otherwise (TensorRT would read it as int8)
            out = g.attr(node, "output_dtype", 0)
            qtype = type_name(out) if out else "UINT8"
        # A weight: a constant, or a constant through a QuantizeLinear (Q -> DQ pairs on weights).
        q = g.producers.get(x)
        weight = g.is_const(x) or (q is not None and q.op_type == "QuantizeLinear" and g.is_const(q.input[0]))
        if qtype == "UINT8":
            emit("qdq-uint8", name, f"{node.op_type} in uint8 (asymmetric): TensorRT's DequantizeLinear refuses "
                 "uint8 and its QuantizeLinear reads it as int8, so the engine would differ from ONNX Runtime. "
                 "Quantize to int8 with zero point 0 (ORT: QuantType.QInt8, ActivationSymmetric/WeightSymmetric).")
            continue
        if qtype == "INT32":
            emit("qdq-type", name, f"{node.op_type} of int32 (a quantized bias); TensorRT quantizes to int8, "
                 "int4, fp8 or fp4 only. Keep biases in float (ORT quantize_static extra_options QuantizeBias=False).")
            continue
        if qtype == "FP8" and "fp8" not in target.precisions:
            emit("fp8-target", name, f"fp8 {node.op_type} on {target.name}, which has no fp8 (compute capability "
                 f"{target.compute_capability}; fp8 needs 8.9+, never Jetson Orin). Rebuild with --precision int8.")
            continue
        if qtype == "FP4":
            emit("qdq-type", name, f"fp4 {node.op_type}: FP4 needs Blackwell and TensorRT 10.8+, which "
                 f"{target.name} lacks. Rebuild with --precision int4 (int4 weights) or int8.")
            continue
        if qtype is not None and qtype not in ("INT8", "INT4", "FP8"):
            emit("qdq-type", name, f"{node.op_type} of {qtype}; TensorRT quantizes to int8, int4, fp8 (e4m3) or fp4.")
            continue
        if zp:
            zero = g.is_zero(zp)
            if zero is False or (zero is None and not g.is_const(zp)):
                emit("qdq-zero-point", name, f"{node.op_type} zero point is not a constant 0; TensorRT supports "
                     "symmetric quantization only. Quantize symmetrically (zero point 0, or omit it with output_dtype).")
        _check_scale(node, name, g, x, scale, weight, qtype, versions, emit)


def _check_scale(node, name, g, x, scale, weight, qtype, versions, emit) -> None:
    import numpy as np

    s = g.values(scale) if scale else None
    if s is not None and not (np.asarray(s, dtype=np.float32) > 0).all():
        emit("qdq-scale", name, f"{node.op_type} scale has values <= 0; TensorRT needs every scale "
             "coefficient positive (QuantDequantLinearHelper). Recalibrate: a zero range gives a zero scale.")
    sdims = g.dims(scale)
    xdims = g.dims(x)
    x_rank = len(xdims) if xdims is not None else None
    block = g.attr(node, "block_size", 0)
    if sdims is None:  # a computed scale: TensorRT takes it, its shape is not known here
        kind = "tensor"
    elif int(np.prod(sdims)) == 1:
        kind = "tensor"
    elif len(sdims) == 1:
        kind = "channel"
    else:
        kind = "block"
    if kind == "block" and (not block or (x_rank is not None and len(sdims) != x_rank)):
        emit("qdq-scale", name, f"{node.op_type} scale of shape {sdims} is neither per-tensor, per-axis (1-D) nor "
             "blocked (input rank and a block_size attribute, opset 21). Use one of those forms.")
        return
    if kind == "block" and len(sdims) > 2:
        emit("qdq-scale", name, f"{node.op_type} blocked scale of rank {len(sdims)}; TensorRT's block quantization "
             "takes scales of rank <= 2 (IDequantizeLayer). Quantize 2-D weights.")
    if not weight and kind != "tensor":
        emit("qdq-activation-per-channel", name, f"{node.op_type} of an activation per {kind}; TensorRT "
             "quantizes activations per tensor only. Calibrate activations per tensor (ORT: per_channel applies to "
             "weights only).")
    if qtype == "INT4":
        _check_int4(node, name, g, x, sdims, xdims, weight, kind, block, versions, emit)
        return
    if kind == "block":
        emit("qdq-block-type", name, f"blocked {qtype or ''} {node.op_type}; TensorRT documents block quantization "
             "for int4 (and fp4/fp8) weights. Quantize int8 weights per output channel.")
    if weight and qtype == "INT8":
        for consumer, index in g.consumers.get(node.output[0], []):
            if _WEIGHT_CONSUMERS.get(consumer.op_type) != index:
                continue
            if kind == "tensor":
                emit("qdq-weight-per-tensor", name, f"int8 weights of {consumer.op_type} quantized per tensor; "
                     "TensorRT takes it, but per output channel keeps accuracy (ORT quantize_static per_channel=True).")
            elif kind == "channel" and x_rank:
                axis = g.attr(node, "axis", 1)
                axis = axis + x_rank if axis < 0 else axis
                want = _output_channel_axis(consumer, g, x_rank)
                if axis != want:
                    emit("qdq-weight-axis", name, f"int8 weights of {consumer.op_type} quantized along axis "
                         f"{axis}; TensorRT's per-channel weight quantization is along the output channels "
                         f"(axis {want}). Quantize along axis {want}.")


def _check_int4(node, name, g, x, sdims, xdims, weight, kind, block, versions, emit) -> None:
    import numpy as np

    for spec in versions:
        if not spec.int4:
            emit("int4-unsupported-version", name, "int4 DequantizeLinear: INT4 arrived in TensorRT 10.0.",
                 spec.version)
    if not weight:
        emit("int4-not-weight", name, f"int4 {node.op_type} of a tensor that is not an initializer; TensorRT has "
             "int4 weight-only quantization. Quantize activations to int8 (or keep them in float).")
        return
    if kind != "block" or not block:
        emit("int4-not-blocked", name, f"int4 {node.op_type} without blocks (scale {sdims}, block_size "
             f"{block or 'absent'}); TensorRT's int4 weights are block-quantized. Use blocked DequantizeLinear "
             "(block_size 32/64/128, scale of the weight's rank, opset 21).")
        return
    if g.opset < 21:
        emit("int4-opset", name, f"int4 blocked DequantizeLinear in an opset {g.opset} graph; int4 and block_size "
             "arrived in DequantizeLinear-21. Set the graph's opset to 21.")
    if xdims is not None:
        blocked = [i for i, (a, b) in enumerate(zip(xdims, sdims)) if a != b]
        if len(xdims) != 2 or len(blocked) != 1 or blocked[0] not in (len(xdims) - 2, len(xdims) - 1):
            emit("int4-shape", name, f"int4 weights of shape {xdims} blocked on axes {blocked}; TensorRT "
                 "blocks one of the last two axes of a 2-D weight. Quantize 2-D MatMul weights along K.")
        elif int(np.prod(xdims)) % 2:
            emit("int4-shape", name, "int4 weights with an odd number of elements; TensorRT packs int4 in "
                 "pairs.")


# -- data types, profiles, fp16 islands ---------------------------------------------------------------------------------
def _check_dtypes(g: _Graph, target, emit) -> None:
    doubles = sorted(n for n, t in g.types.items() if t == 11)
    for name in doubles:
        emit("dtype-double", name, "a double (float64) tensor; TensorRT casts double down to float with clamping, "
             "so the engine computes something else. Cast to float32 before export (torch: .float()).")
    if "bf16" not in target.precisions:
        for name in sorted(n for n, t in g.types.items() if t == 16):
            emit("dtype-bf16", name, f"a bf16 tensor on {target.name} (compute capability "
                 f"{target.compute_capability}): bf16 needs 8.0+. Build fp16 or fp32.")
    io64 = [vi.name for vi in (*g.graph.input, *g.graph.output) if vi.type.tensor_type.elem_type == 7
            and vi.name not in g.inits]
    if io64:
        emit("dtype-int64-io", "", f"int64 inputs/outputs {', '.join(io64)}: native in TensorRT >= 9 (the parser "
             "no longer casts int64 to int32; bind int64 buffers). No conversion needed.")


def _check_fp16_islands(g: _Graph, precision: str | None, emit) -> None:
    if precision != "fp16":
        return
    skip = {"Cast", "Shape", "Constant", "ConstantOfShape", "Range", "Gather", "Reshape", "Unsqueeze", "Squeeze",
            "Concat", "Slice", "Equal", "Where", "Expand"}  # type plumbing, not arithmetic
    islands = [n.name or n.output[0] for n in g.graph.node if n.op_type not in skip
               and (op := typed_operand(n)) and g.type_of(op) == "FP32"]
    if islands:
        emit("fp16-island", "", f"{len(islands)} node(s) compute in fp32 in this fp16 graph (e.g. "
             f"{', '.join(islands[:3])}): expected (overflow-prone parts, fp32 I/O). Build the engine strongly typed "
             "(--stronglyTyped; always in TensorRT 11) so TensorRT keeps them in fp32.")


def _profile_list(profiles) -> list[dict]:
    """One component's profiles as a list of {input: {"min","opt","max"}} (also accepts [min, opt, max] lists)."""
    if isinstance(profiles, dict) and "profiles" in profiles:
        profiles = profiles["profiles"]
    if isinstance(profiles, dict):
        profiles = [profiles]
    out = []
    for p in profiles or []:
        entry = {}
        for name, shapes in p.items():
            if isinstance(shapes, (list, tuple)) and len(shapes) == 3 and all(isinstance(s, list) for s in shapes):
                shapes = dict(zip(("min", "opt", "max"), shapes))
            if not isinstance(shapes, dict) or not {"min", "opt", "max"} <= set(shapes):
                raise ValueError(f"input {name}: expected min/opt/max shapes")
            entry[name] = {k: [int(d) for d in shapes[k]] for k in ("min", "opt", "max")}
        out.append(entry)
    return out


_ITEMSIZE = {1: 4, 10: 2, 16: 2, 6: 4, 7: 8, 3: 1, 2: 1, 9: 1, 11: 8}
_CONTEXT_AXES = ("total", "seq", "past_full", "past", "sequence", "context")


def _check_profiles(g: _Graph, profiles, target, context: int | None, emit) -> None:
    dynamic = {}
    for vi in g.graph.input:
        if vi.name in g.inits:
            continue
        dims = vi.type.tensor_type.shape.dim
        axes = [(i, d.dim_param or "?") for i, d in enumerate(dims) if not d.HasField("dim_value")]
        if axes:
            dynamic[vi.name] = (dims, axes)
    if not dynamic:
        return
    if profiles is None:
        names = sorted({a for _, axes in dynamic.values() for _, a in axes})
        emit("profiles-absent", "", f"{len(dynamic)} input(s) with dynamic dims ({', '.join(names)}); no "
             "optimisation profiles to check (medc build --target T writes tensorrt/profiles.json).")
        return
    try:
        plist = _profile_list(profiles)
    except (ValueError, TypeError, AttributeError) as e:
        emit("profiles-unreadable", "", f"the optimisation profiles could not be read ({e}); rebuild the bundle.")
        return
    budget = target.usable_bytes() if target.usable_memory_gib is not None else None
    for k, profile in enumerate(plist):
        total = 0
        for name, (dims, axes) in dynamic.items():
            p = profile.get(name)
            if p is None:
                emit("profile-missing", name, f"profile {k} has no shapes for {name} (dynamic "
                     f"{', '.join(a for _, a in axes)}); TensorRT needs min/opt/max for every dynamic input. "
                     "Rebuild with --target T (writes tensorrt/profiles.json).")
                continue
            if any(len(p[s]) != len(dims) for s in ("min", "opt", "max")):
                emit("profile-shape", name, f"profile {k}: shapes for {name} are not of rank {len(dims)}.")
                continue
            for i, d in enumerate(dims):
                lo, opt, hi = p["min"][i], p["opt"][i], p["max"][i]
                if d.HasField("dim_value") and not lo == opt == hi == d.dim_value:
                    emit("profile-shape", name, f"profile {k}: {name} axis {i} is static {d.dim_value}, profile "
                         f"gives {lo}/{opt}/{hi}.")
                elif not 0 <= lo <= opt <= hi:
                    emit("profile-shape", name, f"profile {k}: {name} axis {i} ({d.dim_param}) needs "
                         f"0 <= min <= opt <= max, got {lo}/{opt}/{hi}.")
                elif context and d.dim_param in _CONTEXT_AXES and hi > context:
                    emit("profile-context", name, f"profile {k}: {name} axis {i} ({d.dim_param}) max {hi} is "
                         f"beyond the model's context ({context} positions).")
            size = 1
            for d in p["max"]:
                size *= max(d, 0)
            total += size * _ITEMSIZE.get(g.types.get(name, 1), 4)
        if budget is not None and total > budget:
            emit("profile-memory", "", f"profile {k}: the inputs alone take {total / 2**30:.2f} GiB at their max "
                 f"shapes, more than {target.name}'s {budget / 2**30:.1f} GiB usable. Lower --context or "
                 "--max-batch.")


# -- the lint -----------------------------------------------------------------------------------------------------------
def tensorrt_target(target):
    t = get_target(target) if isinstance(target, str) else target
    if t.engine != "tensorrt" or not t.tensorrt:
        trt = sorted(n for n, p in TARGETS.items() if p.engine == "tensorrt")
        raise MedcError(f"target {t.name} does not run TensorRT, so there is nothing to lint against; choose a "
                        f"TensorRT target: {', '.join(trt)}.")
    return t


def lint_model(model, target, profiles=None, *, component: str = "model", base_dir: Path | None = None,
               precision: str | None = None, context: int | None = None) -> LintReport:
    """Check one ONNX graph (loaded with or without its external data) for `target`'s TensorRT versions.

    `profiles`: this graph's optimisation profiles, {input: {"min": [...], "opt": [...], "max": [...]}} or a list
    of those; None skips the profile checks. `base_dir`: where external data lives (to read zero points and scales).
    """
    t = tensorrt_target(target)
    versions = [parser_spec(v) for v in t.tensorrt]
    g = _Graph(model, Path(base_dir) if base_dir else None)
    found: dict[tuple, set[str]] = {}

    def collector(version: str | None):
        def emit(rule: str, name: str, message: str, only: str | None = None) -> None:
            key = (rule, name, message)
            found.setdefault(key, set()).update({only} if only else ({version} if version else set(t.tensorrt)))
        return emit

    for spec in versions:
        emit = collector(spec.version)
        _check_ops(g, spec, emit)
        _check_opset(g, spec, emit)
    once = collector(None)
    _check_qdq(g, t, versions, once)
    _check_dtypes(g, t, once)
    _check_fp16_islands(g, precision, once)
    _check_profiles(g, profiles, t, context, once)
    findings = [Finding(rule, RULES[rule][0], component, name, message,
                        () if vers == set(t.tensorrt) else tuple(sorted(vers, key=_version)))
                for (rule, name, message), vers in found.items()]
    info = {"nodes": len(g.graph.node), "opset": g.opset, "precision": precision}
    return LintReport(t.name, tuple(t.tensorrt), findings, {component: info})


def _read_profiles(bundle: Path):
    """tensorrt/profiles.json when the build wrote one: {component: profiles}; None when absent."""
    import json

    path = bundle / "tensorrt" / "profiles.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    for key in ("components", "profiles"):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
    return data


def lint_bundle(bundle_dir, target) -> LintReport:
    """Lint every graph of a bundle for `target` (a name or Target); weights are never loaded."""
    bundle = Path(bundle_dir)
    manifest = Manifest.read(bundle)
    try:
        profiles = _read_profiles(bundle)
    except ValueError as e:
        report = lint_components(bundle, manifest, target, {})
        report.findings.append(Finding("profiles-unreadable", RULES["profiles-unreadable"][0], "", "tensorrt",
                                       f"tensorrt/profiles.json is not JSON ({e}); rebuild the bundle."))
        return report
    return lint_components(bundle, manifest, target, profiles)


def lint_components(folder: Path, manifest: Manifest, target, profiles: dict | None) -> LintReport:
    """Lint the graphs `manifest` names in `folder` (a bundle, or a build's stage before its manifest is written)
    against `profiles` ({component: optimisation profiles}; None: no profiles to check)."""
    folder = Path(folder)
    t = tensorrt_target(target)
    report = LintReport(t.name, tuple(t.tensorrt), bundle=str(folder))
    built = TARGETS.get(manifest.target)
    if built is None or built.engine != "tensorrt":
        report.findings.append(Finding(
            "bundle-target", "error", "", "", f"built for target {manifest.target} (ONNX Runtime graphs: contrib "
            f"ops, dynamic int8, no optimisation profiles), not for TensorRT. Rebuild with --target {t.name}."))
    elif built.name != t.name:
        report.findings.append(Finding(
            "bundle-other-target", "warning", "", "", f"built for {built.name}, linted for {t.name}: precisions and "
            f"profiles were planned for {built.name}. Rebuild with --target {t.name} for this device."))
    context = (manifest.generation or {}).get("max_positions")
    for name, entry in manifest.components.items():
        path = folder / entry.file
        if not path.is_file():
            raise MedcError(f"bundle {folder} is incomplete: {entry.file} is missing. Copy the bundle again.")
        if entry.quantization.get("provider"):  # compile/embedding.py SHARED_FORM: no engine is built for it
            report.findings.append(Finding(
                "cpu-component", "info", name, "", f"runs on ONNX Runtime's {entry.quantization['provider']} "
                f"({entry.quantization.get('format', 'pinned by the build')}); no TensorRT engine is built for it"))
            graph = onnx_load_graph(path)
            report.components[name] = {"file": entry.file, "nodes": len(graph.graph.node),
                                       "opset": next((o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")), None),
                                       "precision": entry.precision, "engine": False}
            continue
        model = onnx_load_graph(path)  # graph only: big models keep weights on disk
        r = lint_model(model, t, None if profiles is None else profiles.get(name, {}), component=name,
                       base_dir=path.parent, precision=entry.precision, context=context)
        del model
        report.findings += r.findings
        report.components[name] = {"file": entry.file, **r.components[name]}
    return report


def onnx_load_graph(path: Path):
    """An ONNX file's graph without its external weights."""
    import onnx

    return onnx.load(str(path), load_external_data=False)
