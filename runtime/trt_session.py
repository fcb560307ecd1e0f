"""Native TensorRT sessions: the `Session` interface of runtime/session.py over an engine (open/close, a context
manager, `run(feeds)` returning numpy arrays), `TrtDecoder` (the explicit decoder with its KV cache kept on the GPU),
and the checks that refuse engines this device cannot load.

tensorrt and cuda-python (`cuda.bindings.runtime`, or `cuda.cudart` in older releases) are imported when a session
opens, never at import time, and torch is never used. Device buffers are allocated once per tensor and grown only when
a larger shape arrives; inputs are copied in, `execute_async_v3` runs on the session's own CUDA stream, outputs are
copied back, and the stream is synchronised once per call.

UNVERIFIED ON HARDWARE: written against NVIDIA's documentation for TensorRT 10.x and 11.x (cited next to each call,
keys below) and cuda-python's runtime bindings; no machine this was developed on has a GPU. `medc verify BUNDLE`
on the device runs every engine against the bundle's golden outputs, and `benchmarks/gpu_check.sh` against ONNX
Runtime; run them before trusting an engine.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medc.errors import MedcError
from medc.runtime.decoder import ExplicitDecoder
from medc.system import version_tuple
from medc.targets import TARGETS

_TRT = "https://docs.nvidia.com/deeplearning/tensorrt"
DOCS = {
    "runtime-10": f"{_TRT}/latest/_static/python-api/infer/Core/Runtime.html",
    "engine-10": f"{_TRT}/archives/tensorrt-1001/api/python_api/infer/Core/Engine.html",
    "engine-11": f"{_TRT}/11.0.0/_static/python-api/infer/Core/Engine.html",
    "context-10": f"{_TRT}/latest/_static/python-api/infer/Core/ExecutionContext.html",
    "context-cpp-10": f"{_TRT}/api/c_api/classnvinfer1_1_1_i_execution_context.html (setInputShape, getTensorShape)",
    "v3-10": f"{_TRT}/11.0.0/api/migration/tensorrt-8x-to-10x-python-api.html (name-based tensors, enqueueV3)",
    "sample": "https://github.com/NVIDIA/TensorRT/blob/main/samples/python/common_runtime.py (cudart + execute_async_v3)",
    "cudart": "https://nvidia.github.io/cuda-python/cuda-bindings/latest/module/runtime.html",
    "compat": f"{_TRT}/11.1.0/inference-library/engine-compatibility.html",
    "alloc-10": f"{_TRT}/latest/_static/python-api/infer/Core/RuntimeConfig.html (ExecutionContextAllocationStrategy"
                ".USER_MANAGED) and context-10 (update_device_memory_size_for_shapes, set_device_memory; TensorRT 10.1+)",
}
_MIN_ALLOC = 256  # bytes: empty tensors (a KV cache of 0 tokens) still get a valid, aligned address


# -- CUDA runtime (cuda-python) ---------------------------------------------------------------------------------------
class CudaRuntime:
    """The few CUDA runtime calls a session needs, with errors turned into MedcError [cudart] [sample]."""

    def __init__(self, cudart):
        self.rt = cudart

    def _call(self, what: str, result):
        err, *values = result if isinstance(result, tuple) else (result,)
        if err != self.rt.cudaError_t.cudaSuccess:
            raise MedcError(f"CUDA {what} failed: {err}. Check the GPU with `nvidia-smi` (Jetson: `tegrastats`).")
        return values[0] if len(values) == 1 else values

    def device_info(self, device: int = 0) -> tuple[str, str]:
        prop = self._call("cudaGetDeviceProperties", self.rt.cudaGetDeviceProperties(device))
        name = prop.name.decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
        return name.rstrip("\x00").strip(), f"{prop.major}.{prop.minor}"

    def set_device(self, device: int) -> None:
        self._call("cudaSetDevice", self.rt.cudaSetDevice(device))

    def malloc(self, nbytes: int) -> int:
        return int(self._call("cudaMalloc", self.rt.cudaMalloc(nbytes)))

    def free(self, ptr: int) -> None:
        self._call("cudaFree", self.rt.cudaFree(ptr))

    def stream(self):
        return self._call("cudaStreamCreate", self.rt.cudaStreamCreate())

    def sync(self, stream) -> None:
        self._call("cudaStreamSynchronize", self.rt.cudaStreamSynchronize(stream))

    def destroy(self, stream) -> None:
        self._call("cudaStreamDestroy", self.rt.cudaStreamDestroy(stream))

    def to_device(self, dst: int, arr: np.ndarray, stream) -> None:
        if arr.nbytes:
            kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
            self._call("cudaMemcpyAsync", self.rt.cudaMemcpyAsync(dst, arr.ctypes.data, arr.nbytes, kind, stream))

    def to_host(self, arr: np.ndarray, src: int, stream) -> None:
        if arr.nbytes:
            kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
            self._call("cudaMemcpyAsync", self.rt.cudaMemcpyAsync(arr.ctypes.data, src, arr.nbytes, kind, stream))


def cuda_runtime() -> CudaRuntime:
    """cuda-python's runtime module: `cuda.bindings.runtime` (cuda-python 12.6+), else the older `cuda.cudart`."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError:
            raise MedcError("the TensorRT runtime needs cuda-python for device memory and streams: "
                            "`pip install cuda-python` (match its major version to your CUDA: 12.x or 13.x; on "
                            "Jetson, JetPack 6 is CUDA 12.6, JetPack 7 is CUDA 13).") from None
    return CudaRuntime(cudart)


