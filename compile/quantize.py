"""Precision conversion of an fp32 graph, with ONNX Runtime's own tools where they do the job
(onnxruntime.quantization, onnxruntime.transformers.float16).

Methods, each a registry entry (`METHODS`) that writes `dst` from an fp32 graph:
- `fp16`: weights and activations in fp16, graph inputs/outputs kept fp32 so callers never see the change; decoders
  keep fp32 islands where Gemma 3 overflows fp16 (compile/fp16.py).
- `int8-static-qdq`: explicit QuantizeLinear/DequantizeLinear around MatMul/Gemm/Conv, int8, symmetric (zero point
  0), per-channel weights, activation ranges from calibration data. This is the form TensorRT consumes (implicit
  calibrators are deprecated since TensorRT 10.1). Only MatMuls with a constant weight are quantised: the attention
  score products stay in float, where the softmax range would waste half of a symmetric int8 scale.
- `weight-only`: decoders; blockwise int8 or int4 weights (compile/weight_only.py), the lm_head at its own precision.
- `int8-dynamic`: per-channel int8 weights, activations quantised per call (MatMulInteger); ONNX Runtime CPU's fast
  path. Dynamic ranges are exact per call, so the attention products can be quantised here too.
- `embedding`: the token-embedding table, int8 or int4 rows in blocks (compile/embedding.py).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medc.compile import embedding, fp16, weight_only
from medc.compile.isolate import run as run_isolated
from medc.compile.export import save_onnx
from medc.compile.weight_only import WeightOnlyConfig
from medc.manifest import feeds_digest


@dataclass(frozen=True)
class ConvertOptions:
    """What a conversion needs besides the fp32 graph; each method reads its own fields."""

    calibration: tuple | None = None  # int8-static-qdq: (list of feeds, description without file names)
    quantize_bias: bool = True  # int8-static-qdq: False for TensorRT (no int32 bias DequantizeLinear there)
    weight_only: WeightOnlyConfig | None = None  # weight-only: the decoder's precisions and weight form
    fp16_islands: bool = False  # fp16: keep Gemma 3's overflow-prone parts fp32 (decoders)
    fp16_feeds: list | None = None  # fp16 islands: also keep what these feeds measure above the threshold
    embedding: embedding.EmbeddingConfig | None = None  # embedding: the table's precision, form and block size


def _fp16(src: Path, dst: Path, options: ConvertOptions) -> dict:
    """Whole graph in fp16; decoders with fp32 islands where Gemma 3 overflows fp16, found by structure and by
    measuring the fp32 graph on the feeds (compile/fp16.py)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    if options.fp16_islands:
        wo = options.weight_only  # GPU targets (plan.gpu_activations): the KV cache in fp16 too, half the memory
        if wo is not None and wo.activations == "float16":
            return {**fp16.convert_fp16(src, dst, options.fp16_feeds, half_io=weight_only.KV_IO),
                    "kv_dtype": "float16"}
        return fp16.convert_fp16(src, dst, options.fp16_feeds)
    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True, disable_shape_infer=True)
    save_onnx(model, dst)
    return {"method": "fp16", "io_types": "float32"}


def _weight_only(src: Path, dst: Path, options: ConvertOptions) -> dict:
    """Decoders: block-wise weights, activations left in float (qdq) or quantised per block at run time (nbits)."""
    import onnx_ir as ir

    if options.weight_only is not None and options.weight_only.activations == "float16":  # GPU targets: W4A16/W8A16
        return weight_only.quantize_half(src, dst, options.weight_only, options.fp16_feeds)
    model = ir.load(str(src))
    ir.external_data.load_to_model(model)  # the result is saved whole: no tensor may still point into `src`'s data
    record = weight_only.quantize_weights(model, weight_only.graph_weights(model), options.weight_only,
                                          weight_only.MemorySink())
    save_onnx(ir.serde.serialize_model(model), dst)
    return record


def _embedding(src: Path, dst: Path, options: ConvertOptions) -> dict:
    """The token-embedding table as int8/int4 blocks (compile/embedding.py); the rest of the graph unchanged."""
    import onnx_ir as ir

    model = ir.load(str(src))
    ir.external_data.load_to_model(model)
    record = embedding.quantize_embedding(model, options.embedding)
    save_onnx(ir.serde.serialize_model(model), dst)
    return record


def _int8_dynamic(src: Path, dst: Path, options: ConvertOptions) -> dict:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True,
                     # The attention products (Q.K^T, P.V) are quantised too: left in fp32 they take a large share
                     # of the int8 encoder's time (benchmarks/results/design-measurements.md).
                     op_types_to_quantize=["MatMul", "Gemm"], extra_options={"MatMulConstBOnly": False},
                     use_external_data_format=_external(src))
    return {"method": "int8-dynamic", "weights": "int8 per-channel symmetric", "activations": "uint8 per call"}


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


def _int8_static_qdq(src: Path, dst: Path, options: ConvertOptions) -> dict:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    feeds, info = options.calibration
    # TensorRT (quantize_bias False): biases stay float. ORT's default int32 bias DequantizeLinear has no TensorRT
    # form (it quantizes to int8/int4/fp8/fp4 only); TensorRT fuses the float bias into the int8 layer.
    quantize_bias = options.quantize_bias
    with _calibration_runs_reductions_early():
        _quantize_static_qdq(quantize_static, src, dst, feeds, CalibrationMethod, QuantFormat, QuantType,
                             quantize_bias)
    return {"method": "int8-static-qdq", "weights": "int8 per-channel symmetric", "activations": "int8 symmetric (zero point 0)",
            **({} if quantize_bias else {"bias": "float"}),
            "calibration": {**info, "digest": feeds_digest(feeds), "algorithm": "minmax"}}


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
    At MedGemma's 896 px (4096 patches, 1 GB per attention matrix) the whole vision tower does not fit in memory.
    PRIORITY_BASED order runs each pair as soon as its input exists (benchmarks/results/design-measurements.md); same nodes, same ranges. The patch lives
    in the isolated child that quantises large graphs (isolate.py)."""
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


METHODS = {"fp16": _fp16, "int8-dynamic": _int8_dynamic, "int8-static-qdq": _int8_static_qdq,
           "weight-only": _weight_only, "embedding": _embedding}

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


def convert(method: str, src: Path, dst: Path, options: ConvertOptions = ConvertOptions(),
            isolate: bool | None = None) -> dict:
    """Write `dst` from the fp32 graph `src` by `method`; returns the manifest's `quantization` record."""
    return run_isolated(METHODS[method], Path(src), Path(dst), options, isolate=isolate)
