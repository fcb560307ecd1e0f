"""Precision conversion with ONNX Runtime's own tools (onnxruntime.quantization, onnxruntime.transformers.float16).

Methods, each a registry entry that writes `dst` from an fp32 graph:
- `fp16`: weights and activations in fp16, graph inputs/outputs kept fp32 so callers never see the change.
- `int8-static-qdq`: explicit QuantizeLinear/DequantizeLinear around MatMul/Gemm/Conv, int8, symmetric (zero point
  0), per-channel weights, activation ranges from calibration data. This is the form TensorRT consumes (implicit
  calibrators are deprecated since TensorRT 10.1). Only MatMuls with a constant weight are quantised: the attention
  score products stay in float, where the softmax range would waste half of a symmetric int8 scale.
- `int8-weight-only`: decoders; blockwise int8 weights (MatMulNBits), blockwise dynamic activations.
- `int8-dynamic`: per-channel int8 weights, activations quantised per call (MatMulInteger); ONNX Runtime CPU's fast
  path. Dynamic ranges are exact per call, so the attention products can be quantised here too.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def _fp16(src: Path, dst: Path, calibration=None) -> dict:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from medc.compile.export import save_onnx

    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True, disable_shape_infer=True)
    save_onnx(model, dst)
    return {"method": "fp16", "io_types": "float32"}


def _int8_dynamic(src: Path, dst: Path, calibration=None) -> dict:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True,
                     # The attention products (Q.K^T, P.V) are quantised too: on a 1024-token image they are ~13% of
                     # the FLOPs and, left in fp32, ~20% of the int8 encoder's time (measured, benchmarks/).
                     op_types_to_quantize=["MatMul", "Gemm"], extra_options={"MatMulConstBOnly": False},
                     use_external_data_format=_external(src))
    return {"method": "int8-dynamic", "weights": "int8 per-channel symmetric", "activations": "uint8 per call"}


def _int8_weight_only(src: Path, dst: Path, calibration=None) -> dict:
    """Decoders: int8 weights in blocks of 16 (MatMulNBits), activations quantised per block of 16 at run time
    (accuracy level 4, MLAS's int8 kernels). Measured on Gemma 3 270M, perplexity (GPL-3, 4 x 512) vs fp32 and
    decode speed (2 threads): per-tensor dynamic int8 +20% (Gemma's activation outliers), 62 tok/s; blocks of 32
    +0.49%, 52 tok/s; blocks of 16 +0.15%, 52 tok/s; fp32 arithmetic (level 1) +0.04% but 1 tok/s (no fast
    kernel: it dequantises every call); fp32 27 tok/s."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    from medc.compile.export import save_onnx

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)  # a line per node
    config = DefaultWeightOnlyQuantConfig(block_size=16, is_symmetric=True, accuracy_level=4, bits=8)
    quantizer = MatMulNBitsQuantizer(onnx.load(str(src)), algo_config=config)
    quantizer.process()
    save_onnx(quantizer.model.model, dst)
    return {"method": "int8-weight-only", "weights": "int8 symmetric, blocks of 16 (MatMulNBits)",
            "activations": "int8 per block of 16, at run time", "accuracy_level": 4}


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


def _int8_static_qdq(src: Path, dst: Path, calibration=None) -> dict:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    feeds, info = calibration
    quantize_static(
        str(src), str(dst), _Reader(feeds), quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True,
        op_types_to_quantize=["MatMul", "Gemm", "Conv"], calibrate_method=CalibrationMethod.MinMax,
        use_external_data_format=_external(src),
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "MatMulConstBOnly": True,
                       # Bounded memory: reduce each sample to min/max and merge, instead of holding every
                       # intermediate tensor of every sample (~5 GB per image for full-size SigLIP). Not
                       # CalibMaxIntermediateOutputs: in onnxruntime 1.32 it drops the data it clears.
                       "CalibStridedMinMax": 1, "CalibTensorRangeSymmetric": True},
    )
    return {"method": "int8-static-qdq", "weights": "int8 per-channel symmetric", "activations": "int8 symmetric (zero point 0)",
            "calibration": {**info, "digest": calibration_digest(feeds), "algorithm": "minmax"}}


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
           "int8-weight-only": _int8_weight_only}

# The graph each int8 method starts from. Both quantise MatMul/Gemm nodes, so attention must not be fused into one
# Attention op (its QKV projection would stay fp32); other methods use the build's optimiser (default: xformers).
SOURCE_OPTIMIZER = {"int8-dynamic": "ort-transformers", "int8-static-qdq": "ort-transformers"}


def convert(method: str, src: Path, dst: Path, calibration=None, isolate: bool | None = None) -> dict:
    from medc.compile import isolate as iso

    return iso.run(METHODS[method], Path(src), Path(dst), calibration, isolate=isolate)
