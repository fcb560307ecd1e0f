"""`medc build`: plan, export, optimise, quantise, gate, and write the bundle atomically.

The build is a plan of named stages (printed by `--dry-run`) run in order. Everything is written to a temporary
directory beside OUT and renamed into place only when every stage passed, so a failed or interrupted build never
leaves a half bundle at OUT.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from medc.errors import FidelityError, MedcError
from medc.manifest import ComponentEntry, Manifest, hash_files
from medc.system import peak_rss_mib, toolchain_versions

log = logging.getLogger(__name__)


@dataclass
class BuildOptions:
    model: str
    out: Path
    precision: str = "fp32"  # a preset (compile/recipes.py) or per component: "image_encoder=int8,text_encoder=fp32"
    target: str = "cpu"
    recipe: Path | None = None  # a recipe file (JSON/TOML); replaces --precision
    flavour: str | None = None  # decoder graph form, "ort" | "portable"; None: the target's
    calibration: Path | None = None
    random_weights: bool = False
    allow_degraded: bool = False
    force: bool = False
    pad_to_square: bool = False
    optimizer: str = "xformers"
    timing_runs: int = 3  # runs per candidate when choosing the faster int8 method
    stream: bool = False  # force the streamed path (compile/stream.py); otherwise chosen by model size
    # What the bundle must serve (the planner's memory check; TensorRT optimisation profiles): tokens of context
    # (None: 4096, or the model's limit if smaller) and the largest batch.
    context: int | None = None
    max_batch: int = 1


@dataclass
class ComponentPlan:
    name: str
    precision: str
    methods: list[str]  # candidate conversions after export+optimise; several = measure and keep the fastest passing
    file: str
    options: dict = field(default_factory=dict)  # passed to the conversion (weight-only: lm_head precision, format)
    optimizer: str | None = None  # None: the build's --optimizer

    def stages(self) -> list[str]:
        conv = " | ".join(self.methods) if self.methods else "none (fp32)"
        if self.methods and "lm_head" in self.options:
            conv += f" (lm_head {self.options['lm_head']}, {self.options.get('format', 'nbits')})"
        opt = "standard ONNX ops only (portable)" if self.optimizer == "none" else "transformer fusions"
        return ["export (torch.onnx dynamo, dynamic batch)", f"optimise ({opt})",
                f"convert: {conv}", "fidelity gate vs PyTorch fp32 on held-out inputs"]


@dataclass
class Plan:
    model: str
    target: str
    out: Path
    components: list[ComponentPlan]
    source: str
    notes: list[str] = field(default_factory=list)
    recipe: dict = field(default_factory=dict)
    family: str = ""
    config: dict = field(default_factory=dict)  # the HF config as a dict (the planner's input)
    # Settings baked into the graphs (Family.components / load_assets): a decoder's attention form and context.
    graph: dict = field(default_factory=dict)

    def render(self) -> str:
        lines = [f"medc build plan: {self.model} ({self.source}) -> {self.out}  [target {self.target}]"]
        if self.recipe:
            lines.append(f"  recipe ({self.recipe['source']}): "
                         + ", ".join(f"{k}={v}" for k, v in self.recipe["precisions"].items()))
        for c in self.components:
            lines.append(f"  {c.name}: {c.precision} -> {c.file}")
            lines += [f"    {i}. {s}" for i, s in enumerate(c.stages(), 1)]
        lines += ["  bundle: tokenizer, preprocessor config, golden.npz (held-out inputs + reference outputs), "
                  "manifest.json (sha256 of every file)", "  write: temp dir beside OUT, renamed into place on success"]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _methods(precision: str, target, comp) -> list[str]:
    if precision in ("fp32", "bf16", "fp8"):  # bf16/fp8: planned only (recipes.PLAN_ONLY), refused by build()
        return []
    if precision == "fp16":
        return ["fp16"]
    if not comp.static_int8:  # decoders: outliers, masks and prefill/decode shapes break activation ranges
        return ["weight-only"]
    return ["int8-static-qdq", "int8-dynamic"] if target.int8_method == "fastest" else ["int8-static-qdq"]


FLAVOURS = ("ort", "portable")


def make_plan(opts: BuildOptions, spec, hf_config) -> Plan:
    from medc.compile import recipes
    from medc.targets import get_target

    target = get_target(opts.target)
    flavour = opts.flavour or target.graph_flavour
    if flavour not in FLAVOURS:
        raise MedcError(f"unknown graph flavour {flavour!r}; choose one of {', '.join(FLAVOURS)}.")
    comps = spec.family.components(hf_config)
    recipe = recipes.resolve(opts.precision, opts.recipe, comps, target)
    graph = _graph_settings(comps, recipe, flavour, target, opts, hf_config)
    if graph:
        comps = spec.family.components(hf_config, **graph)
    plans, notes = [], list(recipe.notes)
    for c in comps:
        p = recipe.precisions[c.name]
        options = {}
        if c.parts:  # weight-only conversion of a decoder: its lm_head's precision and the weight format
            options = {"precision": p, **{part: recipe.precisions[part] for part in c.parts},
                       "format": "qdq" if flavour == "portable" else "nbits", **recipe.options}
            if graph.get("attention") == "gqa" and recipe.precisions.get("lm_head") == "int4":
                options["rescore"] = int(recipe.options.get("lm_head_rescore", DEFAULT_RESCORE))
        methods = _methods(p, target, c)
        if c.parts and not methods and any(recipe.precisions[part] != "fp32" for part in c.parts):
            methods = ["weight-only"]  # an fp32 decoder with a quantised lm_head
        # Standard ONNX ops only for TensorRT (its parser has no importer for ORT's fused contrib ops) and for the
        # portable decoder; the streamed path reads this too.
        optimizer = "none" if (flavour == "portable" and c.parts) or target.engine == "tensorrt" else None
        plans.append(ComponentPlan(c.name, p, methods, f"{c.name}.onnx", options, optimizer))
    source = "tiny random" if spec.tiny else ("random weights" if opts.random_weights else "checkpoint")
    if source != "checkpoint":
        notes.append("random weights: the bundle is marked NOT FOR CLINICAL USE")
    if graph.get("attention") == "gqa":
        notes.append(f"decoder: GroupQueryAttention with in-place KV slots, context {graph['context']} tokens")
    return Plan(spec.name, target.name, Path(opts.out), plans, source, notes, {**recipe.to_json(), "flavour": flavour},
                spec.family.name, spec.config, graph)


def _graph_settings(comps, recipe, flavour: str, target, opts, hf_config) -> dict:
    """A decoder's attention form: ONNX Runtime's GroupQueryAttention (KV updated in place) for the ORT flavour on
    CPU targets, the explicit form (standard ops) for TensorRT, the portable flavour, and fp16 (whose fp32
    islands medc.compile.fp16 places in explicit graphs; CUDA's GroupQueryAttention would compute in fp16)."""
    decoder = next((c for c in comps if c.parts), None)
    if decoder is None:
        return {}
    from medc.compile.models.gemma3 import default_context

    attention = attention_form(flavour, target, recipe.precisions[decoder.name])
    return {"attention": attention, "context": opts.context or default_context(hf_config)}


DEFAULT_RESCORE = 1024  # an int4 lm_head's logits recomputed from int8 rows (quantize.add_rescoring)


def attention_form(flavour: str, target, decoder_precision: str) -> str:
    """"gqa" or "explicit" (see `_graph_settings`); the planner sizes the KV cache by it. The GQA slot form is for
    CPU targets only: it reads GroupQueryAttention's query_seqlens input (onnxruntime >= 1.32), which the newest
    onnxruntime-gpu (1.31.1) rejects as an invalid graph, and CUDA's GroupQueryAttention kernels take fp16/bf16 only
    (both seen on an H200, benchmarks/cuda_check.py)."""
    gqa = flavour == "ort" and target.kind == "cpu" and decoder_precision != "fp16"
    return "gqa" if gqa else "explicit"


def plan_only(opts: BuildOptions) -> Plan:
    """The plan without loading weights (for --dry-run): reads the registry or the checkpoint's config.json."""
    import json

    from medc.compile.registry import MODELS, family_for_model_type
    from medc.compile.spec import ModelSpec

    if opts.model in MODELS:
        spec = MODELS[opts.model]
        config = spec.config
    elif opts.model.endswith(".gguf") and Path(opts.model).is_file():
        from medc.compile.loader import gguf_config

        model_path = Path(opts.model)
        config = gguf_config(model_path)
        spec = ModelSpec(name=model_path.stem, family=family_for_model_type("gemma3_text"), description="",
                         config=config, preprocessor={})
    else:
        cfg = Path(opts.model) / "config.json"
        if not cfg.is_file():
            raise MedcError(f"unknown model {opts.model!r}: not a registered model ({', '.join(sorted(MODELS))}) "
                            "and not a checkpoint directory with config.json.")
        config = json.loads(cfg.read_text())
        family = family_for_model_type(config.get("model_type"))
        if family is None:
            raise MedcError(f"{opts.model} holds a {config.get('model_type')!r} model, which medc cannot build.")
        spec = ModelSpec(name=Path(opts.model).name, family=family, description="", config=config, preprocessor={})
    from medc.compile.loader import _config_from_dict

    return make_plan(opts, spec, _config_from_dict(spec.family, config))


# -- the build ------------------------------------------------------------------------------------------------------
def build(opts: BuildOptions, progress=None) -> Manifest:
    from medc.compile import loader, stream
    from medc.targets import get_target

    t0 = time.perf_counter()
    out = Path(opts.out)
    _check_out(out, opts.force)
    if opts.calibration is not None:
        _check_calibration(Path(opts.calibration))
    from medc.compile import planner, recipes

    checked = plan_only(opts)  # validate precision/target before spending minutes loading weights
    unbuilt = sorted({p for p in checked.recipe["precisions"].values() if p in recipes.PLAN_ONLY})
    if unbuilt:
        raise MedcError(f"{', '.join(unbuilt)} builds are not supported by this medc version (`medc plan` sizes "
                        "them); build --precision fp16 (Gemma 3's overflow-prone parts stay fp32), int8 or int4.")
    int4_decoders = [c.name for c in checked.components if c.precision == "int4" and "weight-only" in c.methods]
    if checked.source == "random weights" and int4_decoders and not opts.allow_degraded:
        # Refused now, not after an hour: on a full-size random model the int4 decoder cannot meet the random-weights
        # bar (MedGemma 4B's shapes: fp32 cosine 1.0000000 at 6 layers; int4 0.61 at 6 layers, 0.37 at all 34).
        raise MedcError(
            f"{', '.join(int4_decoders)} at int4 on random weights: random layers amplify int4 rounding through the "
            "whole stack, so the fidelity gate would fail after the export (worst cosine 0.37 measured on "
            "medgemma-4b-it). For latency or memory work add --allow-degraded (the bundle is recorded as degraded); "
            "for a bundle that passes, use --precision int8 or fp32.")
    memory = planner.check_fits(opts)  # refuses a build that cannot fit a fixed-memory target
    step = progress or (lambda msg: log.info(msg))
    step(f"loading {opts.model}")
    streamed = stream.reason(opts)  # None: the whole fp32 model fits in memory
    loaded = loader.load(opts.model, random_weights=opts.random_weights, pad_to_square=opts.pad_to_square,
                         empty=streamed is not None)
    plan = make_plan(opts, loaded.spec, loaded.config)
    target = get_target(opts.target)
    comps = {c.name: c for c in loaded.family.components(loaded.config, **plan.graph)}

    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.medc-", dir=out.parent))
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.work-", dir=out.parent))
    try:
        # Phase 1, torch: export every component and record the fp32 reference on held-out inputs.
        golden: dict[str, np.ndarray] = {}
        if streamed:  # -- streamed path (compile/stream.py): the model is empty, weights come one at a time --
            step(f"streamed build: {streamed}")
            streamer = stream.StreamedBuild(loaded, streamed)
            prepared = {cp.name: streamer.prepare(cp, comps[cp.name], opts, work, golden, step)
                        for cp in plan.components}
            extras, weights = streamer.extras(), streamer.on_demand()
        else:
            prepared = {cp.name: _export_and_reference(cp, comps[cp.name], loaded, opts, work, golden, step)
                        for cp in plan.components}
            extras, weights = loaded.family.extras(loaded.hf_model), contextlib.nullcontext()
        gate_ref = None
        if loaded.family.gate_reference:
            step("whole-model reference (greedy tokens, perplexity)")
            with weights:
                gate_ref = loaded.family.gate_reference(loaded)
        streamer = weights = None
        # Phase 2, ONNX only: free the PyTorch model first (3.5 GB at MedSigLIP's size) so that ONNX Runtime's
        # optimisers and quantisers, which hold whole graphs in memory, have the room.
        loaded.hf_model = None
        gc.collect()
        if streamed:
            stream.trim()  # freed heap pages back to the OS before the isolated ONNX steps
        entries = {cp.name: _convert_and_gate(cp, comps[cp.name], prepared[cp.name], opts, target, stage, work, step)
                   for cp in plan.components}
        step("writing bundle")
        assets = loaded.family.load_assets(loaded, stage, **plan.graph)
        np.savez_compressed(stage / "golden.npz", **golden)
        manifest = Manifest(
            model={"name": loaded.spec.name, "family": loaded.family.name, "hf_class": loaded.family.hf_class,
                   "description": loaded.spec.description, "source": loaded.source,
                   "clinical_use": loaded.clinical_use,
                   **({} if loaded.clinical_use else
                      {"warning": "built from random weights: NOT FOR CLINICAL USE (latency and pipeline work only)"})},
            target=target.name, components=entries, extras=extras,
            toolchain=toolchain_versions(), golden="golden.npz",
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            build={"seconds": round(time.perf_counter() - t0, 1), "peak_rss_mib": peak_rss_mib(),
                   "peak_rss_isolated_steps_mib": peak_rss_mib(children=True),
                   "precision": opts.precision, "recipe": plan.recipe, "allow_degraded": opts.allow_degraded,
                   "pad_to_square": opts.pad_to_square, "optimizer": opts.optimizer,
                   **({"streamed": streamed} if streamed else {})},
            **assets,
        )
        if gate_ref is not None:
            manifest.build["generation_gate"] = _whole_model_gate(loaded.family, manifest, stage, gate_ref, opts, step)
        manifest.build["memory_plan"] = {k: memory.to_json()[k] for k in (
            "context", "batch", "weight_bytes", "kv_bytes", "activation_bytes", "runtime_bytes", "total_bytes",
            "usable_bytes", "fits", "decode_tokens_per_s", "vision_ms")}
        if target.engine == "tensorrt":  # ONNX + optimisation profiles + trtexec lines; engines on the device
            from medc.compile import tensorrt

            step("TensorRT: optimisation profiles, trtexec commands")
            manifest.tensorrt = tensorrt.prepare_bundle(stage, manifest, target, memory.context, opts.max_batch)
        manifest.files = hash_files(stage)
        manifest.write(stage)
        os.chmod(stage, 0o755)  # mkdtemp makes it private; a bundle is meant to be copied and read
        _replace(stage, out)
        return manifest
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


@dataclass
class _Prepared:
    """A component after the torch phase: its raw ONNX export, reference outputs and calibration data."""

    raw: Path
    example: dict[str, np.ndarray]
    ref_cases: dict
    calibration: tuple | None
    # Streamed components (compile/stream.py): (method, work) -> (graph, quantization record, optimisations),
    # optimised and converted while the weights are read; None: optimise + convert the raw export.
    produce: Callable | None = None
    export_key: str | None = None  # the raw export's cache key: its optimised forms are cached under it too


def _export_and_reference(cp: ComponentPlan, comp, loaded, opts, work: Path, golden: dict, step) -> _Prepared:
    import torch

    from medc.compile import export
    from medc.runtime.verify import golden_key

    module = comp.extract(loaded.hf_model)
    example = comp.dummy_inputs(loaded, 2, np.random.default_rng(loaded.spec.seed))
    step(f"{cp.name}: export")
    raw, key = work / f"{cp.name}.raw.onnx", export.cache_key(loaded, comp)
    if export.export_cached(module, comp, example, raw, key):
        log.info("%s: export reused from ~/.cache/medc/exports", cp.name)

    step(f"{cp.name}: reference outputs")
    ref_cases, ref_module = {}, comp.reference_module(loaded.hf_model)
    with torch.no_grad():
        for case, feeds in comp.golden_inputs(loaded).items():
            ref = comp.reference(ref_module(*export.module_args(ref_module, comp, feeds)))
            ref_cases[case] = {"in": feeds, "ref": ref}
            for kind, arrays in (("in", feeds), ("ref", ref)):
                for name, arr in arrays.items():
                    golden[golden_key(cp.name, case, kind, name)] = arr
    calibration = None
    if "int8-static-qdq" in cp.methods:
        step(f"{cp.name}: calibration data")
        calibration = comp.calibration(loaded, opts.calibration)
    return _Prepared(raw, example, ref_cases, calibration, export_key=key)


def _convert_and_gate(cp: ComponentPlan, comp, prep: _Prepared, opts, target, stage: Path, work: Path,
                      step) -> ComponentEntry:
    from medc.compile import export, optimize, quantize, stream
    from medc.runtime.session import stand_in_config

    graphs: dict[str, tuple[Path, dict]] = {}  # optimiser -> (optimised fp32 graph, manifest record)

    def optimised(optimizer: str) -> tuple[Path, dict]:
        if optimizer not in graphs:
            step(f"{cp.name}: optimise ({optimizer})")
            path = work / f"{cp.name}.{optimizer}.onnx"
            graphs[optimizer] = (path, optimize.optimize_cached(prep.raw, path, optimizer, prep.export_key,
                                                                optimize.split_for(target)))
        return graphs[optimizer]

    tol = comp.tolerances[cp.precision]
    ref_cases, example, calibration = prep.ref_cases, prep.example, prep.calibration
    candidates = []  # (method, path, info, evaluation, seconds, optimisations)
    for method in cp.methods or ["fp32"]:
        if prep.produce is not None:
            step(f"{cp.name}: {method}, weights streamed")
            path, info, optimizations = prep.produce(method, work)
        else:
            src, optimizations = optimised(quantize.source_optimizer(method, target, cp.optimizer or opts.optimizer))
            path = src if method == "fp32" else work / f"{cp.name}.{method}.onnx"
            info = {"method": "none"}
            if method != "fp32":
                step(f"{cp.name}: {method}")
                options = cp.options
                if method == "fp16" and cp.options:  # decoders: fp32 islands where held-out inputs overflow fp16
                    options = {**cp.options, "feeds": [case["in"] for case in ref_cases.values()]}
                if method == "int8-static-qdq" and target.engine == "tensorrt":  # no int32 bias DQ in TensorRT
                    options = {**options, "quantize_bias": False}
                info = quantize.convert(method, src, path, calibration, options)
        step(f"{cp.name}: fidelity gate ({method})")
        gated = path
        if method == "fp16" and target.available_providers()[0] == "CPUExecutionProvider":
            gated = _cpu_fp16_emulation(path, work)
            info = {**info, "gated_on": "CPU with fp16 rounding emulated (no GPU here; medc verify re-runs it on one)"}
        if method == "int8-static-qdq" and stand_in_config(target.engine, target.available_providers()):
            info = {**info, "gated_on": "ONNX Runtime CPU with Q/DQ left unfused: the engine's exact int8 arithmetic "
                                        "(runtime/session.py stand_in_config)"}
        evaluation, seconds = _gate_and_time(gated, target, ref_cases, tol, example,
                                             opts.timing_runs if len(cp.methods) > 1 else 0)
        evaluation["method"] = method
        candidates.append((method, path, info, evaluation, seconds, optimizations))
        log.info("%s %s: worst cosine %.6f, max abs %.3g, %s", cp.name, method, evaluation["worst"]["cosine"],
                 evaluation["worst"]["max_abs"], "pass" if evaluation["passed"] else "FAIL")

    passing = [c for c in candidates if c[3]["passed"]]
    if passing:
        chosen = min(passing, key=lambda c: c[4] if c[4] is not None else 0.0)
    elif opts.allow_degraded:
        chosen = max(candidates, key=lambda c: c[3]["worst"]["cosine"])
        log.warning("%s below its %s gate; kept because of --allow-degraded", cp.name, cp.precision)
    else:
        worst = max(candidates, key=lambda c: c[3]["worst"]["cosine"])[3]["worst"]
        if cp.precision == "fp32":
            fix = "at fp32 this points to the graph optimiser: try --optimizer none, or"
        else:
            fix = (f"try a higher precision for this component (--precision {cp.name}=fp32)"
                   + (", more representative --calibration images" if "int8-static-qdq" in cp.methods else "") + ", or")
        raise FidelityError(
            f"{cp.name} at {cp.precision} fails the fidelity gate: worst cosine {worst['cosine']:.6f}, max abs error "
            f"{worst['max_abs']:.3g}; required {tol.describe()}. Nothing was written. To fix: {fix} "
            "--allow-degraded to keep it anyway (recorded in the manifest).")
    method, path, info, evaluation, seconds, optimizations = chosen
    if len(candidates) > 1:
        info = {**info, "selected_by": "fastest passing on this machine",
                "candidates": {c[0]: {"passed": c[3]["passed"], "worst_cosine": c[3]["worst"]["cosine"],
                                      "seconds_batch2": c[4]} for c in candidates}}
    if prep.produce is not None:
        stream.install(path, stage / cp.file)  # written under its bundle name, its weights already external
    else:
        export.save_onnx(__import__("onnx").load(str(path)), stage / cp.file)
    evaluation["degraded"] = not evaluation["passed"]
    return ComponentEntry(file=cp.file, precision=cp.precision, inputs=list(comp.inputs), outputs=list(comp.outputs),
                          quantization=info, optimizations=optimizations, fidelity=evaluation)


def _cpu_fp16_emulation(path: Path, work: Path) -> Path:
    """ONNX Runtime's CPU provider has no fp16 MatMul/Add/Mul/Softmax kernels on x86: it computes them in fp32 and
    would hide exactly the overflow the fp16 gate must catch. Gate an fp32 copy that rounds every fp16 tensor
    through fp16 instead (medc.compile.fp16.cpu_emulation)."""
    import onnx

    from medc.compile import export, fp16

    out = work / f"{path.stem}.fp16-emulated.onnx"
    export.save_onnx(fp16.cpu_emulation(onnx.load(str(path))), out)
    return out


def _gate_and_time(path: Path, target, ref_cases, tol, example, runs: int):
    from medc.runtime.session import OrtSession, stand_in_config
    from medc.runtime.verify import evaluate

    providers = target.available_providers()
    with OrtSession(path, providers, config=stand_in_config(target.engine, providers)) as sess:
        evaluation = evaluate(sess.run, ref_cases, tol)
        if not runs:
            return evaluation, None
        sess.run(example)  # warm-up
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            sess.run(example)
            times.append(time.perf_counter() - t)
        return evaluation, float(np.median(times))


def _whole_model_gate(family, manifest: Manifest, stage: Path, reference: dict, opts, step) -> dict:
    """Generative models: run the finished bundle through the runtime (greedy tokens, perplexity) vs the reference."""
    from medc.runtime import PIPELINES
    from medc.runtime.bundle import open_bundle

    step("whole-model gate through the runtime")
    manifest.write(stage)  # provisional: the runtime reads the manifest
    with PIPELINES[family.name](open_bundle(stage, verify=False), None) as pipeline:
        precisions = {**{n: c.precision for n, c in manifest.components.items()},
                      **manifest.build.get("recipe", {}).get("precisions", {})}
        result = family.gate_check(pipeline, reference, precisions)
    log.info("whole-model gate: %s", {k: v for k, v in result.items() if k != "text"})
    if not result["passed"] and not opts.allow_degraded:
        raise FidelityError(
            f"the bundle fails the whole-model gate ({result['rule']}): greedy prefix agreement "
            f"{result['greedy_prefix_agreement']} of {result['greedy_new_tokens']}, perplexity {result['perplexity']:.3f} "
            f"vs {result['reference_perplexity']:.3f} ({result['perplexity_increase']:+.2%}). Nothing was written. "
            "Use a higher decoder precision, or --allow-degraded to keep it (recorded in the manifest).")
    return result


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise MedcError(f"output {out} exists and is a file; choose a directory path for -o.")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise MedcError(f"output directory {out} is not empty; pass --force to replace it, or choose another -o.")
    parent = out.parent if out.parent != Path("") else Path(".")
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise MedcError(f"cannot write {out}: {probe} is a file, not a directory; choose another -o.")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise MedcError(f"cannot write to {probe}: permission denied; choose a writable -o.")


def _check_calibration(folder: Path) -> None:
    """Fail before minutes of export if the calibration folder cannot be used. Messages name files, never content."""
    from medc.runtime.preprocess import load_image

    if not folder.is_dir():
        raise MedcError(f"calibration folder {folder} does not exist; pass a folder of PNG/JPEG images.")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not files:
        raise MedcError(f"calibration folder {folder} holds no PNG or JPEG images; add 16-64 representative images.")
    for f in files:
        load_image(f)


def _replace(stage: Path, out: Path) -> None:
    """Move the finished bundle into place; an old OUT (allowed by --force) is removed only after."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(stage, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
