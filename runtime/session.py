"""Sessions: one small interface (`Session`) for running a bundle component, over ONNX Runtime (`OrtSession`), a
TensorRT engine (medc.runtime.trt_session.TrtSession) or OpenVINO IR (medc.runtime.ov_session.OvSession);
`SESSIONS` and `session_kind` choose one per component. A
session is a context manager, and its backend is imported only when it opens.

On GPU providers, ONNX Runtime's CUDA and TensorRT execution providers get their options from `provider_options`
(the TensorRT EP caches its engines under ~/.cache/medc/trt-ep/<bundle>); CPU sessions get ONNX Runtime's defaults.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import re
from pathlib import Path
from typing import Protocol

import numpy as np

from medc.errors import MedcError
from medc.runtime.ov_session import OvSession
from medc.runtime.trt_session import TrtSession

log = logging.getLogger(__name__)


class Session(Protocol):
    """What a pipeline needs of a component's session, whatever runs it."""

    def open(self) -> "Session":
        """Load the model (idempotent); returns the session."""

    def close(self) -> None:
        """Release the model and its memory."""

    def __enter__(self) -> "Session": ...

    def __exit__(self, *exc) -> None: ...

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Host arrays in, every output as a host array out."""

    @property
    def active_providers(self) -> list[str]:
        """What actually runs it (ONNX Runtime's providers in order, or "TensorRT")."""

    @property
    def input_names(self) -> list[str]:
        """The graph's or engine's input names."""


class OrtSession:
    def __init__(self, path: Path, providers: list[str] | None = None, threads: int | None = None,
                 provider_options: list[dict] | None = None, config: dict[str, str] | None = None):
        self.path = Path(path)
        self.providers = providers or ["CPUExecutionProvider"]
        self.threads = threads
        self.provider_options = provider_options  # one dict per provider; None: ONNX Runtime's defaults
        self.config = config or {}  # session config entries (onnxruntime_session_options_config_keys.h)
        # Return the activation arena after every run: for a component run once per request before the decoder
        # (the vision encoder), so its peak is not held beside the decoder's (the planner counts the larger only).
        self.release_activations = False
        self._sess = None
        self._adapters: dict[Path | None, dict] = {}  # LoRA adapter file (None: the base's zeros) -> its OrtValues

    def open(self) -> "OrtSession":
        if self._sess is None:
            import onnxruntime as ort

            if any(p != "CPUExecutionProvider" for p in self.providers):
                _preload_cuda_libraries(ort)
            so = ort.SessionOptions()
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            so.log_severity_level = 3  # ORT warnings name nodes, not data, but are noise for users
            if self.threads:
                so.intra_op_num_threads = self.threads
            for key, value in self.config.items():
                so.add_session_config_entry(key, value)
            options = self.provider_options if self.provider_options is not None else provider_options(self.providers)
            extra = {} if options is None else {"provider_options": options}
            try:
                self._sess = ort.InferenceSession(str(self.path), so, providers=self.providers, **extra)
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

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.open()._sess.get_inputs()]

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.open()._sess.get_outputs()]

    @property
    def on_gpu(self) -> bool:
        """Whether ONNX Runtime runs it on a GPU provider (outputs can then stay in device memory)."""
        return self.active_providers[0] in ("CUDAExecutionProvider", "TensorrtExecutionProvider")

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        sess = self.open()._sess
        names = [o.name for o in sess.get_outputs()]
        # Float feeds in the graph's float type: golden cases hold fp32 KV caches, which a GPU build's decoder
        # takes in fp16 (W4A16 / fp16 KV); ONNX Runtime refuses a mismatched type.
        half = {i.name for i in sess.get_inputs() if i.type == "tensor(float16)"}
        feeds = {k: v.astype(np.float16) if k in half and v.dtype == np.float32 else v for k, v in feeds.items()}
        return dict(zip(names, sess.run(names, feeds, self._run_options())))

    def _run_options(self):
        """ONNX Runtime's arena shrinkage (a run config entry) where `release_activations` asks for it: the arena's
        free regions go back to the system when the run ends (the CPU's, and the GPU's on a GPU provider)."""
        if not self.release_activations:
            return None
        import onnxruntime as ort

        options = ort.RunOptions()
        arenas = "cpu:0;gpu:0" if self.on_gpu else "cpu:0"
        options.add_run_config_entry("memory.enable_memory_arena_shrinkage", arenas)
        return options

    def io_binding(self):
        """An ONNX Runtime IOBinding for this session: inputs and outputs bound to memory the caller owns (a decoder
        binds its KV cache, runtime/decoder.py)."""
        return self.open()._sess.io_binding()

    def run_bound(self, binding, adapter: Path | None = None) -> None:
        """`adapter`: a LoRA adapter file (ONNX Runtime's format) active for this run only (None: the base).

        ONNX Runtime applies an adapter activated in RunOptions to `run` but not to `run_with_iobinding`, so its
        tensors are bound here as the inputs they override; a graph with LoRA slots gets them every run (the
        adapter's, or zeros for the base), since a binding keeps what was bound last."""
        sess = self.open()._sess
        slots = self._lora_params(None)
        if slots:
            params = self._lora_params(adapter) if adapter is not None else slots
            for name in slots:
                binding.bind_ortvalue_input(name, params[name])
        elif adapter is not None:
            raise MedcError(f"{self.path.name} has no LoRA slots; this bundle takes no run-time adapter.")
        sess.run_with_iobinding(binding)

    def _lora_params(self, adapter: Path | None) -> dict:
        """The OrtValues of an adapter file ({} for a graph without slots); None: the slots' zeros (the base)."""
        if adapter in self._adapters:
            return self._adapters[adapter]
        import onnxruntime as ort

        if adapter is None:
            sess = self.open()._sess  # the slots are overridable initializers, not among get_inputs()
            inputs = [i for i in sess.get_overridable_initializers() if i.name.startswith("lora.")]
            params = {i.name: ort.OrtValue.ortvalue_from_numpy(np.zeros(i.shape, np.float32)) for i in inputs}
        else:  # loaded once; its tensors stay in memory for every run that binds them
            params = ort.AdapterFormat.read_adapter(str(adapter)).get_parameters()
        self._adapters[adapter] = params
        return params


