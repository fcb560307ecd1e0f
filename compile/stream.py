"""Streamed builds: models whose fp32 weights do not fit in memory (MedGemma 4B: 4.3 B parameters, 17 GB in fp32)
are exported without weights and converted one weight at a time, and their PyTorch reference holds one module's
weights at a time. How, step by step, is the comment below the imports."""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import os
from dataclasses import dataclass, replace
from importlib import metadata
from pathlib import Path

import numpy as np

from medc.compile import export, weight_only
from medc.compile.cache import cache_dir, intact, publish
from medc.compile.hf import parameter_bytes
from medc.compile.loader import random_parameter
from medc.compile.optimize import split_for, split_skip_norms
from medc.compile.plan import BuildOptions, ResolvedModel
from medc.errors import MedcError
from medc.targets import get_target

# The normal build holds the whole fp32 model in torch, exports each graph with its weights, and hands the graphs to
# ONNX Runtime's optimiser and quantisers, which load them whole: for 4B, several copies of 17 GB. Here no step holds
# more than one fp32 weight tensor:
#
# 1. An *empty* model: the HF class with parameters that have CPU storage but no values (`torch.empty`: pages are
#    not resident until written), real buffers (rotary frequencies are computed in __init__), ties kept.
# 2. A *weight source* gives one parameter at a time by its HF name: `RandomWeights` (the values `loader.randomize_`
#    gives a whole model) or `SafetensorsWeights` (one tensor from the checkpoint, bf16 -> fp32).
# 3. Export without weights: torch.onnx traces the empty model without reading parameters (`optimize=False`: the
#    constant folder would read them). Matrices become weightless initializers, mapped to HF names by storage
#    identity; vectors (norm scales) get their values so the optimiser folds them as in the normal path; then the
#    normal path's optimiser runs (its fusions look at shapes, never at weight values).
# 4. Streamed conversion: each matrix is read from the source and written straight to the graph's external data
#    file, fp32 (transposed, as the constant folder would) or converted by the same weight-only conversion as the
#    in-memory build (compile/weight_only.py), a slice at a time.
# 5. The fp32 torch reference runs on the empty model with hooks that give a module its own parameters just before
#    its forward and drop them after: one layer's weights at a time (the 2.7 GB embedding table is the largest).
#    Reference outputs are cached under ~/.cache/medc/reference, keyed by weights, code, versions and shapes.
#
# Components that need ONNX Runtime's graph-level tools (calibrated or dynamic int8, fp16: the 0.4 B-parameter vision
# encoder) take the normal path, their weights resident only while they are exported and referenced.

log = logging.getLogger(__name__)

STREAM_FRACTION = 0.35  # stream when the fp32 parameters exceed this share of physical memory (4B: 17 GB of 24 GiB)
ALIGN = 4096  # external data offsets are page-aligned (ONNX Runtime can map them)


# -- when ---------------------------------------------------------------------------------------------------------------
def reason(model: ResolvedModel, opts: BuildOptions) -> str | None:
    """Why this build streams its weights (`--stream`, or a model too big for this machine), or None."""
    if opts.stream:
        return "forced (--stream)"
    if model.source.format == "gguf":
        return None  # GGUF files are small models, loaded whole
    need, ram = parameter_bytes(model.family, model.config), os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need <= STREAM_FRACTION * ram:
        return None
    return f"fp32 parameters {need / 2**30:.1f} GiB > {STREAM_FRACTION:.0%} of this machine's {ram / 2**30:.0f} GiB"


# -- the weight sources -------------------------------------------------------------------------------------------------
class RandomWeights:
    """`loader.random_parameter` by name: what `--random-weights` and the tiny models get in the normal path."""

    def __init__(self, seed: int):
        self.seed = seed

    def identity(self) -> str:
        rule = hashlib.sha256(inspect.getsource(random_parameter).encode()).hexdigest()[:12]
        return f"random:{self.seed}:{rule}"

    def get(self, name: str, shape):
        return random_parameter(name, shape, self.seed)


