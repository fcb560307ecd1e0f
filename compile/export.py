"""The torch phase of a build: PyTorch -> ONNX with the dynamo exporter (dynamic axes named as in the component
spec, exports cached by identity), and the fp32 reference outputs on the held-out golden inputs (`prepare`)."""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import math
import os
import shutil
import warnings
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable

import numpy as np

from medc.compile.cache import cache_dir, intact, publish
from medc.compile.spec import ComponentSpec
from medc.errors import MedcError
from medc.runtime.verify import golden_key

log = logging.getLogger(__name__)

OPSET = 20  # Gelu and LayerNormalization as standard ops; TensorRT 10 parses opset <= 20 (issue: TensorRT stage)
# Graphs whose weights exceed this are saved with external data (protobuf cannot hold 2 GiB in one file).
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
# Axes that may be empty at run time (the decoder's image rows on text and decode steps). Every other dynamic axis is
# at least 1; an axis whose minimum is 1 would let the exporter decide `rows > 0` statically and drop the If.
EMPTY_AXES = {"image_rows"}


def export_component(module, comp: ComponentSpec, example: dict[str, np.ndarray], path: Path):
    """Export `module` to `path`."""
    save_onnx(trace(module, comp, example).model_proto, path)


def trace(module, comp: ComponentSpec, example: dict[str, np.ndarray], optimize: bool = True):
    """The torch.onnx ONNXProgram of `module` (its `.model` is the onnx_ir graph, weights not yet serialised).
    `optimize=False` leaves the weights unread (no constant folding): streamed builds (stream.py) rely on it."""
    import torch

    dims: dict = {}

    def shape_of(t):
        axes = {}
        for i, d in t.dynamic_axes().items():
            dims.setdefault(d, torch.export.Dim(d, min=0 if d in EMPTY_AXES else 1, max=1 << 20))
            axes[i] = dims[d]
        return axes

    # Positional, matching forward(): components with a variable number of inputs (a decoder's past key/values)
    # take the first `fixed_inputs` one by one and the rest as one tuple.
    shapes = [shape_of(t) for t in comp.inputs]
    fixed = getattr(module, "fixed_inputs", None)
    if fixed is not None:
        shapes = [*shapes[:fixed], tuple(shapes[fixed:])]
    # The exporter logs missing torchvision ops and op-by-op progress at WARNING; none of it is actionable here.
    for name in ("torch.onnx", "torch.onnx._internal.exporter._registration", "onnxscript"):
        logging.getLogger(name).setLevel(logging.ERROR)
    args = module_args(module, comp, example)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                module, tuple(args), dynamo=True, opset_version=OPSET, optimize=optimize, verbose=False,
                input_names=[t.name for t in comp.inputs], output_names=[t.name for t in comp.outputs],
                dynamic_shapes=tuple(shapes), report=False,
            )
        except Exception as e:  # noqa: BLE001 - the exporter raises many types
            raise MedcError(f"export of {comp.name} failed: {str(e).splitlines()[0][:400]}") from None
    return program


def cache_key(loaded, comp: ComponentSpec) -> str | None:
    """Identity of an export: same weights, same component code, same exporter -> same graph. Tiny built-in models
    are keyed by their config and seed (their weights are a function of both and of loader.py): even a 4-layer
    decoder takes tens of seconds to trace, and the tests build the same tiny components many times. None for
    full-size random weights (gigabytes each, built for one-off memory and speed runs)."""
    source = loaded.source
    code = [Path(__file__), Path(inspect.getsourcefile(comp.extract))]
    if source.get("kind") == "checkpoint":
        weights = source.get("sha256") or _fingerprint(Path(source["path"]))
    elif source.get("kind") == "tiny":
        spec = loaded.spec
        weights = {"tiny": spec.name, "seed": source.get("seed"), "config": spec.config,
                   "pad_to_square": loaded.pad_to_square}
        code.append(Path(inspect.getsourcefile(type(loaded))))  # the loader's random_parameter makes the weights
    else:
        return None
    h = hashlib.sha256(json.dumps({
        "weights": weights, "adapters": source.get("adapters"), "component": comp.name, "opset": OPSET,
        "io": [t.to_json() for t in (*comp.inputs, *comp.outputs)], "variant": comp.variant,
        "versions": [metadata.version(p) for p in ("torch", "transformers", "onnxscript", "onnx")],
    }, sort_keys=True).encode())
    for f in code:
        h.update(f.read_bytes())
    return h.hexdigest()[:32]


def _fingerprint(path: Path) -> list:
    """Name, size and modification time of each weights file (what make and ccache trust), not a multi-GB hash."""
    return [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(path.glob("*.safetensors"))]


def export_cached(module, comp: ComponentSpec, example: dict[str, np.ndarray], path: Path, key: str | None) -> bool:
    """`export_component`, reusing ~/.cache/medc/exports/KEY when a previous build exported the same thing (a
    build of another precision from the same checkpoint skips the minute-long export). True on a cache hit."""
    hit, _ = cached(key, path, lambda: export_component(module, comp, example, path))
    return hit


