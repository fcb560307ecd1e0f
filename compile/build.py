"""`medc build`: resolve, plan, export, optimise, convert, gate, and write the bundle atomically.

The build is a plan of named stages (compile/plan.py; printed by `--dry-run`) run in order. Everything is written to
a temporary directory beside OUT and renamed into place only when every stage passed, so a failed or interrupted
build never leaves a half bundle at OUT.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from medc.compile import adapters, embedding, export, fp16, optimize, planner, quantize, recipes, stream, tensorrt, vocab
from medc.compile import openvino as ov_forms
from medc.compile.loader import load, source_record
from medc.compile.plan import BuildOptions, ComponentPlan, make_plan, resolve, without_sharing
from medc.compile.quantize import ConvertOptions
from medc.errors import FidelityError, MedcError
from medc.manifest import MANIFEST_NAME, SIGNATURE_NAME, ComponentEntry, Manifest, hash_files, read_json_file
from medc.runtime import PIPELINES
from medc.runtime.bundle import open_bundle
from medc.runtime.preprocess import image_files, load_image
from medc.runtime.ov_session import OvSession, cpu_has_bf16
from medc.runtime.session import OrtSession, stand_in_config
from medc.runtime.verify import evaluate
from medc.signing import Signature, canonical, load_private
from medc.specs import gate_tolerance
from medc.system import peak_rss_mib, toolchain_versions
from medc.targets import get_target

log = logging.getLogger(__name__)

__all__ = ["BuildOptions", "build"]


def build(opts: BuildOptions, progress=None) -> Manifest:
    t0 = time.perf_counter()
    out = Path(opts.out)
    _check_out(out, opts.force)
    key = load_private(opts.sign_key) if opts.sign_key else None  # a bad key fails now, not after the build
    if opts.calibration is not None:
        _check_calibration(Path(opts.calibration))
    model = resolve(opts.model, opts.random_weights)
    plan = make_plan(opts, model)  # precision and target checked before minutes of loading weights
    if opts.vocab is not None:  # the memory check counts the reduced lm_head
        plan = dataclasses.replace(plan, lm_head_rows=len(vocab.read(opts.vocab).ids))
    need = model.family.gate_min_context
    if model.source.kind == "checkpoint" and plan.decoder is not None and plan.decoder.context < need:
        raise MedcError(f"--context {plan.decoder.context} is shorter than the whole-model gate's perplexity windows "
                        f"({need} tokens), which every real-weights build of this model passes; build with "
                        f"--context {need} or more.")
    unbuilt = sorted({p for p in plan.recipe.precisions.values() if p in recipes.plan_only(get_target(opts.target))})
    if unbuilt:
        raise MedcError(f"{', '.join(unbuilt)} builds are not supported by this medc version (`medc plan` sizes "
                        "them); build --precision fp16 (Gemma 3's overflow-prone parts stay fp32), int8 or int4.")
    ov_methods = {m for c in plan.components for m in c.methods if m in ov_forms.METHODS}
    if ov_methods:
        ov_forms.require()
    if "ov-bf16" in ov_methods and not cpu_has_bf16():
        raise MedcError("bf16 components are gated by running them in bf16, and this CPU has no AVX512_BF16 or AMX "
                        "(OpenVINO would compute f32 and the gate would prove nothing). Build on a CPU that has them "
                        "(Intel Xeon Sapphire Rapids or newer, AMD Zen 4 or newer), or build --precision int8.")
    int4_decoders = [c.name for c in plan.components if c.precision == "int4" and "weight-only" in c.methods]
    if plan.source == "random weights" and int4_decoders and not opts.allow_degraded:
        # Refused now, not after an hour: on a full-size random model the int4 decoder cannot meet the random-weights
        # bar (MedGemma 4B's shapes: worst cosine 0.37 with all 34 layers).
        raise MedcError(
            f"{', '.join(int4_decoders)} at int4 on random weights: random layers amplify int4 rounding through the "
            "whole stack, so the fidelity gate would fail after the export (worst cosine 0.37 measured on "
            "medgemma-4b-it). For latency or memory work add --allow-degraded (the bundle is recorded as degraded); "
            "for a bundle that passes, use --precision int8 or fp32.")
    memory = planner.check_fits(model, opts, plan)  # refuses a build that cannot fit a fixed-memory target
    step = progress or (lambda msg: log.info(msg))
    step(f"loading {opts.model}")
    streamed = stream.reason(model, opts)  # None: the whole fp32 model fits in memory
    kept = _vocab_list(opts, plan, streamed)
    loaded = load(model, pad_to_square=opts.pad_to_square, empty=streamed is not None)
    target = get_target(opts.target)
    comps = {c.name: c for c in loaded.family.components(loaded.config, plan.decoder)}
    if kept is not None:
        vocab.check(kept, str(opts.vocab), loaded)
        comps = vocab.reduce_components(comps, kept)
        plan = without_sharing(plan)  # the reduced lm_head has fewer rows than the table
    peft_model = None
    if opts.adapters:
        if kept is not None:
            raise MedcError("--vocab with --adapter is not supported: build the adapted model's bundle without --vocab.")
        if streamed:
            raise MedcError(f"adapters are merged in memory, and this build is streamed ({streamed}); build the "
                            "adapted model on a machine with the memory for its fp32 weights.")
        found = [adapters.read(a) for a in opts.adapters]
        for a in found:
            adapters.check_fits(a, loaded.hf_model)
        step(f"applying {len(found)} adapter(s) with peft")
        peft_model = adapters.apply(loaded.hf_model, found, opts.adapter_scale)
        loaded.source = {**loaded.source, "adapters": [a.record(opts.adapter_scale) for a in found]}
    slotted = []
    if opts.adapter_slots:
        if "decoder" not in comps or target.kind != "cpu" or streamed:
            raise MedcError("run-time adapters (--adapter-slot) are built into the decoder of CPU targets (fp32 "
                            "activations, ONNX Runtime's LoRA adapters); for this build merge them with --adapter.")
        slotted = [adapters.read(a) for a in opts.adapter_slots]
        names = [a.path.name for a in slotted]
        if len(set(names)) != len(names):
            raise MedcError(f"run-time adapters are named by their folders, and two are named alike ({names}).")
        for a in slotted:
            adapters.check_fits(a, loaded.hf_model)

    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.medc-", dir=out.parent))
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.work-", dir=out.parent))
    try:
        # Phase 1, torch: export every component and record the fp32 reference on held-out inputs.
        golden: dict[str, np.ndarray] = {}
        gate_ref = None
        if streamed:  # -- streamed path (compile/stream.py): the model is empty, weights come one at a time --
            step(f"streamed build: {streamed}")
            streamer = stream.StreamedBuild(loaded, streamed)
            prepared = {cp.name: streamer.prepare(cp, comps[cp.name], opts, work, golden, step)
                        for cp in plan.components}
            extras, weights = streamer.extras(), streamer.on_demand()
        else:
            refs = {}
            if peft_model is not None:
                # The references are HF + peft with the adapters unmerged (as the site trained and evaluated
                # them); the export is of the merged weights. So a bad merge fails the gate.
                step("reference outputs of the model with its adapters applied (unmerged)")
                refs = {cp.name: export.reference_cases(comps[cp.name], loaded) for cp in plan.components}
                if loaded.family.gate_reference:
                    gate_ref = loaded.family.gate_reference(loaded)
                loaded.hf_model = adapters.merge(peft_model)
                peft_model = None
            prepared = {cp.name: export.prepare(cp, comps[cp.name], loaded, opts.calibration, work, golden, step,
                                                refs.get(cp.name)) for cp in plan.components}
            extras, weights = loaded.family.extras(loaded.hf_model), contextlib.nullcontext()
        if loaded.family.gate_reference and gate_ref is None:
            step("whole-model reference (greedy tokens, perplexity)")
            with weights:
                gate_ref = loaded.family.gate_reference(loaded)
                if kept is not None and "windows" in gate_ref:  # the reference renormalised over the list
                    gate_ref = {**gate_ref, "list_logprobs": vocab.list_logprobs(loaded.hf_model, kept,
                                                                                 gate_ref["windows"])}
        slots, adapter_refs = None, {}
        if opts.adapter_slots:  # while the torch model is here: which decoder MatMul each targeted module is
            slots = adapters.slot_map(prepared["decoder"].raw, loaded.hf_model, adapters.targeted_modules(slotted))
            for a in slotted:  # and each adapter's reference: the decoder with it applied by peft, unmerged
                step(f"decoder: reference outputs with adapter {a.path.name}")
                applied = adapters.apply(loaded.hf_model, [a], opts.adapter_scale)
                adapter_refs[a.path.name] = export.reference_cases(comps["decoder"], loaded)
                loaded.hf_model = applied.unload()
        streamer = weights = None
        # Phase 2, ONNX only: free the PyTorch model first (3.5 GB at MedSigLIP's size) so that ONNX Runtime's
        # optimisers and quantisers, which hold whole graphs in memory, have the room.
        loaded.hf_model = None
        gc.collect()
        if streamed:
            stream.trim()  # freed heap pages back to the OS before the isolated ONNX steps
        entries = {cp.name: _convert_and_gate(cp, comps[cp.name], prepared[cp.name], opts, target, stage, work, step)
                   for cp in plan.components if not _shared(cp)}
        for cp in filter(_shared, plan.components):  # after the decoder: it reads the decoder's stored rows
            entries[cp.name] = _shared_embedding(cp, comps[cp.name], prepared[cp.name], entries, stage, step)
        entries = {cp.name: entries[cp.name] for cp in plan.components}
        step("writing bundle")
        assets = loaded.family.load_assets(loaded, stage, plan.decoder)
        if kept is not None:
            assets["generation"]["vocab"] = vocab.bundle_record(kept, stage)
        np.savez_compressed(stage / "golden.npz", **golden)
        manifest = Manifest(
            model={"name": loaded.spec.name, "family": loaded.family.name, "hf_class": loaded.family.hf_class,
                   "description": loaded.spec.description, "source": source_record(loaded.source),
                   "clinical_use": loaded.clinical_use,
                   **({} if loaded.clinical_use else
                      {"warning": "built from random weights: NOT FOR CLINICAL USE (latency and pipeline work only)"})},
            target=target.name, components=entries, extras=extras,
            toolchain=toolchain_versions(), golden="golden.npz",
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            build={"seconds": round(time.perf_counter() - t0, 1), "peak_rss_mib": peak_rss_mib(),
                   "peak_rss_isolated_steps_mib": peak_rss_mib(children=True),
                   "precision": opts.precision, "recipe": plan.recipe_record(), "allow_degraded": opts.allow_degraded,
                   "pad_to_square": opts.pad_to_square, "optimizer": opts.optimizer,
                   **({"streamed": streamed} if streamed else {})},
            **assets,
        )
        if manifest.generation:  # the runtime makes its KV cache in this dtype (runtime/decoder.py)
            manifest.generation["kv_dtype"] = next((e.quantization.get("kv_dtype") for e in entries.values()
                                                    if e.quantization.get("kv_dtype")), "float32")
        if gate_ref is not None:
            with _fp16_emulated(manifest, stage, work) as emulated:
                manifest.build["generation_gate"] = _whole_model_gate(loaded.family, manifest, stage, gate_ref, opts,
                                                                      step)
            if emulated:
                manifest.build["generation_gate"]["gated_on"] = f"{EMULATED}: {', '.join(emulated)}"
        manifest.build["memory_plan"] = {k: memory.to_json()[k] for k in (
            "context", "batch", "weight_bytes", "kv_bytes", "activation_bytes", "runtime_bytes", "total_bytes",
            "usable_bytes", "fits", "decode_tokens_per_s", "vision_ms")}
        if slots is not None:
            step(f"decoder: {len(slots)} LoRA slots, {len(slotted)} run-time adapter(s)")
            decoder = manifest.components["decoder"]
            manifest.generation["lora"] = adapters.build_slots(stage, decoder.file, slots, slotted, opts.adapter_scale,
                                                               prepared["decoder"].ref_cases, work, adapter_refs,
                                                               gate_tolerance("decoder", decoder.precision),
                                                               opts.allow_degraded)
        if target.engine == "tensorrt":  # ONNX + optimisation profiles + trtexec lines; engines on the device
            step("TensorRT: optimisation profiles, trtexec commands, lint")
            manifest.tensorrt = tensorrt.prepare_bundle(stage, manifest, target, memory.context, opts.max_batch)
        manifest.files = hash_files(stage)
        manifest.write(stage)
        if key is not None:
            Signature.make(canonical(read_json_file(stage)), key, "manifest").write(stage / SIGNATURE_NAME)
        os.chmod(stage, 0o755)  # mkdtemp makes it private; a bundle is meant to be copied and read
        _replace(stage, out)
        return manifest
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


@dataclass(frozen=True)
class _Candidate:
    """One conversion of a component, gated (and timed when several compete)."""

    method: str
    path: Path
    quantization: dict  # the manifest record
    evaluation: dict  # verify.evaluate's result
    seconds: float | None  # median at the export's batch; None when not timed
    optimizations: dict


def _convert_and_gate(cp: ComponentPlan, comp, prep: export.Prepared, opts, target, stage: Path, work: Path,
                      step) -> ComponentEntry:
    graphs: dict[str, tuple[Path, dict]] = {}  # optimiser -> (optimised fp32 graph, manifest record)

    def optimised(optimizer: str) -> tuple[Path, dict]:
        if optimizer not in graphs:
            step(f"{cp.name}: optimise ({optimizer})")
            path = work / f"{cp.name}.{optimizer}.onnx"
            graphs[optimizer] = (path, optimize.optimize_cached(prep.raw, path, optimizer, prep.export_key,
                                                                optimize.split_for(target)))
        return graphs[optimizer]

    tol = gate_tolerance(cp.name, cp.precision)  # the table `medc verify` re-checks against
    options = ConvertOptions(
        calibration=prep.calibration, quantize_bias=target.engine != "tensorrt", weight_only=cp.weight_only,
        fp16_islands=cp.fp16_islands,  # decoders: fp32 islands where held-out inputs overflow fp16
        fp16_feeds=[case["in"] for case in prep.ref_cases.values()] if cp.fp16_islands else None,
        embedding=cp.embedding)
    candidates: list[_Candidate] = []
    for method in cp.methods or ["fp32"]:
        if prep.produce is not None:
            step(f"{cp.name}: {method}, weights streamed")
            path, info, optimizations = prep.produce(method, work)
        elif method in ov_forms.METHODS:
            src, optimizations = optimised(ov_forms.SOURCE_OPTIMIZER)
            path = work / f"{cp.name}.{method}.xml"
            step(f"{cp.name}: {method}")
            info = ov_forms.convert(method, src, path, prep.calibration, prep.calibration_ood)
        else:
            src, optimizations = optimised(quantize.source_optimizer(method, target, cp.optimizer or opts.optimizer))
            path = src if method == "fp32" else work / f"{cp.name}.{method}.onnx"
            info = {"method": "none"}
            if method != "fp32":
                step(f"{cp.name}: {method}")
                info = quantize.convert(method, src, path, options)
        step(f"{cp.name}: fidelity gate ({method})")
        gated = path
        if _half(method, info) and target.available_providers()[0] == "CPUExecutionProvider":
            gated = _cpu_fp16_emulation(path, work)
            info = {**info, "gated_on": "CPU with fp16 rounding emulated (no GPU here; medc verify re-runs it on one)"}
        if method == "int8-static-qdq" and stand_in_config(target.engine, target.available_providers()):
            info = {**info, "gated_on": "ONNX Runtime CPU with Q/DQ left unfused: the engine's exact int8 arithmetic "
                                        "(runtime/session.py stand_in_config)"}
        session = (OvSession(gated, inference_precision=info["inference_precision"]) if method in ov_forms.METHODS
                   else None)
        evaluation, seconds = _gate_and_time(gated, target, prep.ref_cases, tol, prep.example,
                                             opts.timing_runs if len(cp.methods) > 1 else 0, session)
        evaluation["method"] = method
        candidates.append(_Candidate(method, path, info, evaluation, seconds, optimizations))
        log.info("%s %s: worst cosine %.6f, max abs %.3g, %s", cp.name, method, evaluation["worst"]["cosine"],
                 evaluation["worst"]["max_abs"], "pass" if evaluation["passed"] else "FAIL")

    passing = [c for c in candidates if c.evaluation["passed"]]
    if passing:
        chosen = min(passing, key=lambda c: c.seconds if c.seconds is not None else 0.0)
    elif opts.allow_degraded:
        chosen = max(candidates, key=lambda c: c.evaluation["worst"]["cosine"])
        log.warning("%s below its %s gate; kept because of --allow-degraded", cp.name, cp.precision)
    else:
        worst = max(candidates, key=lambda c: c.evaluation["worst"]["cosine"]).evaluation["worst"]
        if cp.precision == "fp32":
            fix = "at fp32 this points to the graph optimiser: try --optimizer none, or"
        else:
            fix = (f"try a higher precision for this component (--precision {cp.name}=fp32)"
                   + (", more representative --calibration images" if "int8-static-qdq" in cp.methods else "") + ", or")
        raise FidelityError(
            f"{cp.name} at {cp.precision} fails the fidelity gate: worst cosine {worst['cosine']:.6f}, max abs error "
            f"{worst['max_abs']:.3g}; required {tol.describe()}. Nothing was written. To fix: {fix} "
            "--allow-degraded to keep it anyway (recorded in the manifest).")
    info, evaluation = chosen.quantization, chosen.evaluation
    if len(candidates) > 1:
        info = {**info, "selected_by": "fastest passing on this machine",
                "candidates": {c.method: {"passed": c.evaluation["passed"],
                                          "worst_cosine": c.evaluation["worst"]["cosine"], "seconds_batch2": c.seconds}
                               for c in candidates}}
    backend, file = "onnxruntime", cp.file
    if chosen.method in ov_forms.METHODS:  # OpenVINO IR: the .xml and its .bin, under the component's name
        backend, file = "openvino", f"{cp.name}.xml"
        shutil.copyfile(chosen.path, stage / file)
        shutil.copyfile(chosen.path.with_suffix(".bin"), stage / f"{cp.name}.bin")
    elif prep.produce is not None:
        stream.install(chosen.path, stage / cp.file)  # written under its bundle name, its weights already external
    else:
        import onnx

        export.save_onnx(onnx.load(str(chosen.path)), stage / cp.file)
    evaluation["degraded"] = not evaluation["passed"]
    return ComponentEntry(file=file, precision=cp.precision, inputs=list(comp.inputs), outputs=list(comp.outputs),
                          quantization=info, optimizations=chosen.optimizations, fidelity=evaluation, backend=backend)


def _shared(cp: ComponentPlan) -> bool:
    return cp.embedding is not None and cp.embedding.form == embedding.SHARED_FORM


def _shared_embedding(cp: ComponentPlan, comp, prep: export.Prepared, entries: dict, stage: Path,
                      step) -> ComponentEntry:
    """embed_tokens reading the decoder's int8 lm_head rows (embedding.share_head), gated like any int8 embedding,
    on the CPU provider that runs it."""
    decoder = entries["decoder"]
    head_rows = decoder.quantization.get("lm_head_rows")
    if not head_rows:
        raise MedcError("internal: the decoder's lm_head was not stored as rows to share with embed_tokens")
    step(f"{cp.name}: {embedding.SHARED_FORM}, stored once with the decoder's")
    path = stage / decoder.file
    if not (stage / f"{decoder.file}.data").is_file():  # a small decoder saved inline: its rows need a data file
        import onnx

        export.save_onnx(onnx.load(str(path)), path, external=True)
    info = embedding.share_head(prep.raw, path, stage / cp.file, head_rows)
    step(f"{cp.name}: fidelity gate ({info['format']})")
    with OrtSession(stage / cp.file, [embedding.SHARED_PROVIDER]) as sess:
        evaluation = evaluate(sess.run, prep.ref_cases, gate_tolerance(cp.name, cp.precision))
    evaluation["method"] = "embedding"
    log.info("%s shared: worst cosine %.6f, %s", cp.name, evaluation["worst"]["cosine"],
             "pass" if evaluation["passed"] else "FAIL")
    if not evaluation["passed"]:  # per-row int8 of an embedding table: this would be a medc bug, not a choice
        raise FidelityError(f"{cp.name} read from the lm_head's int8 rows fails its gate (worst cosine "
                            f"{evaluation['worst']['cosine']:.6f}). Nothing was written. Build with a recipe "
                            "whose embed_tokens is fp16 to store the table on its own.")
    evaluation["degraded"] = False
    return ComponentEntry(file=cp.file, precision=cp.precision, inputs=list(comp.inputs), outputs=list(comp.outputs),
                          quantization=info, optimizations={"optimizer": "none"}, fidelity=evaluation)


def _half(method: str, info: dict) -> bool:
    """fp16 activations: the fp16 preset, or an int4/int8 decoder's W4A16/W8A16 form on a GPU target."""
    return method == "fp16" or info.get("activations", "").startswith("float16")


