"""`medc export triton`: bundles as an NVIDIA Triton Inference Server model repository, and `--check` of one.

Per bundle:
- each encoder component (MedSigLIP's image and text encoders, MedGemma's vision encoder) becomes a model named
  `{model id}.{component}` (the names `medc serve` gives them on its V2 routes, so a Triton client works against
  either server): platform `onnxruntime_onnx` with the bundle's own ONNX file and external data, or `tensorrt_plan`
  where the bundle carries a TensorRT engine built on the device; the batch axis as `max_batch_size`, other dynamic
  axes as -1; dynamic batching; on TensorRT targets without engines, ONNX Runtime's TensorRT accelerator at the
  component's precision;
- the whole pipeline becomes a Python-backend model named `{model id}` that runs medc's runtime in-process on a copy
  of the bundle (`1/bundle/`, hashes and signature intact): MedSigLIP takes raw image bytes and texts and returns
  embeddings and zero-shot scores; MedGemma streams text (decoupled). medc.runtime.triton holds those models.

The decoder and the token embeddings get no models of their own: their KV cache and sampling live in medc's
scheduler, and medc's CPU decoder form needs ONNX Runtime 1.32, newer than any Triton release bundles (26.08 has
1.28). The Python backend runs them on the ONNX Runtime installed beside medc in Triton's Python environment.

Configs are written and checked with Triton's own protobuf schema (`model_config_pb2` from tritonclient[grpc]).
The repository is written to a temporary folder beside OUT and renamed into place when complete.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from medc.errors import MedcError
from medc.manifest import MANIFEST_NAME, RECORDS_DIR, SIGNATURE_NAME, Manifest, sha256_file
from medc.runtime.bundle import open_bundle
from medc.runtime.onnxrefs import external_locations
from medc.targets import get_target

INDEX_NAME = "medc-repository.json"  # what the repository holds, for `medc export k8s` and `--check`
VERSION = "1"
ENCODERS = ("image_encoder", "text_encoder", "vision_encoder")
PYTHON_MODELS = {"siglip": "SiglipModel", "gemma3": "GemmaModel"}  # family -> class in medc.runtime.triton

# Triton container release -> the ONNX Runtime its onnxruntime backend is built with (server repository, build.py's
# TRITON_VERSION_MAP / DEFAULT_TRITON_VERSION_MAP at each release tag).
TRITON_ORT = (("24.03", "1.17.2"), ("24.06", "1.18.0"), ("24.09", "1.19.2"), ("24.12", "1.20.1"),
              ("25.03", "1.21.0"), ("25.05", "1.22.0"), ("25.08", "1.23.0"), ("25.10", "1.23.1"),
              ("25.11", "1.23.2"), ("26.02", "1.24.1"), ("26.03", "1.24.2"), ("26.04", "1.24.4"),
              ("26.07", "1.27.0"), ("26.08", "1.28.0"))
DEFAULT_RELEASE = TRITON_ORT[-1][0]
# ONNX Runtime's compatibility table: the first release that runs each default-domain opset.
OPSET_ORT = {17: "1.13", 18: "1.14", 19: "1.16", 20: "1.17", 21: "1.18", 22: "1.21", 23: "1.23"}
# Contrib ops in medc's graphs, by the release that runs them as medc writes them.
CONTRIB_ORT = {"MatMulNBits": "1.17", "GatherBlockQuantized": "1.20", "GroupQueryAttention": "1.32"}

TRITON_TYPES = {"bool": "TYPE_BOOL", "uint8": "TYPE_UINT8", "uint16": "TYPE_UINT16", "uint32": "TYPE_UINT32",
                "uint64": "TYPE_UINT64", "int8": "TYPE_INT8", "int16": "TYPE_INT16", "int32": "TYPE_INT32",
                "int64": "TYPE_INT64", "float16": "TYPE_FP16", "float32": "TYPE_FP32", "float64": "TYPE_FP64",
                "bfloat16": "TYPE_BF16", "bytes": "TYPE_STRING"}
# The Python-backend models' interfaces (medc.runtime.triton): (name, Triton type, dims, optional).
SIGLIP_IO = ([("image", "TYPE_STRING", [-1], True), ("text", "TYPE_STRING", [-1], True)],
             [("image_embeds", "TYPE_FP32", [-1, "D"], False), ("text_embeds", "TYPE_FP32", [-1, "D"], False),
              ("scores", "TYPE_FP32", [-1, -1], False)])
GEMMA_IO = ([("text_input", "TYPE_STRING", [1], False), ("image", "TYPE_STRING", [-1], True),
             ("max_tokens", "TYPE_INT32", [1], True), ("temperature", "TYPE_FP32", [1], True),
             ("top_p", "TYPE_FP32", [1], True), ("top_k", "TYPE_INT32", [1], True), ("seed", "TYPE_INT64", [1], True),
             ("stream", "TYPE_BOOL", [1], True), ("adapter", "TYPE_STRING", [1], True)],
            [("text_output", "TYPE_STRING", [-1], False)])


def _pb2():
    try:
        from google.protobuf import json_format, text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        raise MedcError("medc export triton needs Triton's config schema: pip install 'medc[triton]' "
                        "(tritonclient[grpc]).") from None
    return model_config_pb2, text_format, json_format


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(".")[:3])


@dataclass(frozen=True)
class TritonOptions:
    kind: str | None = None  # "gpu" | "cpu"; None: the bundle's target's kind
    instances: int = 1  # instances per model (instance_group count)
    max_batch: int = 16  # max_batch_size of the encoder models
    dynamic_batching: bool = True
    queue_delay_us: int = 100  # how long Triton's dynamic batcher may hold a request for company
    release: str = DEFAULT_RELEASE  # the Triton container release the repository is written for
    # EXECUTION_ENV_PATH of the Python-backend models: a packed environment (.tar.gz, conda-pack) or a folder with
    # bin/activate, holding medc; "$$TRITON_MODEL_DIRECTORY/..." names one inside the model's folder. None: Triton's
    # own Python, with medc installed into it (the repository's Dockerfile).
    execution_env: str | None = None


@dataclass(frozen=True)
class ExportedModel:
    name: str
    bundle: str  # the model id
    component: str | None  # None: the Python-backend pipeline model
    platform: str  # onnxruntime_onnx | tensorrt_plan | openvino | python
    min_ort: str | None = None  # onnxruntime_onnx: the first ONNX Runtime release that runs the graph


# -- export ---------------------------------------------------------------------------------------------------------
def min_ort_version(path: Path) -> str:
    """The first ONNX Runtime release that runs the ONNX graph at `path` (its opset and medc's contrib ops)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    need = ["1.13"]
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            need.append(OPSET_ORT.get(imp.version, "1.32" if imp.version > max(OPSET_ORT) else "1.13"))
    need += [CONTRIB_ORT[n.op_type] for n in model.graph.node if n.domain == "com.microsoft" and n.op_type in CONTRIB_ORT]
    return max(need, key=_version)


def first_release(ort: str) -> str | None:
    """The first Triton release whose ONNX Runtime is at least `ort`; None when none is yet."""
    return next((rel for rel, have in TRITON_ORT if _version(have) >= _version(ort)), None)


def _ort_of(release: str) -> str:
    for rel, ort in TRITON_ORT:
        if rel == release:
            return ort
    raise MedcError(f"Triton release {release!r} is not one medc knows; use one of "
                    f"{', '.join(r for r, _ in TRITON_ORT)}.")


def _link(src: Path, dst: Path) -> None:
    """A hard link where the file system allows (a 4B bundle is gigabytes), else a copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _bundle_files(root: Path, manifest: Manifest) -> list[str]:
    """Every file a bundle consists of: what the manifest lists, itself, its signature and its records."""
    names = [*manifest.files, MANIFEST_NAME]
    names += [n for n in (SIGNATURE_NAME,) if (root / n).is_file()]
    records = root / RECORDS_DIR
    if records.is_dir():
        names += [f"{RECORDS_DIR}/{p.name}" for p in sorted(records.iterdir()) if p.is_file()]
    return names


def _tensor(msg, name: str, triton_type: str, dims: list[int], optional: bool = False) -> None:
    mc, _, _ = _pb2()
    t = msg.add(name=name, data_type=mc.DataType.Value(triton_type), dims=dims)
    if optional:
        t.optional = True


def _dims(shape, batched: bool) -> list[int]:
    return [d if isinstance(d, int) else -1 for d in (shape[1:] if batched else shape)]


def _instances(cfg, opts: TritonOptions, kind: str) -> None:
    mc, _, _ = _pb2()
    cfg.instance_group.add(count=opts.instances,
                           kind=mc.ModelInstanceGroup.KIND_GPU if kind == "gpu" else mc.ModelInstanceGroup.KIND_CPU)


def component_config(name: str, manifest: Manifest, component: str, opts: TritonOptions, kind: str):
    """The ModelConfig of one encoder component."""
    mc, _, _ = _pb2()
    comp = manifest.components[component]
    engines = (manifest.tensorrt or {}).get("engines") or {}
    cfg = mc.ModelConfig(name=name)
    if component in engines:
        cfg.platform, cfg.default_model_filename = "tensorrt_plan", Path(engines[component]["file"]).name
    elif comp.backend == "openvino":
        cfg.backend, cfg.default_model_filename = "openvino", Path(comp.file).name
    else:
        cfg.platform, cfg.default_model_filename = "onnxruntime_onnx", Path(comp.file).name
    specs = [*comp.inputs, *comp.outputs]
    batched = all(t.shape and t.shape[0] == "batch" for t in specs)
    cfg.max_batch_size = opts.max_batch if batched else 0
    for t in comp.inputs:
        _tensor(cfg.input, t.name, TRITON_TYPES[t.dtype], _dims(t.shape, batched))
    for t in comp.outputs:
        _tensor(cfg.output, t.name, TRITON_TYPES[t.dtype], _dims(t.shape, batched))
    if batched and opts.dynamic_batching:
        sizes = [b for b in (4, 8, 16, 32, 64) if b <= opts.max_batch] or [opts.max_batch]
        cfg.dynamic_batching.preferred_batch_size.extend(sizes)
        cfg.dynamic_batching.max_queue_delay_microseconds = opts.queue_delay_us
    _instances(cfg, opts, kind)
    target = get_target(manifest.target)
    if cfg.platform == "onnxruntime_onnx" and kind == "gpu" and target.engine == "tensorrt":
        # A TensorRT target's bundle without engines: ONNX Runtime builds one from the same graph, at the precision
        # the component was gated at (int8 graphs carry explicit Q/DQ, which TensorRT's INT8 mode consumes).
        acc = cfg.optimization.execution_accelerators.gpu_execution_accelerator.add(name="tensorrt")
        acc.parameters["precision_mode"] = {"fp32": "FP32", "int8": "INT8"}.get(comp.precision, "FP16")
        workspace = (manifest.tensorrt or {}).get("workspace_bytes")
        if workspace:
            acc.parameters["max_workspace_size_bytes"] = str(workspace)
    return cfg


def pipeline_config(name: str, manifest: Manifest, opts: TritonOptions, kind: str):
    """The ModelConfig of a bundle's Python-backend model (medc.runtime.triton)."""
    mc, _, _ = _pb2()
    family = manifest.model.get("family")
    cfg = mc.ModelConfig(name=name, backend="python", max_batch_size=0)
    inputs, outputs = SIGLIP_IO if family == "siglip" else GEMMA_IO
    dim = next(iter(manifest.components.values())).outputs[0].shape[-1]
    for n, t, dims, optional in inputs:
        _tensor(cfg.input, n, t, dims, optional)
    for n, t, dims, _ in outputs:
        _tensor(cfg.output, n, t, [dim if d == "D" else d for d in dims])
    if opts.execution_env:
        cfg.parameters["EXECUTION_ENV_PATH"].string_value = opts.execution_env
    if family == "gemma3":
        cfg.model_transaction_policy.decoupled = True
        # One scheduler per instance holds the whole model and batches its sequences continuously: add instances
        # for more memory-bound copies only; concurrency is this parameter.
        cfg.parameters["max_concurrency"].string_value = "8"
        cfg.instance_group.add(count=1, kind=mc.ModelInstanceGroup.KIND_GPU if kind == "gpu"
                               else mc.ModelInstanceGroup.KIND_CPU)
    else:
        _instances(cfg, opts, kind)
    return cfg


def _write_config(model_dir: Path, cfg) -> None:
    _, text_format, _ = _pb2()
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.pbtxt").write_text(text_format.MessageToString(cfg))


def _spec(spec: str) -> tuple[str, Path]:
    """PATH or ID=PATH, as `medc serve` takes bundles."""
    if "=" in spec and not Path(spec).exists():
        name, _, path = spec.partition("=")
        return name, Path(path)
    return "", Path(spec)


def export_repository(bundles: list[str], out: Path, opts: TritonOptions = TritonOptions(),
                      force: bool = False) -> list[ExportedModel]:
    """Write the model repository of `bundles` (PATH or ID=PATH) to `out`; returns what it holds."""
    _pb2()
    out = Path(out)
    if out.exists() and not force:
        raise MedcError(f"{out} exists; pass --force to replace it.")
    if opts.kind not in (None, "gpu", "cpu"):
        raise MedcError(f"--kind must be gpu or cpu (got {opts.kind!r}).")
    if opts.instances < 1 or opts.max_batch < 1:
        raise MedcError("--instances and --max-batch must be at least 1.")
    release_ort = _ort_of(opts.release)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    models: list[ExportedModel] = []
    kinds = set()
    try:
        for spec in bundles:
            given, path = _spec(spec)
            bundle = open_bundle(path)  # hash-verified: a repository is only as good as the bundle it copies
            m = bundle.manifest
            family = m.model.get("family")
            if family not in PYTHON_MODELS:
                raise MedcError(f"bundle {path} holds a {family!r} model; medc exports "
                                f"{', '.join(PYTHON_MODELS)} models to Triton.")
            model_id = given or m.model["name"]
            if any(x.bundle == model_id for x in models):
                raise MedcError(f"two bundles are named {model_id!r}, which would give models of the same name; "
                                "name them apart with ID=PATH.")
            kind = opts.kind or get_target(m.target).kind
            kinds.add(kind)
            for comp_name in [c for c in ENCODERS if c in m.components]:
                name = f"{model_id}.{comp_name}"
                cfg = component_config(name, m, comp_name, opts, kind)
                model_dir = tmp / name
                _write_config(model_dir, cfg)
                comp = m.components[comp_name]
                files = [comp.file]
                if cfg.platform == "tensorrt_plan":
                    files = [m.tensorrt["engines"][comp_name]["file"]]
                elif comp.backend == "openvino":
                    files += [str(Path(comp.file).with_suffix(".bin"))]
                else:
                    files += [str(Path(comp.file).parent / loc) for loc in external_locations(bundle.file(comp.file))]
                for rel in files:
                    _link(bundle.file(rel), model_dir / VERSION / Path(rel).name)
                # The fidelity record and hashes travel with the model; --check compares the files against them.
                _link(path / MANIFEST_NAME, model_dir / MANIFEST_NAME)
                ort = None
                if cfg.platform == "onnxruntime_onnx":
                    ort = min_ort_version(bundle.file(comp.file))
                    if _version(ort) > _version(release_ort):
                        first = first_release(ort)
                        raise MedcError(f"{name} needs ONNX Runtime {ort}; Triton {opts.release} has "
                                        f"{release_ort}. " + (f"Export with --release {first} or later."
                                                              if first else "No Triton release has it yet."))
                models.append(ExportedModel(name, model_id, comp_name, cfg.platform or cfg.backend, ort))
            model_dir = tmp / model_id
            _write_config(model_dir, pipeline_config(model_id, m, opts, kind))
            (model_dir / VERSION).mkdir(parents=True, exist_ok=True)
            (model_dir / VERSION / "model.py").write_text(
                f"# Written by `medc export triton`: {model_id} on Triton's Python backend (medc.runtime.triton).\n"
                f"from medc.runtime.triton import {PYTHON_MODELS[family]} as TritonPythonModel  # noqa: F401\n")
            for rel in _bundle_files(path, m):
                _link(path / rel, model_dir / VERSION / "bundle" / rel)
            models.append(ExportedModel(model_id, model_id, None, "python"))
        kind = "gpu" if "gpu" in kinds else "cpu"
        index = {"format": 1, "kind": kind, "triton_release": opts.release,
                 "image": f"medc-triton:{_medc_version()}",
                 "models": [{"name": x.name, "bundle": x.bundle, "component": x.component, "platform": x.platform,
                             "min_onnxruntime": x.min_ort} for x in models]}
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "Dockerfile").write_text(_dockerfile(opts.release, kind))
        (tmp / "README.md").write_text(_readme(models, opts, kind, release_ort))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return models