class SafetensorsWeights:
    """One tensor at a time from a checkpoint's *.safetensors files (bf16 -> fp32), under the model's parameter names.

    Keys are renamed as transformers renames them when loading (MedGemma's files say `language_model.model.…`,
    the class `model.language_model.…`). A file is mapped only while a tensor is read, so pages already read do not
    stay counted in this process's resident memory.
    """

    def __init__(self, folder: Path, model):
        from safetensors import safe_open

        self.folder = Path(folder)
        stored = {}
        for f in sorted(self.folder.glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as st:
                stored.update(dict.fromkeys(st.keys(), f))
        renamed = _parameter_names(model, list(stored))
        self.where, missing = {}, []
        for name, _ in model.named_parameters():
            if name in renamed:
                self.where[name] = (stored[renamed[name]], renamed[name])
            else:
                missing.append(name)
        if missing:
            raise MedcError(f"{self.folder} lacks {len(missing)} of the model's weights (e.g. {', '.join(missing[:3])}); "
                            "is the checkpoint complete?")

    def identity(self) -> str:
        # Name, size and modification time of each file (what make and ccache trust), not a multi-GB hash.
        files = sorted({f for f, _ in self.where.values()})
        return json.dumps([(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files])

    def get(self, name: str, shape):
        import torch
        from safetensors import safe_open

        file, key = self.where[name]
        with safe_open(str(file), framework="pt") as st:
            t = st.get_tensor(key).to(torch.float32, copy=True)
        if tuple(t.shape) != tuple(shape):
            raise MedcError(f"{file.name}: {key} has shape {tuple(t.shape)}, the model expects {tuple(shape)}.")
        return t


def _parameter_names(model, keys: list[str]) -> dict[str, str]:
    """Model parameter name -> checkpoint key, with transformers' load-time renames (5.x conversion mapping)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, rename_source_key
    except ImportError:  # an older transformers: keys as stored
        return {k: k for k in keys}
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    state = model.state_dict()  # references only: consulted for the base-model prefix
    names = {}
    for key in keys:
        name, converted = rename_source_key(key, renamings, converters, model.base_model_prefix, state)
        if converted is not None:
            raise MedcError(f"checkpoint tensor {key} needs transformers' {converted!r} conversion when loaded; "
                            "streamed builds read tensors as stored.")
        names[name] = key
    return names


def weight_source(loaded):
    if loaded.source["kind"] in ("tiny", "random"):
        return RandomWeights(loaded.spec.seed)
    if loaded.source.get("format") == "gguf" or loaded.checkpoint is None:
        raise MedcError("streamed builds read safetensors checkpoints or random weights.")
    return SafetensorsWeights(loaded.checkpoint, loaded.hf_model)


class Materializer:
    """Gives an empty model's parameters their values from the source on demand, and takes them back after."""

    def __init__(self, model, source):
        self.model, self.source = model, source
        self.params = dict(model.named_parameters())  # first name of tied parameters: the source's names
        self.name_of = {id(p): n for n, p in self.params.items()}
        self.live: set[str] = set()

    def _fill(self, params) -> list[str]:
        filled = []
        for p in params:
            name = self.name_of[id(p)]
            if name not in self.live:
                p.data = self.source.get(name, p.shape)
                self.live.add(name)
                filled.append(name)
        return filled

    def _drop(self, names) -> None:
        import torch

        for name in list(names):
            p = self.params[name]
            p.data = torch.empty(p.shape, dtype=torch.float32)  # the values go back to the allocator
            self.live.discard(name)

    @contextlib.contextmanager
    def resident(self, params):
        """All of `params` (a module's, or a list) hold their values inside the block."""
        names = self._fill(params.parameters() if hasattr(params, "parameters") else params)
        try:
            yield
        finally:
            self._drop(names)
            trim()

    @contextlib.contextmanager
    def on_demand(self):
        """Inside the block, every module with parameters of its own holds them for the time of its forward.

        Not for tracing: the exporter would run the hooks on fake tensors."""
        frames: list[list[str]] = []
        handles = []

        def pre(module, args):
            frames.append(self._fill(module.parameters(recurse=False)))

        def post(module, args, output):
            self._drop(frames.pop())

        for m in self.model.modules():
            if next(m.parameters(recurse=False), None) is not None:
                handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            for frame in frames:  # a forward that raised
                self._drop(frame)
            trim()


def trim() -> None:
    """Hand freed heap pages back to the OS. Weights of up to 32 MB come from glibc's heap (its mmap threshold rises
    to that), and it keeps what they free (benchmarks/results/design-measurements.md)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


# -- export without weights -----------------------------------------------------------------------------------------------
@dataclass
class Weightless:
    """An exported graph whose parameter initializers have no values yet: `names` maps each to its HF parameter."""

    model: object  # onnx_ir.Model
    names: dict[str, str]


def export_weightless(module, comp, example: dict[str, np.ndarray], model) -> Weightless:
    import torch

    program = export.trace(module, comp, example, optimize=False)
    graph = program.model
    by_storage = {p.untyped_storage().data_ptr(): (n, tuple(p.shape)) for n, p in model.named_parameters()}
    names = {}
    for init, value in graph.graph.initializers.items():
        raw = getattr(value.const_value, "raw", None)
        if isinstance(raw, torch.nn.Parameter) and raw.untyped_storage().data_ptr() in by_storage:
            name, shape = by_storage[raw.untyped_storage().data_ptr()]
            if tuple(raw.shape) != shape:
                raise MedcError(f"export of {comp.name}: initializer {init} is a view of {name}; cannot stream it.")
            names[init] = name
            value.const_value = None  # nothing downstream can read it by accident
    return Weightless(graph, names)


# -- optimise and convert, a weight at a time -------------------------------------------------------------------------
@dataclass(frozen=True)
class _SourceWeight:
    """A weightless initializer's values, read from the source when it is converted (weight_only.Weight)."""

    source: object
    name: str  # the HF parameter
    shape: tuple[int, ...]  # as the source stores it
    transposed: bool  # the graph reads its transpose (Linear weights: HF stores [N, K], MatMul reads [K, N])

    def read(self) -> np.ndarray:
        w = self.source.get(self.name, self.shape).numpy()
        return w.T if self.transposed else w


def write_component(wl: Weightless, source, dst: Path, optimizer: str, method: str,
                    config: weight_only.WeightOnlyConfig | None, split: bool = False) -> tuple[dict, dict]:
    """Optimise the weightless graph as the in-memory path would (split: CPU targets' unfused residual-add norms,
    optimize.split_for), then write `dst` (+ `dst.data`) reading one weight at a time: converted by `config` for
    `method` "weight-only", fp32 otherwise. Returns (quantization record, optimisation record) for the manifest."""
    import onnx
    import onnx_ir as ir

    model, names = wl.model.clone(), dict(wl.names)  # the weightless graph serves several methods
    graph = model.graph
    for init, name in list(names.items()):  # vectors: values now, so the optimiser folds them (1 + norm weight)
        value = graph.initializers[init]
        if len(value.shape) < 2:
            value.const_value = ir.Tensor(source.get(name, tuple(int(d) for d in value.shape)).numpy(), name=init)
            del names[init]
    before = graph.num_nodes()
    fused = _optimise(model, optimizer, split)
    weights = {}
    for init, (name, transposed) in _fold_transposes(graph, names).items():
        shape = tuple(int(d) for d in graph.initializers[init].shape)
        weights[init] = _SourceWeight(source, name, shape[::-1] if transposed else shape, transposed)
    ops = {}
    for node in graph:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    optimizations = {"optimizer": optimizer, "fused": fused, "nodes_before": before, "nodes_after": graph.num_nodes(),
                     "ops_after": dict(sorted(ops.items())), "streamed": True}

    dst.parent.mkdir(parents=True, exist_ok=True)
    with _DataFile(dst) as data:
        record = weight_only.quantize_weights(model, weights, config if method == "weight-only" else None, data)
        record["streamed"] = "weights read one at a time from the source and written as converted (compile/stream.py)"
        for value in graph.initializers.values():  # constants the optimisers made
            t = value.const_value
            if t is not None and not isinstance(t, ir.ExternalTensor) and t.nbytes > 1 << 20:
                value.const_value = data.add(value.name, [t.numpy()], t.dtype, t.shape)
    onnx.save(ir.serde.serialize_model(model), str(dst))
    return record, optimizations


def _optimise(model, optimizer: str, split: bool = False) -> dict[str, int]:
    """What export(optimize=True) then optimize.OPTIMIZERS[optimizer] do, on a graph without weight values."""
    import onnxscript.optimizer

    quiet = [logging.getLogger(n) for n in ("onnx_ir", "onnxscript")]
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.ERROR)  # "skipped deduplication of initializer …: no constant value" for every weight
    try:
        onnxscript.optimizer.optimize_ir(model)
        if optimizer == "none":
            return {}
        if optimizer != "xformers":
            raise MedcError(f"optimizer {optimizer!r} needs the weights in memory; streamed components use xformers "
                            "or none.")
        from onnxscript.rewriter.ort_fusions._core import fuse_xformers

        _, counts = fuse_xformers(model)
        if split:
            counts["skip_norms_split"] = split_skip_norms(model)
        onnxscript.optimizer.optimize(model, input_size_limit=1 << 40, output_size_limit=1 << 40)
        return {k: int(v) for k, v in counts.items() if v}
    finally:
        for q, level in zip(quiet, levels):
            q.setLevel(level)


def _fold_transposes(graph, names: dict[str, str]) -> dict[str, tuple[str, bool]]:
    """Transpose(W) -> a weightless initializer W.T (what constant folding does in the in-memory path).
    Returns initializer -> (HF name, transposed)."""
    import onnx_ir as ir

    out = {init: (name, False) for init, name in names.items()}
    for node in list(graph):
        w = node.inputs[0] if node.op_type == "Transpose" and node.domain == "" and node.inputs else None
        if w is None or w.name not in names or len(w.shape) != 2 or node.outputs[0].is_graph_output():
            continue
        perm = node.attributes.get("perm")
        if perm is not None and list(perm.as_ints()) != [1, 0]:
            continue
        wt = ir.Value(name=f"{w.name}.T", shape=ir.Shape([w.shape[1], w.shape[0]]), type=w.type,
                      const_value=ir.Tensor(np.zeros(0, np.float32)))  # registration wants a value...
        graph.register_initializer(wt)
        wt.const_value = None  # ...and this one has none until the source gives it
        node.outputs[0].replace_all_uses_with(wt)
        graph.remove(node, safe=True)
        out[wt.name] = (names[w.name], True)
        if not w.uses():
            graph.initializers.pop(w.name)
            out.pop(w.name)
    return out


class _DataFile:
    """The streamed build's weight_only.Sink: appends tensors to `<graph>.data` as they are converted, each an
    ExternalTensor pointing into it."""

    def __init__(self, graph_path: Path):
        self.path = graph_path.with_name(graph_path.name + ".data")

    def __enter__(self):
        self.file = open(self.path, "wb")
        return self

    def __exit__(self, *exc):
        self.file.close()

    def add(self, name: str, chunks, dtype, shape):
        """`chunks`: arrays whose bytes, in order, are the tensor's (a generator is consumed as it is written)."""
        import onnx_ir as ir

        shape = ir.Shape([int(d) for d in shape])
        if (int(np.prod(shape.numpy())) * dtype.bitwidth) // 8 >= ALIGN:  # big ones page-aligned, small ones packed
            self.file.write(b"\0" * (-self.file.tell() % ALIGN))
        offset = self.file.tell()
        for c in chunks:
            self.file.write(memoryview(np.ascontiguousarray(c)).cast("B"))
        return ir.ExternalTensor(self.path.name, offset, self.file.tell() - offset, dtype, shape=shape, name=name,
                                 base_dir=str(self.path.parent))

    def keep(self, value, weight) -> None:
        import onnx_ir as ir

        value.const_value = self.add(value.name, weight_only.row_chunks(weight.read()), ir.DataType.FLOAT,
                                     value.shape)


def install(path: Path, dst: Path) -> None:
    """Move a streamed graph and its data file into the bundle (written under the bundle's file name already)."""
    if path.name != dst.name:
        raise MedcError(f"internal: streamed graph {path.name} written under another name than {dst.name}")
    os.replace(path, dst)
    data = path.with_name(path.name + ".data")
    if data.exists():
        os.replace(data, dst.with_name(dst.name + ".data"))


# -- the streamed part of `medc build` -------------------------------------------------------------------------------------
class StreamedBuild:
    """Phase 1 of build.py for a model loaded empty: weightless export of streamable components, the normal export
    (weights resident meanwhile) for the others, and every component's torch reference with bounded memory."""

    def __init__(self, loaded, why: str):
        self.loaded, self.why = loaded, why
        self.source = weight_source(loaded)
        self.weights = Materializer(loaded.hf_model, self.source)

    @staticmethod
    def streams(cp, comp) -> bool:
        """Decoders and embeddings at fp32 or weight-only: conversions that need no graph-level tool."""
        return not comp.static_int8 and set(cp.methods) <= {"weight-only"}

    def prepare(self, cp, comp, opts, work: Path, golden: dict, step) -> export.Prepared:
        loaded = self.loaded
        module = comp.extract(loaded.hf_model)
        example = comp.dummy_inputs(loaded, 2, np.random.default_rng(loaded.spec.seed))
        raw, produce, calibration = work / f"{cp.name}.raw.onnx", None, None
        with contextlib.ExitStack() as resident:
            weightless = None
            if self.streams(cp, comp):
                step(f"{cp.name}: export without weights (streamed)")
                weightless = export_weightless(module, comp, example, loaded.hf_model)
            else:  # small enough for the normal path: its weights are resident until its reference is done
                step(f"{cp.name}: export")
                resident.enter_context(self.weights.resident(module))
                export.export_component(module, comp, example, raw)
            step(f"{cp.name}: reference outputs (bounded memory)")
            ref_cases = self.reference(comp, comp.reference_module(loaded.hf_model))
            if "int8-static-qdq" in cp.methods:
                step(f"{cp.name}: calibration data")
                calibration = comp.calibration(loaded, opts.calibration)
        if weightless is not None:
            produce = _Producer(weightless, self.source, cp, opts.optimizer, split_for(get_target(opts.target)),
                                [case["in"] for case in ref_cases.values()])
        export.add_golden(golden, cp.name, ref_cases)
        return export.Prepared(raw, example, ref_cases, calibration, produce)

    def reference(self, comp, module) -> dict:
        """{case: {"in": feeds, "ref": outputs}} from torch fp32, one module's weights at a time; cached."""
        import torch

        cache = self._cache(comp)
        if cache is not None and intact(cache.parent):
            with np.load(cache, allow_pickle=False) as z:
                cases: dict = {}
                for key in z.files:
                    case, kind, name = key.split("/", 2)
                    cases.setdefault(case, {"in": {}, "ref": {}})[kind][name] = z[key]
            log.info("%s: reference outputs from %s", comp.name, cache)
            return cases
        cases = {}
        with self.weights.on_demand(), torch.no_grad():
            for case, feeds in comp.golden_inputs(self.loaded).items():
                cases[case] = {"in": feeds, "ref": comp.reference(module(*export.module_args(module, comp, feeds)))}
        if cache is not None:
            tmp = cache.parent.with_name(f"{cache.parent.name}.tmp{os.getpid()}")
            tmp.mkdir(parents=True, exist_ok=True)
            np.savez(tmp / cache.name,
                     **{f"{c}/{k}/{n}": a for c, v in cases.items() for k in ("in", "ref") for n, a in v[k].items()})
            publish(tmp, cache.parent)
        return cases

    def _cache(self, comp) -> Path | None:
        """~/.cache/medc/reference/KEY/reference.npz: a pure function of the weights, the config, the golden-input code and
        data, the component's I/O and the torch/transformers versions. Tiny models are not cached (seconds)."""
        loaded = self.loaded
        if loaded.spec.tiny:
            return None
        h = hashlib.sha256(json.dumps({
            "model": loaded.spec.name, "component": comp.name, "weights": self.source.identity(),
            "config": loaded.config.to_dict(), "io": [t.to_json() for t in (*comp.inputs, *comp.outputs)],
            "variant": comp.variant, "preprocessor": loaded.preprocessor_config, "pad_to_square": loaded.pad_to_square,
            "chat_template": loaded.chat_template, "special_ids": loaded.special_ids,
            "versions": [metadata.version(p) for p in ("torch", "transformers", "numpy")],
        }, sort_keys=True, default=str).encode())
        for f in sorted({inspect.getsourcefile(comp.golden_inputs),
                         inspect.getsourcefile(comp.reference_extract or comp.extract),
                         str(loaded.tokenizer_file)}):
            h.update(Path(f).read_bytes())
        return cache_dir() / "reference" / f"{loaded.spec.name}-{comp.name}-{h.hexdigest()[:24]}" / "reference.npz"

    def on_demand(self):
        return self.weights.on_demand()

    def extras(self):
        """The family's extras read the root model's own parameters directly (SigLIP's logit scale and bias)."""
        with self.weights.resident(list(self.loaded.hf_model.parameters(recurse=False))):
            return self.loaded.family.extras(self.loaded.hf_model)


class _Producer:
    """export.Prepared.produce for a streamed component: (method, work) -> (graph path, quantization, optimizations).
    A weight-only decoder with fp16 activations (GPU targets' W4A16 / W8A16) is written quantised with fp32
    activations, then converted to fp16 with its islands measured on `feeds` (weight_only.halve_quantized)."""

    def __init__(self, weightless: Weightless, source, cp, optimizer: str, split: bool, feeds: list):
        self.weightless, self.source, self.cp, self.optimizer, self.split = weightless, source, cp, optimizer, split
        self.feeds = feeds

    def __call__(self, method: str, work: Path):
        dst = work / f"stream-{self.cp.name}-{method}" / self.cp.file
        optimizer = self.cp.optimizer or self.optimizer
        config = self.cp.weight_only
        half = method == "weight-only" and config is not None and config.activations == "float16"
        written = dst.with_name(f"{dst.stem}.fp32-activations{dst.suffix}") if half else dst
        record, optimizations = write_component(
            self.weightless, self.source, written, optimizer, method,
            replace(config, activations="float32") if half else config, self.split)
        if half:
            try:
                record.update(weight_only.halve_quantized(written, dst, config, self.feeds))
            finally:
                for leftover in (written, written.with_name(f"{written.name}.data")):
                    leftover.unlink(missing_ok=True)
        return dst, record, optimizations
