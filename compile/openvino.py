"""OpenVINO forms of a component for CPU targets: the same exported ONNX graph (standard ops, before ONNX Runtime's
fusions, which are contrib ops OpenVINO does not read) converted to OpenVINO IR, as build candidates beside the ONNX
Runtime forms. The build gates and times them all and keeps the fastest that passes (compile/build.py).

    ov-fp32     ov.convert_model, f32 inference                        (precision fp32)
    ov-bf16     the same, weights stored fp16, computed in bf16        (precision bf16; the CPU must have
                AVX512_BF16 or AMX, which compile/build.py checks before a bf16 build)
    ov-int8     + NNCF post-training quantisation, transformer preset, (precision int8)
                min-max ranges, calibrated on the component's calibration inputs plus two random ones; the layers
                NNCF leaves in float run in bf16 where the CPU has AVX512_BF16 / AMX, else f32
    ov-int8-sq  the same with NNCF's SmoothQuant (activation outliers moved into the weights)

SmoothQuant helps some graphs and hurts others (on the tiny MedSigLIP text encoder it cost the random-ids case 0.96
vs 0.99 worst cosine; on its image encoder it helped), so both are candidates and the gate and the clock decide.

The inference precision goes into the manifest (`quantization.inference_precision`); the runtime honours it, or falls
back to f32 with a warning on a CPU without bf16 (runtime/ov_session.py).
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from pathlib import Path

from medc.errors import MedcError
from medc.runtime.ov_session import cpu_has_bf16

METHODS = ("ov-fp32", "ov-bf16", "ov-int8", "ov-int8-sq")
# ONNX Runtime's fused graphs use contrib ops (Attention, SkipLayerNormalization): convert the unfused one.
SOURCE_OPTIMIZER = "none"


def available() -> bool:
    return importlib.util.find_spec("openvino") is not None and importlib.util.find_spec("nncf") is not None


def require() -> None:
    if not available():
        raise MedcError("--backend openvino needs OpenVINO and NNCF: pip install 'medc[openvino]'.")


def convert(method: str, src: Path, dst: Path, calibration: tuple | None, extra: list | None = None) -> dict:
    """Write OpenVINO IR `dst` (.xml, and its .bin beside it) from the fp32 ONNX graph `src`; returns the manifest's
    `quantization` record."""
    import openvino as ov

    require()
    model = ov.convert_model(str(src))
    if method == "ov-fp32":
        ov.save_model(model, str(dst), compress_to_fp16=False)
        return {"method": "ov-fp32", "backend": "openvino", "openvino": ov.__version__, "inference_precision": "f32"}
    if method == "ov-bf16":  # fp16 storage halves the files; the CPU plugin converts the weights to bf16 once
        ov.save_model(model, str(dst), compress_to_fp16=True)
        return {"method": "ov-bf16", "backend": "openvino", "openvino": ov.__version__, "weights": "fp16 (stored)",
                "activations": "bf16", "inference_precision": "bf16"}
    if method not in METHODS:
        raise MedcError(f"unknown OpenVINO method {method!r}; medc knows {', '.join(METHODS)}.")
    if calibration is None:
        raise MedcError(f"{method} needs calibration inputs; this component has none (a decoder?).")
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters

    from medc.compile.quantize import feeds_digest

    feeds, info = calibration
    feeds = list(feeds) + list(extra or [])
    smooth = method == "ov-int8-sq"
    advanced = None if smooth else AdvancedQuantizationParameters(
        smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=-1))  # -1: SmoothQuant off
    with contextlib.redirect_stdout(sys.stderr):  # NNCF's progress bars: stdout carries only medc's own output
        quantized = nncf.quantize(model, nncf.Dataset(feeds), model_type=nncf.ModelType.TRANSFORMER,
                                  subset_size=len(feeds), advanced_parameters=advanced)
    ov.save_model(quantized, str(dst), compress_to_fp16=False)
    return {"method": method, "backend": "openvino", "openvino": ov.__version__, "nncf": nncf.__version__,
            "weights": "int8 (NNCF PTQ, transformer preset)", "activations": "int8",
            "inference_precision": "bf16" if cpu_has_bf16() else "f32",
            "calibration": {**info, "random_inputs": len(extra or []), "digest": feeds_digest(feeds),
                            "algorithm": "nncf min-max" + (" + smooth quant" if smooth else "")}}