def _medc_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("medc")
    except PackageNotFoundError:
        return "0"


def _dockerfile(release: str, kind: str) -> str:
    extra = "gpu" if kind == "gpu" else "cpu"
    wheel = f"medc-{_medc_version()}-py3-none-any.whl"
    return f"""# Triton with medc in its Python environment: the Python-backend models import medc.runtime.triton.
# Build the wheel first (in medc's source tree: pip wheel --no-deps -w . .), copy it here, then:
#   docker build -t medc-triton:{_medc_version()} .
FROM nvcr.io/nvidia/tritonserver:{release}-py3
COPY {wheel} /tmp/
# medc[{extra}] brings its own ONNX Runtime (the decoder form needs 1.32+) for the Python backend; Triton's
# onnxruntime backend, which runs the encoder models, is unaffected. dicom: DICOM bytes as image inputs.
RUN pip install --no-cache-dir "/tmp/{wheel}[{extra},dicom]" && rm /tmp/{wheel}
"""


def _readme(models: list[ExportedModel], opts: TritonOptions, kind: str, release_ort: str) -> str:
    rows = "\n".join(f"| `{x.name}` | {x.platform} | {x.component or 'whole pipeline (medc runtime)'} | "
                     f"{x.min_ort or '-'} | {first_release(x.min_ort) if x.min_ort else '-'} |" for x in models)
    gpus = "--gpus all " if kind == "gpu" else ""
    return f"""# Triton model repository (written by `medc export triton`)

Written for Triton {opts.release} (its ONNX Runtime: {release_ort}); instances: {opts.instances} per model, kind
{kind.upper()}; encoder models batch up to {opts.max_batch} ({'dynamic batching' if opts.dynamic_batching else
'no dynamic batching'}).

| model | platform | runs | needs ONNX Runtime | first Triton release |
|---|---|---|---|---|
{rows}

Each model folder holds the bundle's `manifest.json` (fidelity record, hashes); the Python-backend models hold the
whole bundle in `1/bundle/`, which medc verifies when the model loads. Check the repository after copying it:
`medc export triton --check REPO`.

## The Python environment
The Python-backend models import medc, so Triton's Python needs it. The `Dockerfile` here adds it to the Triton
image (`pip install "medc[{'gpu' if kind == 'gpu' else 'cpu'},dicom]"` from medc's wheel). Alternatively pack an
environment with conda-pack (Python 3.12, as in Triton's containers) holding the same pip line, and name it in
each Python model's config (`medc export triton --execution-env PATH` writes it; a folder with `bin/activate`, such
as a venv, works too):
`parameters: {{ key: "EXECUTION_ENV_PATH", value: {{ string_value: "$$TRITON_MODEL_DIRECTORY/medc-env.tar.gz" }} }}`.
{f"These models name: `{opts.execution_env}`." if opts.execution_env else ""}

## Run and query
```bash
docker build -t medc-triton:{_medc_version()} .
docker run --rm {gpus}-p 8000:8000 -p 8001:8001 -p 8002:8002 -v $PWD:/models medc-triton:{_medc_version()} \\
    tritonserver --model-repository=/models
curl -s localhost:8000/v2/health/ready && echo ready
perf_analyzer -m {next((x.name for x in models if x.component), models[0].name)} -u localhost:8000 --concurrency-range 1:8
```
"""