EMULATED = "CPU with fp16 rounding emulated"  # a component gate's `gated_on`, as `_convert_and_gate` records it


@contextlib.contextmanager
def _fp16_emulated(manifest: Manifest, stage: Path, work: Path):
    """For the whole-model gate: the components gated with fp16 rounding emulated run as their emulated graphs too
    (fp32 inputs and outputs, KV cache included), put in place of the bundle's files until the gate is done. ONNX
    Runtime's CPU provider would otherwise compute most fp16 ops in fp32 and the perplexity would miss fp16's error."""
    import onnx

    emulated = [c.file for c in manifest.components.values()
                if str(c.quantization.get("gated_on", "")).startswith(EMULATED) and c.file.endswith(".onnx")]
    if not emulated:
        yield []
        return
    aside = Path(tempfile.mkdtemp(prefix="fp16-originals-", dir=work))
    kv = manifest.generation.get("kv_dtype")
    moved = []
    # The original graph goes aside, its data file stays in place (another graph may read it: a shared embedding
    # table) and the emulated graph keeps its own data file beside it.
    try:
        for file in emulated:
            os.replace(stage / file, aside / file)
            moved.append(file)
            original = onnx.load(str(aside / file), load_external_data=False)
            onnx.load_external_data_for_model(original, str(stage))
            export.save_onnx(fp16.cpu_emulation(original), stage / file, data_name=f"{file}.emulated.data")
            del original
        if kv:
            manifest.generation["kv_dtype"] = "float32"
        yield emulated
    finally:
        for file in emulated:
            (stage / f"{file}.emulated.data").unlink(missing_ok=True)
        for file in moved:
            os.replace(aside / file, stage / file)
        if kv:
            manifest.generation["kv_dtype"] = kv
        shutil.rmtree(aside, ignore_errors=True)