def _stream_handle(stream) -> int:
    try:
        return int(stream)
    except TypeError:
        return int(stream.getPtr())


class DeviceBuffer:
    """One device allocation, reused across calls and grown (by at least 1.5x, so a KV cache that gains a token per
    step reallocates O(log n) times) when a larger tensor arrives."""

    def __init__(self, cuda: CudaRuntime, nbytes: int = 0):
        self.cuda, self.ptr, self.nbytes = cuda, 0, 0
        self.ensure(nbytes)

    def ensure(self, nbytes: int) -> None:
        if self.ptr and nbytes <= self.nbytes:
            return
        size = max(_MIN_ALLOC, int(nbytes), int(self.nbytes * 1.5))
        self.free()  # callers synchronise their stream before a buffer can grow, so nothing still uses it
        self.ptr, self.nbytes = self.cuda.malloc(size), size

    def free(self) -> None:
        if self.ptr:
            self.cuda.free(self.ptr)
        self.ptr, self.nbytes = 0, 0


@dataclass
class DeviceTensor:
    """A tensor left on the device by `TrtSession.execute` (e.g. a present KV cache), bindable as a later input."""

    buffer: DeviceBuffer
    shape: tuple[int, ...]
    dtype: np.dtype

    def numpy(self, session: "TrtSession") -> np.ndarray:
        out = np.empty(self.shape, self.dtype)
        session.cuda.to_host(out, self.buffer.ptr, session._stream)
        session.cuda.sync(session._stream)
        return out


# -- what this device has, and engines it can load ---------------------------------------------------------------------
def _on_jetson(target=None) -> bool:
    return (target is not None and target.platform == "jetson") or Path("/etc/nv_tegra_release").exists()


def tensorrt_missing_error(target=None) -> MedcError:
    """How to install TensorRT's Python bindings, for Jetson (JetPack) or an x86/SBSA machine (NVIDIA's wheels)."""
    want = f" {' or '.join(target.tensorrt)}" if target is not None and target.tensorrt else ""
    if _on_jetson(target):
        how = ("on Jetson TensorRT comes with JetPack: `sudo apt install nvidia-jetpack` (or only the bindings: "
               "`sudo apt install python3-libnvinfer`), then use the system python3 or a venv created with "
               "--system-site-packages; pip's tensorrt wheels are not JetPack's build")
    else:
        how = ("on x86 install NVIDIA's wheels matching your CUDA: `pip install tensorrt-cu12` (CUDA 12) or "
               "`pip install tensorrt-cu13` (CUDA 13)" + (f", version{want}" if want else "")
               + "; plain `pip install tensorrt` picks the CUDA 13 build")
    return MedcError(f"TensorRT{want} is not installed (its Python module `tensorrt` cannot be imported). To build or "
                     f"run engines, {how}. Without it, the bundle still runs on ONNX Runtime.")