# -- check ----------------------------------------------------------------------------------------------------------
ONNX_TYPES = {1: "TYPE_FP32", 2: "TYPE_UINT8", 3: "TYPE_INT8", 4: "TYPE_UINT16", 5: "TYPE_INT16", 6: "TYPE_INT32",
              7: "TYPE_INT64", 8: "TYPE_STRING", 9: "TYPE_BOOL", 10: "TYPE_FP16", 11: "TYPE_FP64", 12: "TYPE_UINT32",
              13: "TYPE_UINT64", 16: "TYPE_BF16"}
DEFAULT_FILES = {"onnxruntime_onnx": "model.onnx", "tensorrt_plan": "model.plan", "openvino": "model.xml",
                 "python": "model.py"}


def _graph_io(path: Path) -> tuple[dict, dict]:
    """{name: (Triton type, dims with -1 for dynamic)} of an ONNX graph's inputs and outputs."""
    import onnx

    g = onnx.load(str(path), load_external_data=False).graph
    inits = {i.name for i in g.initializer}

    def io(values):
        out = {}
        for v in values:
            if v.name in inits:
                continue
            t = v.type.tensor_type
            out[v.name] = (ONNX_TYPES.get(t.elem_type, f"ONNX type {t.elem_type}"),
                           [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim])
        return out

    return io(g.input), io(g.output)