def _cpu_fp16_emulation(path: Path, work: Path) -> Path:
    """ONNX Runtime's CPU provider has no fp16 MatMul/Add/Mul/Softmax kernels on x86: it computes them in fp32 and
    would hide exactly the overflow the fp16 gate must catch. Gate an fp32 copy that rounds every fp16 tensor
    through fp16 instead (medc.compile.fp16.cpu_emulation)."""
    import onnx

    out = work / f"{path.stem}.fp16-emulated.onnx"
    export.save_onnx(fp16.cpu_emulation(onnx.load(str(path))), out)
    return out


def _gate_and_time(path: Path, target, ref_cases, tol, example, runs: int, session=None):
    """The gate's evaluation of a candidate and, with `runs`, its median time on `example`: through `session` (an
    OpenVINO candidate's), else ONNX Runtime on the target's providers."""
    providers = target.available_providers()
    session = session or OrtSession(path, providers, config=stand_in_config(target.engine, providers))
    with session as sess:
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
    step("whole-model gate through the runtime")
    manifest.write(stage)  # provisional: the runtime reads the manifest
    with PIPELINES[family.name](open_bundle(stage, verify=False), None) as pipeline:
        precisions = {**{n: c.precision for n, c in manifest.components.items()},
                      **manifest.build["recipe"]["precisions"]}
        result = family.gate_check(pipeline, reference, precisions)
    log.info("whole-model gate: %s", {k: v for k, v in result.items() if k != "text"})
    if not result["passed"] and not opts.allow_degraded:
        raise FidelityError(
            f"the bundle fails the whole-model gate ({result['rule']}): greedy prefix agreement "
            f"{result['greedy_prefix_agreement']} of {result['greedy_new_tokens']}, perplexity {result['perplexity']:.3f} "
            f"vs {result['reference_perplexity']:.3f} ({result['perplexity_increase']:+.2%}). Nothing was written. "
            "Use a higher decoder precision, or --allow-degraded to keep it (recorded in the manifest).")
    return result


