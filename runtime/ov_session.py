"""An OpenVINO session: a bundle component stored as OpenVINO IR (`.xml` + `.bin`), run on the CPU plugin through
the same `Session` interface as ONNX Runtime sessions (runtime/session.py).

The build records the inference precision the component was gated with (`quantization.inference_precision`:
"f32", or "bf16" where the build CPU has AVX512_BF16 / AMX). On a CPU without bf16 the session falls back to f32 with
a warning rather than failing: f32 is the precision bf16 approximates, so fidelity can only improve.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np

from medc.errors import MedcError

log = logging.getLogger(__name__)


def cpu_has_bf16() -> bool:
    """Whether OpenVINO's CPU plugin runs bf16 natively here (AVX512_BF16 or AMX)."""
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


class OvSession:
    def __init__(self, path: Path, threads: int | None = None, inference_precision: str = "f32"):
        self.path = Path(path)
        self.threads = threads
        self.inference_precision = inference_precision
        self._compiled = None
        # OpenVINO's CompiledModel.__call__ reuses one infer request: calls from two server threads (the V2 route's
        # micro-batcher beside the OpenAI route's, on one component) take turns, as a TensorRT context's do.
        self._lock = threading.Lock()

    def open(self) -> "OvSession":
        if self._compiled is None:
            try:
                import openvino as ov
            except ImportError:
                raise MedcError(f"{self.path.name} is an OpenVINO component: install the runtime's OpenVINO backend "
                                "(pip install 'medc[openvino]'), or rebuild the bundle with --backend ort.") from None
            hint = self.inference_precision
            if hint == "bf16" and not cpu_has_bf16():
                log.warning("%s was built to run in bf16, which this CPU lacks (no AVX512_BF16 or AMX); running it "
                            "in f32", self.path.name)
                hint = "f32"
            config = {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY"}
            if self.threads:
                config["INFERENCE_NUM_THREADS"] = self.threads
            try:
                core = ov.Core()
                self._compiled = core.compile_model(core.read_model(str(self.path)), "CPU", config)
            except Exception as e:  # OpenVINO raises RuntimeError with its own text
                raise MedcError(f"OpenVINO cannot load {self.path.name}: {str(e).splitlines()[0][:300]}. The file may "
                                "be damaged; run `medc verify` on the bundle.") from None
            self.active_hint = hint
        return self

    def __enter__(self) -> "OvSession":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._compiled = None

    @property
    def active_providers(self) -> list[str]:
        self.open()
        return [f"OpenVINO CPU ({self.active_hint})"]

    @property
    def input_names(self) -> list[str]:
        return [i.get_any_name() for i in self.open()._compiled.inputs]

    @property
    def output_names(self) -> list[str]:
        return [o.get_any_name() for o in self.open()._compiled.outputs]

    @property
    def on_gpu(self) -> bool:
        return False

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        compiled = self.open()._compiled
        with self._lock:
            result = compiled(feeds)
            return {o.get_any_name(): np.asarray(result[o]) for o in compiled.outputs}