def _spec_io(tensors) -> dict:
    return {t.name: (TRITON_TYPES.get(t.dtype, t.dtype), [d if isinstance(d, int) else -1 for d in t.shape])
            for t in tensors}


def _compare(model: str, cfg, declared: dict, actual: dict, what: str, where: str, problems: list,
             all_required: bool) -> None:
    """Config tensors against the graph's (or the manifest's): names, data types, ranks and fixed dims."""
    mc, _, _ = _pb2()
    batched = cfg.max_batch_size > 0
    for name, (ctype, cdims) in declared.items():
        if name not in actual:
            problems.append(f"{model}: {what} {name!r} is not in {where} (it has {', '.join(sorted(actual))}).")
            continue
        gtype, gdims = actual[name]
        if ctype != gtype:
            problems.append(f"{model}: {what} {name!r} has data_type {ctype}, but {where} says {gtype}.")
        if batched:
            if not gdims or gdims[0] != -1:
                problems.append(f"{model}: max_batch_size is {cfg.max_batch_size} but {what} {name!r} has no "
                                f"dynamic first axis in {where} (dims {gdims}); set max_batch_size: 0.")
                continue
            gdims = gdims[1:]
        if len(cdims) != len(gdims) or any(g != -1 and c != g for c, g in zip(cdims, gdims)):
            problems.append(f"{model}: {what} {name!r} has dims {cdims}, but {where} has {gdims}"
                            f"{' after the batch axis' if batched else ''}.")
    if all_required:
        missing = sorted(set(actual) - set(declared))
        if missing:
            problems.append(f"{model}: {what}s {', '.join(missing)} of {where} are missing from the config.")


