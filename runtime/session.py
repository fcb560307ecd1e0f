"""One small session protocol over ONNX Runtime. A context manager; onnxruntime is imported only when opened.

Native TensorRT sessions (issue: targets/TensorRT) implement the same three methods.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medc.errors import MedcError


class OrtSession:
    def __init__(self, path: Path, providers: list[str] | None = None, threads: int | None = None):
        self.path = Path(path)
        self.providers = providers or ["CPUExecutionProvider"]
        self.threads = threads
        self._sess = None

    def open(self) -> "OrtSession":
        if self._sess is None:
            import onnxruntime as ort

            so = ort.SessionOptions()
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            so.log_severity_level = 3  # ORT warnings name nodes, not data, but are noise for users
            if self.threads:
                so.intra_op_num_threads = self.threads
            try:
                self._sess = ort.InferenceSession(str(self.path), so, providers=self.providers)
            except Exception as e:  # ORT raises its own Fail/InvalidGraph types
                raise MedcError(f"ONNX Runtime cannot load {self.path.name}: {str(e).splitlines()[0][:300]}. "
                                "The file may be damaged or built for another target; run `medc verify` on the bundle.") from None
        return self

    def __enter__(self) -> "OrtSession":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._sess = None

    @property
    def active_providers(self) -> list[str]:
        return self.open()._sess.get_providers()

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        sess = self.open()._sess
        names = [o.name for o in sess.get_outputs()]
        return dict(zip(names, sess.run(names, feeds)))


class Pipeline:
    """Base of the model pipelines: one lazily opened session per bundle component; a context manager."""

    def __init__(self, bundle, threads: int | None = None):
        self.bundle = bundle
        self._sessions = {name: OrtSession(bundle.file(c.file), bundle.providers, threads)
                          for name, c in bundle.manifest.components.items()}

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for s in self._sessions.values():
            s.close()