def _preload_cuda_libraries(ort) -> None:
    """onnxruntime-gpu links CUDA and cuDNN at run time. Where they come from pip's nvidia-* packages (as with a CUDA
    build of torch), ORT finds them only after `preload_dlls()` (onnxruntime >= 1.21); system installs (JetPack,
    /usr/local/cuda) are found by the loader and need nothing. Once per process."""
    global _PRELOADED
    if not _PRELOADED and hasattr(ort, "preload_dlls") and importlib.util.find_spec("nvidia") is not None:
        ort.preload_dlls()
    _PRELOADED = True


_PRELOADED = False


def stand_in_config(engine: str, providers: list[str]) -> dict[str, str]:
    """Session settings for gating a TensorRT bundle's ONNX graphs on ONNX Runtime's CPU provider, which stands in
    for the engine there. TensorRT computes Q/DQ int8 GEMMs exactly (int32 accumulation); ORT's CPU provider fuses
    the same Q/DQ pairs into u8 x s8 kernels, which on CPUs without VNNI (AVX2's vpmaddubsw) saturate int16 pair
    sums, and the gate would judge those kernels' error, not the engine's (benchmarks/results/design-measurements.md). Unfused, the
    Q/DQ pairs run as dequantise + float GEMM, the same arithmetic as the engine up to float rounding."""
    if engine == "tensorrt" and providers and providers[0] == "CPUExecutionProvider":
        return {"session.disable_quant_qdq": "1"}
    return {}


# -- ONNX Runtime's GPU providers --------------------------------------------------------------------------------------
# Option names: https://onnxruntime.ai/docs/execution-providers/TensorRT-ExecutionProvider.html (Configurations) and
# https://onnxruntime.ai/docs/execution-providers/CUDA-ExecutionProvider.html. The CUDA provider ran on an H200
# (benchmarks/cuda_check.py); the TensorRT provider is unverified on hardware.
def trt_ep_cache_dir(bundle) -> Path:
    """~/.cache/medc/trt-ep/<bundle hash>: the TensorRT EP's engines and timing cache for exactly this bundle."""
    digest = hashlib.sha256(json.dumps(bundle.manifest.files, sort_keys=True).encode()).hexdigest()[:16]
    # The model name comes from the manifest: only its safe characters reach the path ('../../etc' would not).
    name = re.sub(r"[^A-Za-z0-9_-]+", "_", str(bundle.manifest.model.get("name", "bundle")))[:64].strip("_") or "bundle"
    return Path.home() / ".cache" / "medc" / "trt-ep" / f"{name}-{digest}"