def import_tensorrt(target=None):
    try:
        import tensorrt
    except ImportError:
        raise tensorrt_missing_error(target) from None
    return tensorrt


def gpu_info(device: int = 0) -> tuple[str, str] | None:
    """(GPU name, compute capability "8.7") of `device`, from cuda-python or nvidia-smi; None without a GPU."""
    try:
        return cuda_runtime().device_info(device)
    except (ImportError, MedcError):
        pass
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True).stdout.splitlines()
        name, cc = (s.strip() for s in out[device].split(","))
        return name, cc
    except (OSError, subprocess.SubprocessError, IndexError, ValueError):
        return None


def check_engine_compat(manifest, trt_version: str, compute_capability: str) -> None:
    """Refuse engines this device cannot load: built by another TensorRT release (major.minor.patch; engines are
    "compatible only with the version of TensorRT used to build them" [compat], medc does not build version- or
    hardware-compatible engines) or for another compute capability."""
    record = manifest.tensorrt or {}
    built = record.get("built_with") or {}
    if not record.get("engines") or not built:
        raise MedcError("this bundle has no TensorRT engines yet; build them on the device with "
                        f"`medc engines BUNDLE --target {manifest.target}` (needs TensorRT there).")
    problems = []
    if version_tuple(built["tensorrt_version"], 3) != version_tuple(trt_version, 3):
        problems.append(f"TensorRT {built['tensorrt_version']} (this device has TensorRT {trt_version})")
    if built["compute_capability"] != compute_capability:
        problems.append(f"compute capability {built['compute_capability']} ({built.get('gpu', 'another GPU')}; "
                        f"this GPU is {compute_capability})")
    if not problems:
        return
    if built["compute_capability"] != compute_capability:  # another GPU: the bundle's target is not this device
        fits = [t.name for t in TARGETS.values() if t.engine == "tensorrt" and t.compute_capability == compute_capability]
        which = fits[0] if len(fits) == 1 else "T"
        fix = f"build a bundle for this GPU: `medc build MODEL --target {which}`" + (
            f" (T: {', '.join(fits)})" if len(fits) > 1 else "" if fits else
            " with a target of this compute capability (`medc targets`)")
    else:  # same GPU, another TensorRT: the bundle's ONNX and profiles still hold, only the engines are rebuilt
        fix = f"rebuild the engines here: `medc engines BUNDLE --target {manifest.target}` (the ONNX graphs are kept)"
    raise MedcError(f"the TensorRT engines in this bundle were built for {' and '.join(problems)}. TensorRT engines "
                    f"only load on the TensorRT release and GPU architecture that built them; {fix}.")