def _vocab_list(opts, plan, streamed) -> vocab.VocabList | None:
    """--vocab's list, read before the weights are: only for a decoder built in memory."""
    if opts.vocab is None:
        return None
    if plan.decoder is None:
        raise MedcError(f"--vocab reduces a decoder's lm_head; {plan.model} has no decoder. Drop --vocab.")
    if streamed:
        raise MedcError(f"--vocab is not supported by the streamed build this model needs ({streamed}); build "
                        "without --vocab, or on a machine with the memory to hold the fp32 model.")
    return vocab.read(opts.vocab)


def _check_out(out: Path, force: bool) -> None:
    if out.is_symlink() or out.exists() and not out.is_dir():
        raise MedcError(f"output {out} exists and is a file or a link; choose a directory path for -o.")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise MedcError(f"output directory {out} is not empty; pass --force to replace it, or choose another -o.")
        if not (out / MANIFEST_NAME).is_file():  # --force replaces a bundle, never a folder of something else
            raise MedcError(f"output directory {out} is not empty and holds no medc bundle ({MANIFEST_NAME}); "
                            "--force replaces only an earlier bundle. Choose another -o.")
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
    if not folder.is_dir():
        raise MedcError(f"calibration folder {folder} does not exist; pass a folder of PNG, JPEG or DICOM images.")
    files = image_files(folder)
    if not files:
        raise MedcError(f"calibration folder {folder} holds no PNG, JPEG or DICOM images; add 16-64 representative "
                        "images.")
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