def cached(key: str | None, path: Path, make) -> tuple[bool, dict | None]:
    """Run `make()`, which writes the graph `path` (and `path.data`) and returns a JSON record or None, unless
    ~/.cache/medc/exports/KEY holds its result from an earlier build: then link or copy that in. KEY None: no
    caching. Returns (cache hit, the record)."""
    if key is None:
        return False, make()
    cache = cache_dir() / "exports" / key
    # Files keep the exported names: a graph with external data refers to its .data file by name.
    names = [path.name, path.name + ".data"]
    if intact(cache) and (cache / names[0]).is_file():
        for n in names:
            if (cache / n).is_file():
                _link_or_copy(cache / n, path.with_name(n))
        record = cache / "record.json"
        return True, json.loads(record.read_text()) if record.is_file() else None
    record = make()
    tmp = cache.with_name(f"{cache.name}.tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    for n in names:
        if path.with_name(n).is_file():
            shutil.copyfile(path.with_name(n), tmp / n)
    if record is not None:
        (tmp / "record.json").write_text(json.dumps(record))
    publish(tmp, cache)
    return False, record


def _link_or_copy(src: Path, dst: Path) -> None:
    """A hard link where the cache and the build share a file system (copying a GB-sized export is most of a warm
    build), else a copy. Safe because nothing writes a graph in place: `save_onnx` unlinks its target first."""
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def module_args(module, comp: ComponentSpec, feeds: dict[str, np.ndarray]) -> list:
    """numpy feeds -> the positional torch arguments of the component's module (see `fixed_inputs`)."""
    import torch

    args = [torch.from_numpy(np.require(feeds[t.name], requirements="C")) for t in comp.inputs]
    fixed = getattr(module, "fixed_inputs", None)
    return args if fixed is None else [*args[:fixed], tuple(args[fixed:])]


def save_onnx(model, path: Path, external: bool = False, data_name: str | None = None) -> None:
    """Save with weights inline, or in a data file beside it (`data_name`, default `<name>.data`) when too large for
    one protobuf or `external`."""
    import onnx

    path = Path(path)
    data_name = data_name or path.name + ".data"
    for stale in (path, path.with_name(data_name)):
        stale.unlink(missing_ok=True)
    size = sum(map(_tensor_bytes, model.graph.initializer))
    if external or size > EXTERNAL_DATA_THRESHOLD:
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=data_name, size_threshold=1024)
        if path.with_name(data_name).exists():  # onnx creates it owner-only; a bundle is copied and read by others
            os.chmod(path.with_name(data_name), 0o644)
    else:
        onnx.save(model, str(path))


def _tensor_bytes(t) -> int:
    """A tensor's data size from its shape and type. `ByteSize()` gives the same number but serialises the tensor to
    count it, seconds of a build for a whole decoder."""
    import onnx

    if t.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        return t.ByteSize()
    n = math.prod(t.dims)
    if t.data_type in (onnx.TensorProto.UINT4, onnx.TensorProto.INT4, onnx.TensorProto.FLOAT4E2M1):
        return (n + 1) // 2  # two values per byte
    return n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


# -- the torch phase of one component -------------------------------------------------------------------------------
@dataclass
class Prepared:
    """A component after the torch phase: its raw ONNX export, reference outputs and calibration data."""

    raw: Path
    example: dict[str, np.ndarray]
    ref_cases: dict  # {case: {"in": feeds, "ref": outputs}}
    calibration: tuple | None
    # Streamed components (compile/stream.py): (method, work) -> (graph, quantization record, optimisations),
    # optimised and converted while the weights are read; None: optimise + convert the raw export.
    produce: Callable | None = None
    export_key: str | None = None  # the raw export's cache key: its optimised forms are cached under it too
    calibration_ood: list | None = None  # OpenVINO int8: random inputs added to the calibration (compile/openvino.py)


def add_golden(golden: dict, component: str, ref_cases: dict) -> None:
    """A component's held-out inputs and reference outputs into the bundle's golden arrays."""
    for case, arrays in ref_cases.items():
        for kind in ("in", "ref"):
            for name, arr in arrays[kind].items():
                golden[golden_key(component, case, kind, name)] = arr


def reference_cases(comp: ComponentSpec, loaded) -> dict:
    """The torch reference on the component's golden inputs: {case: {"in": feeds, "ref": outputs}}."""
    import torch

    ref_cases, ref_module = {}, comp.reference_module(loaded.hf_model)
    with torch.no_grad():
        for case, feeds in comp.golden_inputs(loaded).items():
            ref_cases[case] = {"in": feeds, "ref": comp.reference(ref_module(*module_args(ref_module, comp, feeds)))}
    return ref_cases


def prepare(cp, comp: ComponentSpec, loaded, calibration_dir: Path | None, work: Path, golden: dict,
            step, ref_cases: dict | None = None) -> Prepared:
    """The in-memory path: export `comp` (cached), run the torch reference on its golden inputs (unless given:
    a model with adapters is referenced before they are merged), and collect the calibration data its conversion
    candidates need."""
    module = comp.extract(loaded.hf_model)
    example = comp.dummy_inputs(loaded, 2, np.random.default_rng(loaded.spec.seed))
    step(f"{cp.name}: export")
    raw, key = work / f"{cp.name}.raw.onnx", cache_key(loaded, comp)
    if export_cached(module, comp, example, raw, key):
        log.info("%s: export reused from ~/.cache/medc/exports", cp.name)
    if ref_cases is None:
        step(f"{cp.name}: reference outputs")
        ref_cases = reference_cases(comp, loaded)
    add_golden(golden, cp.name, ref_cases)
    calibration = None
    if {"int8-static-qdq", "ov-int8", "ov-int8-sq"} & set(cp.methods):  # the methods that calibrate ranges
        step(f"{cp.name}: calibration data")
        calibration = comp.calibration(loaded, calibration_dir)
    ood = None
    if {"ov-int8", "ov-int8-sq"} & set(cp.methods):
        # Two random inputs (noise images, random token ids) beside the real ones: NNCF's static activation ranges
        # then also cover inputs unlike the calibration set, which the gate checks (its random case)
        rng = np.random.default_rng(20261206)
        ood = [comp.dummy_inputs(loaded, 1, rng) for _ in range(2)]
    return Prepared(raw, example, ref_cases, calibration, export_key=key, calibration_ood=ood)