# -- the session ------------------------------------------------------------------------------------------------------
class TrtSession:
    """A TensorRT engine (`.plan`) behind OrtSession's interface. `profile` ({input: {"min", "opt", "max"}}, from
    manifest.tensorrt["profiles"]) gives clear errors for shapes outside it; `manifest` enables the
    TensorRT-version / GPU check (medc.compile.tensorrt.check_engine_compat) before the engine is deserialised;
    `component` names the manifest entry, whose specs say whether a batch larger than the profile may be split."""

    def __init__(self, path: Path, profile: dict | None = None, device: int = 0, *, manifest=None,
                 component: str | None = None):
        self.path = Path(path)
        self.profile = profile or {}
        self.device = device
        self.manifest = manifest
        self.component = component
        self.cuda: CudaRuntime | None = None
        self._engine = None
        self._lock = threading.Lock()  # one execution context: calls from server threads take turns
        # Hand the activation memory back after every run (set before the first): the vision encoder runs once per
        # image before the decoder's steps, so its scratch is never held beside the decoder's (the planner counts
        # the larger of the two). TensorRT keeps a context's memory for the context's life unless the context is
        # created USER_MANAGED and given memory per run [alloc-10].
        self.release_activations = False

    # -- lifecycle --
    def open(self) -> "TrtSession":
        if self._engine is not None:
            return self
        trt = import_tensorrt()
        self.cuda = cuda_runtime()
        self.cuda.set_device(self.device)
        gpu, cc = self.cuda.device_info(self.device)
        if self.manifest is not None:
            check_engine_compat(self.manifest, trt.__version__, cc)
        self._trt = trt
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)  # [runtime-10]
        engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())  # ICudaEngine or None [runtime-10]
        if engine is None:
            raise MedcError(f"TensorRT {trt.__version__} cannot load {self.path.name} on {gpu} (see TensorRT's message "
                            "above); rebuild the engines on this device with `medc engines BUNDLE`.")
        # Name-based I/O (TensorRT 10+; bindings were removed) [v3-10] [engine-10] [engine-11]
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self._inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self._dtypes = {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in names}  # [engine-10]
        self._context = (engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
                         if self.release_activations else engine.create_execution_context())  # [engine-10]
        self._stream = self.cuda.stream()
        self._buffers: dict[str, DeviceBuffer] = {}
        self._engine = engine
        return self

    def __enter__(self) -> "TrtSession":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._engine is None:
            return
        self.cuda.sync(self._stream)
        for buf in self._buffers.values():
            buf.free()
        self.cuda.destroy(self._stream)
        # Context before engine before runtime: each needs the one after it alive.
        self._context = None
        self._engine = None
        self._runtime = None

    @property
    def active_providers(self) -> list[str]:
        return ["TensorRT"]

    @property
    def input_names(self) -> list[str]:
        return list(self.open()._inputs)

    # -- running --
    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Host arrays in, host arrays out (every output), like OrtSession.run. A batch larger than the engine's
        profile is run in pieces when every input and output of the component is batch-first."""
        self.open()
        limit = self._max_batch()
        batch = len(next(iter(feeds.values()))) if feeds else 0
        if limit and batch > limit:
            parts = [self.execute({k: v[i:i + limit] for k, v in feeds.items()})[0] for i in range(0, batch, limit)]
            return {name: np.concatenate([p[name] for p in parts]) for name in self._outputs}
        return self.execute(feeds)[0]

    def execute(self, feeds: dict[str, np.ndarray], device_inputs: dict[str, DeviceTensor] | None = None,
                device_outputs: dict[str, DeviceBuffer] | None = None
                ) -> tuple[dict[str, np.ndarray], dict[str, DeviceTensor]]:
        """One engine call. `feeds` are host arrays (copied in); `device_inputs` are bound where they are;
        outputs named in `device_outputs` are written into those buffers (grown if needed) and returned as
        DeviceTensors, the others copied back to the host."""
        self.open()
        device_inputs, device_outputs = device_inputs or {}, device_outputs or {}
        missing = [n for n in self._inputs if n not in feeds and n not in device_inputs]
        if missing:
            raise MedcError(f"{self.path.name}: missing inputs {', '.join(missing)}.")
        ctx, cuda = self._context, self.cuda
        with self._lock:
            for name in self._inputs:
                if name in device_inputs:
                    t = device_inputs[name]
                    self._set_shape(name, t.shape)
                    ptr = t.buffer.ptr
                else:
                    arr = np.ascontiguousarray(feeds[name], dtype=self._dtypes[name])  # int64 ids stay int64 (TRT 10)
                    self._set_shape(name, arr.shape)
                    buf = self._buffer(name, arr.nbytes)
                    cuda.to_device(buf.ptr, arr, self._stream)
                    ptr = buf.ptr
                ctx.set_tensor_address(name, ptr)  # [context-10]
            shapes = {}
            for name in self._outputs:
                shape = tuple(ctx.get_tensor_shape(name))  # known once every input shape is set [context-cpp-10]
                if any(d < 0 for d in shape):
                    raise MedcError(f"{self.path.name}: output {name} has a data-dependent shape {shape}, which this "
                                    "runtime does not support.")
                nbytes = int(np.prod(shape, dtype=np.int64)) * self._dtypes[name].itemsize
                buf = device_outputs.get(name) or self._buffer(name, nbytes)
                buf.ensure(nbytes)
                ctx.set_tensor_address(name, buf.ptr)  # [context-10]
                shapes[name] = (shape, buf)
            scratch = None
            if self.release_activations:  # this run's activations only, freed after the sync below [alloc-10]
                size = int(ctx.update_device_memory_size_for_shapes())
                scratch = DeviceBuffer(cuda, size)
                ctx.set_device_memory(scratch.ptr, size)
            if not ctx.execute_async_v3(_stream_handle(self._stream)):  # [context-10] [sample]
                if scratch is not None:
                    cuda.sync(self._stream)
                    scratch.free()
                raise MedcError(f"TensorRT failed to run {self.path.name} (see TensorRT's message above).")
            host, on_device = {}, {}
            for name, (shape, buf) in shapes.items():
                if name in device_outputs:
                    on_device[name] = DeviceTensor(buf, shape, self._dtypes[name])
                else:
                    host[name] = np.empty(shape, self._dtypes[name])
                    cuda.to_host(host[name], buf.ptr, self._stream)
            cuda.sync(self._stream)  # inputs are consumed and outputs are on the host when this returns
            if scratch is not None:
                scratch.free()
        return host, on_device

    def _buffer(self, name: str, nbytes: int) -> DeviceBuffer:
        buf = self._buffers.get(name)
        if buf is None:
            buf = self._buffers[name] = DeviceBuffer(self.cuda, nbytes)
        buf.ensure(nbytes)
        return buf

    def _set_shape(self, name: str, shape: tuple[int, ...]) -> None:
        if tuple(self._context.get_tensor_shape(name)) == tuple(shape):  # unchanged: skip the re-validation
            return
        if not self._context.set_input_shape(name, tuple(int(d) for d in shape)):  # False outside the profile
            limits = self.profile.get(name) or {}
            raise MedcError(f"{self.path.name}: input {name} of shape {list(shape)} is outside the engine's "
                            f"optimisation profile (min {limits.get('min', '?')}, max {limits.get('max', '?')}). "
                            "Rebuild the bundle with a larger --context or --max-batch.")

    def _max_batch(self) -> int | None:
        """The profile's largest batch, when the component is batch-first everywhere (encoders, embeddings)."""
        if self.manifest is None or self.component not in self.manifest.components:
            return None
        comp = self.manifest.components[self.component]
        if not all(s.shape and s.shape[0] == "batch" for s in (*comp.inputs, *comp.outputs)):
            return None
        first = self.profile.get(comp.inputs[0].name)
        return int(first["max"][0]) if first else None