def _declared(tensors) -> dict:
    mc, _, _ = _pb2()
    return {t.name: (mc.DataType.Name(t.data_type), list(t.dims)) for t in tensors}


def check_repository(repo: Path) -> list[str]:
    """Every problem found in the model repository at `repo`, each naming the model and field; empty: fine."""
    mc, text_format, _ = _pb2()
    repo = Path(repo)
    if not repo.is_dir():
        raise MedcError(f"{repo} is not a folder; give the model repository that `medc export triton` wrote.")
    problems: list[str] = []
    dirs = sorted(p.parent for p in repo.glob("*/config.pbtxt"))
    if not dirs:
        raise MedcError(f"{repo} holds no model (no */config.pbtxt); is it a Triton model repository?")
    for model_dir in dirs:
        model = model_dir.name
        cfg = mc.ModelConfig()
        try:
            text_format.Parse((model_dir / "config.pbtxt").read_text(), cfg)
        except text_format.ParseError as e:
            problems.append(f"{model}: config.pbtxt does not parse with Triton's schema: {e}")
            continue
        if cfg.name and cfg.name != model:
            problems.append(f"{model}: name is {cfg.name!r}, but Triton requires the folder's name {model!r}.")
        kind = cfg.platform or cfg.backend
        if kind not in DEFAULT_FILES:
            problems.append(f"{model}: platform/backend {kind!r} is not one medc writes "
                            f"({', '.join(DEFAULT_FILES)}).")
            continue
        version_dir = model_dir / VERSION
        file = version_dir / (cfg.default_model_filename or DEFAULT_FILES[kind])
        if kind == "python":
            file = version_dir / "model.py"
        if not file.is_file():
            problems.append(f"{model}: the model file {file.relative_to(repo)} is missing; re-export the repository.")
            continue
        db = cfg.dynamic_batching
        if cfg.HasField("dynamic_batching") and cfg.max_batch_size <= 0:
            problems.append(f"{model}: dynamic_batching needs max_batch_size > 0.")
        if any(b > cfg.max_batch_size for b in db.preferred_batch_size):
            problems.append(f"{model}: a preferred_batch_size is over max_batch_size {cfg.max_batch_size}.")
        manifest = _manifest(model_dir, problems, model)
        if kind == "onnxruntime_onnx":
            _check_onnx(model, cfg, file, manifest, problems)
        elif kind == "tensorrt_plan" and manifest is not None:
            _check_engine(model, cfg, file, manifest, problems)
        elif kind == "python":
            _check_python(model, cfg, version_dir, problems)
    return problems