def provider_options(providers: list[str], bundle=None, component=None) -> list[dict] | None:
    """Options for each of `providers`, or None when only the CPU provider is used (CPU sessions keep ONNX Runtime's
    defaults)."""
    if all(p == "CPUExecutionProvider" for p in providers):
        return None
    options = []
    for p in providers:
        if p == "TensorrtExecutionProvider":
            o = {"device_id": 0}
            if bundle is not None:
                cache = trt_ep_cache_dir(bundle)
                o.update(trt_engine_cache_enable=True, trt_engine_cache_path=str(cache),
                         trt_timing_cache_enable=True, trt_timing_cache_path=str(cache))
                workspace = (bundle.manifest.tensorrt or {}).get("workspace_bytes")
                if workspace:
                    o["trt_max_workspace_size"] = int(workspace)
            # fp16 kernels only for fp16 bundles, and not where the graph keeps fp32 islands: with trt_fp16_enable
            # the EP builds a weakly typed network (free to run those islands in fp16, where Gemma 3 overflows);
            # without it, a strongly typed one that keeps the graph's own types (microsoft/onnxruntime#24298).
            if component is not None and component.precision == "fp16" and "fp32_islands" not in component.quantization:
                o["trt_fp16_enable"] = True
        elif p == "CUDAExecutionProvider":
            # TF32 off: ORT's CUDA provider turns it on by default, and fp32 then is not fp32 (an fp32 encoder
            # misses its 1e-4 gate: benchmarks/results/cuda-check-h200.md). fp16 graphs' fp32 islands keep fp32 too.
            o = {"device_id": 0, "use_tf32": 0}
        else:
            o = {}
        options.append(o)
    return options


# -- which session runs a component -----------------------------------------------------------------------------------
def _ort(bundle, name: str, comp, threads):
    # A component the build pinned to one provider: a token-embedding table that is the GPU lm_head's stored rows,
    # read on the CPU a row at a time (compile/embedding.py SHARED_FORM).
    providers = [comp.quantization["provider"]] if comp.quantization.get("provider") else bundle.providers
    return OrtSession(bundle.file(comp.file), providers, threads, provider_options(providers, bundle, comp))


def _tensorrt(bundle, name: str, comp, threads):
    record = bundle.manifest.tensorrt
    return TrtSession(bundle.file(record["engines"][name]["file"]), record["profiles"].get(name),
                      manifest=bundle.manifest, component=name)


def _openvino(bundle, name: str, comp, threads):
    return OvSession(bundle.file(comp.file), threads, comp.quantization.get("inference_precision", "f32"))


# Session kind -> factory(bundle, component name, ComponentEntry, threads).
SESSIONS = {"onnxruntime": _ort, "tensorrt": _tensorrt, "openvino": _openvino}


def session_kind(bundle, name: str) -> str:
    """"openvino" for a component stored as OpenVINO IR; "tensorrt" for a component with a built engine when
    TensorRT and cuda-python are installed; else "onnxruntime"."""
    comp = bundle.manifest.components.get(name)
    if comp is not None and comp.backend == "openvino":
        return "openvino"
    engines = (bundle.manifest.tensorrt or {}).get("engines") or {}
    if name not in engines or (comp is not None and comp.quantization.get("provider")):
        return "onnxruntime"
    if importlib.util.find_spec("tensorrt") is None or importlib.util.find_spec("cuda") is None:
        log.info("%s: the bundle has a TensorRT engine, but tensorrt/cuda-python are not installed; using ONNX Runtime",
                 name)
        return "onnxruntime"
    return "tensorrt"


class Pipeline:
    """Base of the model pipelines: one lazily opened session per bundle component; a context manager."""

    def __init__(self, bundle, threads: int | None = None):
        self.bundle = bundle
        self._sessions = {name: SESSIONS[session_kind(bundle, name)](bundle, name, c, threads)
                          for name, c in bundle.manifest.components.items()}

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for s in self._sessions.values():
            s.close()

    def active_providers(self, component: str) -> list[str]:
        """What runs `component` (opens its session)."""
        return self._sessions[component].active_providers

    def run_component(self, component: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One component's graph on its own inputs, every output back (the server's V2 routes): the pipeline's own
        session, shared with its other calls."""
        return self._sessions[component].run(feeds)


def open_component(bundle, name: str, threads: int | None = None, providers: list[str] | None = None,
                   config: dict[str, str] | None = None):
    """A session for one component of `bundle`, of the kind it was built for (verify, bench)."""
    comp = bundle.manifest.components[name]
    if comp.backend == "openvino":
        return _openvino(bundle, name, comp, threads)
    pinned = [comp.quantization["provider"]] if comp.quantization.get("provider") else None
    return OrtSession(bundle.file(comp.file), providers or pinned or bundle.providers, threads, config=config)