# -- generation with the KV cache on the device ----------------------------------------------------------------------
class TrtDecoder(ExplicitDecoder):
    """The explicit decoder on a TensorRT engine (runtime/decoder.py): a batch's KV cache stays on the GPU between
    steps. Each step's `present_*` outputs are written into spare device buffers that become the next step's
    `past_*` inputs (a pointer swap, never through host memory); the engine reads the past while it writes the
    present, so two sets alternate. Buffers go back to a pool when a batch is regrouped and grow geometrically."""

    def __init__(self, session: TrtSession, generation: dict, slots: int):
        super().__init__(session, generation, slots)
        self._pool: dict[str, list[DeviceBuffer]] = {n: [] for n in self.names}

    def _call(self, feeds: dict[str, np.ndarray], past: dict) -> tuple[np.ndarray, dict]:
        cuda = self.session.open().cuda
        on_host = {k: v for k, v in past.items() if isinstance(v, np.ndarray)}  # a regrouped batch, a prompt
        on_device = {k: v for k, v in past.items() if isinstance(v, DeviceTensor)}
        spare = {n.replace("past_", "present_", 1): self._pool[n].pop() if self._pool[n] else DeviceBuffer(cuda)
                 for n in self.names}
        host, present = self.session.execute({**feeds, **on_host}, device_inputs=on_device, device_outputs=spare)
        self._release(on_device)
        return host["logits"], {n: present[n.replace("past_", "present_", 1)] for n in self.names}

    def _host(self, value) -> np.ndarray:
        return value if isinstance(value, np.ndarray) else value.numpy(self.session)

    def _release(self, past: dict) -> None:
        for name, value in past.items():
            if isinstance(value, DeviceTensor):
                self._pool[name].append(value.buffer)

    def close(self) -> None:
        if self._batch is not None:
            self._release(self._batch[1])
            self._batch = None
        for buffers in self._pool.values():
            for buf in buffers:
                buf.free()
            buffers.clear()