def _manifest(model_dir: Path, problems: list, model: str) -> Manifest | None:
    path = model_dir / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        return Manifest.read(model_dir)
    except MedcError as e:
        problems.append(f"{model}: its {MANIFEST_NAME}: {e}")
        return None


def _component_of(model: str, manifest: Manifest):
    comp = model.rpartition(".")[2]
    return comp, manifest.components.get(comp)


def _check_onnx(model: str, cfg, file: Path, manifest: Manifest | None, problems: list) -> None:
    try:
        inputs, outputs = _graph_io(file)
    except Exception as e:  # noqa: BLE001 - a damaged file is a problem to report, not a crash
        problems.append(f"{model}: {file.name} is not a readable ONNX graph ({type(e).__name__}).")
        return
    for loc in external_locations(file):
        if not (file.parent / loc).is_file():
            problems.append(f"{model}: the external data {loc} that {file.name} names is missing from its version "
                            "folder.")
    _compare(model, cfg, _declared(cfg.input), inputs, "input", f"the ONNX graph {file.name}", problems, True)
    _compare(model, cfg, _declared(cfg.output), outputs, "output", f"the ONNX graph {file.name}", problems, False)
    if manifest is not None:
        comp, entry = _component_of(model, manifest)
        if entry is None:
            problems.append(f"{model}: its manifest has no component {comp!r}.")
            return
        rels = [entry.file, *(str(Path(entry.file).parent / loc) for loc in external_locations(file))]
        for rel in rels:
            path = file.parent / Path(rel).name
            if path.is_file() and manifest.files.get(rel) != sha256_file(path):
                problems.append(f"{model}: {path.name} differs from the bundle's (sha256 against its manifest); "
                                "re-export from the bundle.")


def _check_engine(model: str, cfg, file: Path, manifest: Manifest, problems: list) -> None:
    """An engine is opaque without TensorRT: its config is checked against the graph it was built from (the
    manifest's record of that component) and its bytes against the engine record. Triton checks the rest on load."""
    comp, entry = _component_of(model, manifest)
    if entry is None:
        problems.append(f"{model}: its manifest has no component {comp!r}.")
        return
    where = f"the manifest's {comp}"
    _compare(model, cfg, _declared(cfg.input), _spec_io(entry.inputs), "input", where, problems, True)
    _compare(model, cfg, _declared(cfg.output), _spec_io(entry.outputs), "output", where, problems, False)
    engine = ((manifest.tensorrt or {}).get("engines") or {}).get(comp)
    if engine is not None and engine.get("sha256") != sha256_file(file):
        problems.append(f"{model}: {file.name} differs from the engine the bundle recorded (sha256).")


def _check_python(model: str, cfg, version_dir: Path, problems: list) -> None:
    text = (version_dir / "model.py").read_text()
    cls = next((c for c in PYTHON_MODELS.values() if f"import {c} as TritonPythonModel" in text), None)
    if cls is None:
        return  # not one of medc's: nothing more medc can say about it
    bundle = version_dir / "bundle"
    try:
        manifest = open_bundle(bundle).manifest
    except MedcError as e:
        problems.append(f"{model}: its bundle does not verify: {e}")
        return
    family = next(f for f, c in PYTHON_MODELS.items() if c == cls)
    if manifest.model.get("family") != family:
        problems.append(f"{model}: model.py runs {cls}, but the bundle holds a {manifest.model.get('family')} model.")
        return
    inputs, outputs = SIGLIP_IO if family == "siglip" else GEMMA_IO
    dim = next(iter(manifest.components.values())).outputs[0].shape[-1]
    want_in = {n: (t, d) for n, t, d, _ in inputs}
    want_out = {n: (t, [dim if x == "D" else x for x in d]) for n, t, d, _ in outputs}
    _compare(model, cfg, _declared(cfg.input), want_in, "input", f"medc.runtime.triton.{cls}", problems, False)
    _compare(model, cfg, _declared(cfg.output), want_out, "output", f"medc.runtime.triton.{cls}", problems, False)
    required = [n for n, _, _, optional in inputs if not optional]
    declared = {t.name: t for t in cfg.input}
    for n in required:
        if n not in declared:
            problems.append(f"{model}: input {n!r}, which {cls} requires, is missing from the config.")
    if family == "gemma3" and not cfg.model_transaction_policy.decoupled:
        problems.append(f"{model}: {cls} streams its answers: model_transaction_policy {{ decoupled: true }} is "
                        "required.")
