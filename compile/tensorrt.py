"""The TensorRT stage of a GPU bundle: optimisation profiles, exact cast islands, trtexec lines and the lint on the
build host (`prepare_bundle`), and the engines built on the device (`finish_engines`, `medc engines`). UNVERIFIED
on hardware: see the comment below the imports."""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from medc.compile import lint
from medc.errors import MedcError
from medc.manifest import RECORDS_DIR, Manifest, Record, read_json_file, sha256_file
from medc.runtime.bundle import open_bundle
from medc.runtime.decoder import PREFILL_CHUNK
from medc.runtime.session import OrtSession
from medc.runtime.trt_session import gpu_info, import_tensorrt
from medc.runtime.verify import evaluate, golden_cases
from medc.signing import digest
from medc.specs import gate_tolerance
from medc.system import version_tuple
from medc.targets import get_target

# Two halves, because TensorRT engines are tied to the TensorRT version and the GPU that built them, and Jetson engines
# cannot be cross-built:
# - `prepare_bundle` (the build host, CPU is enough; called by `medc build --target T` before the bundle is hashed):
#   derives min/opt/max shapes per input from the manifest and the requested context (`derive_profiles`), puts exact
#   cast islands around the few integer/bool nodes TensorRT's ONNX parser rejects (`make_trt_ready`; re-checked on the
#   golden data), writes `tensorrt/profiles.json` and `tensorrt/trtexec.sh` (the same build by hand, without Python),
#   and runs the lint (compile/lint.py) as its last step: a graph it finds errors in is recorded as blocked.
# - `finish_engines` (the device, with TensorRT; `medc engines BUNDLE`): builds one engine per component from the
#   bundle's ONNX with the TensorRT Python API, saves `tensorrt/<component>.plan` and the timing cache, records
#   TensorRT version, compute capability and GPU, and re-hashes the bundle. The runtime refuses engines from another
#   TensorRT or GPU before deserialising them (medc.runtime.trt_session.check_engine_compat).
#
# Precision comes from the graph, never from builder flags: networks are strongly typed (TensorRT 10: the
# STRONGLY_TYPED creation flag; TensorRT 11: always), so fp16 graphs keep the fp32 islands medc put in them (Gemma 3
# overflows fp16), int8/int4 are explicit Q/DQ nodes, and no INT8 calibrator is ever set (deprecated in 10.1, removed in
# 11). fp32 components also clear TF32 so they stay within their 1e-4 gate.
#
# UNVERIFIED ON HARDWARE: everything that imports `tensorrt` (the engine build in `_build_engine`, `finish_engines`)
# was written against NVIDIA's documentation for each TensorRT version the target profiles name (10.3 on JetPack
# 6.1/6.2, 10.13 on Thor and the data-center profiles, 11.4 on JetPack 7.2 Orin) and has not run on a GPU: no machine
# this was developed on has one. The profile derivation, graph rewrites, trtexec text, compatibility rules and error
# messages are pure Python and are tested on CPU (tests/test_tensorrt.py).
#
# Documentation relied on (cited by key next to each call below). Within a major version TensorRT removes no API
# ("TensorRT removes APIs only on major version boundaries", Version Compatibility page), so the 10.x pages cover 10.3
# and 10.13; NVIDIA's archive of 10.3-specific Python pages was not available to check, and is not claimed.

log = logging.getLogger(__name__)

_TRT = "https://docs.nvidia.com/deeplearning/tensorrt"
DOCS = {
    # Python API, 10.x (10.0.1 archive; the same classes in the 10.x "latest" pages) and 11.0
    "builder-10": f"{_TRT}/latest/_static/python-api/infer/Core/Builder.html",
    "builder-11": f"{_TRT}/11.0.0/_static/python-api/infer/Core/Builder.html",
    "config-10": f"{_TRT}/latest/_static/python-api/infer/Core/BuilderConfig.html",
    "profile-10": f"{_TRT}/latest/_static/python-api/infer/Core/OptimizationProfile.html",
    "profile-11": f"{_TRT}/11.4.0/_static/python-api/infer/Core/OptimizationProfile.html",
    "parser-10": f"{_TRT}/latest/_static/python-api/parsers/Onnx/pyOnnx.html",
    "engine-10": f"{_TRT}/archives/tensorrt-1001/api/python_api/infer/Core/Engine.html",
    "engine-11": f"{_TRT}/11.0.0/_static/python-api/infer/Core/Engine.html",
    # What 11 removed (BuilderFlag.FP16/INT8/..., int8_calibrator, device_memory_size) and what it kept
    "removed-11": f"{_TRT}/latest/api/migration/tensorrt-10x-to-11x-python-api-reference.html",
    "typing-11": f"{_TRT}/11.4.1/api/migration/tensorrt-10x-to-11x-python-api-patterns.html",
    # trtexec: 10.x flags; 11.x drops --fp16/--int8/... and makes --stronglyTyped unnecessary
    "trtexec-10": f"{_TRT}/10.8.0/reference/command-line-programs.html",
    "trtexec-8to10": f"{_TRT}/10.16.1/api/tensorrt-8x-to-10x-trtexec.html",
    "trtexec-11": f"{_TRT}/11.4.1/api/migration/tensorrt-10x-to-11x-trtexec.html",
    # Engines are tied to the TensorRT version that built them (and, without hardware compatibility, the GPU)
    "compat": f"{_TRT}/11.1.0/inference-library/engine-compatibility.html",
    "compat-10": f"{_TRT}/10.16.1/inference-library/version-compatibility.html",
    # ONNX operator/type support of the parser (CumSum is float-only, Pad has no BOOL): onnx/onnx-tensorrt
    "onnx-ops": "https://github.com/onnx/onnx-tensorrt/blob/main/docs/operators.md (TensorRT 10.15 table)",
    "install-pip": f"{_TRT}/10.16.1/installing-tensorrt/install-pip.html",
    "install-10.3": f"{_TRT}/archives/tensorrt-1030/install-guide/index.html",
    "jetpack": "https://docs.nvidia.com/jetson/jetpack/install-setup/index.html (sudo apt install nvidia-jetpack)",
}

PROFILES_FILE = "tensorrt/profiles.json"
TRTEXEC_FILE = "tensorrt/trtexec.sh"
TIMING_CACHE = "tensorrt/timing.cache"
UNVERIFIED = ("engine build and TensorRT runtime are written against NVIDIA's documentation and have not run on "
              "hardware with this medc version; `medc verify BUNDLE` on the device checks them against the golden data")
GIB = 1 << 30
MIB = 1 << 20


# -- what each TensorRT version wants ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrtRules:
    """The differences between the TensorRT versions the target profiles name that medc's build depends on."""

    version: str  # "10.3", "11.4"
    # NetworkDefinitionCreationFlag.STRONGLY_TYPED must be passed to create_network (10.x). In 11.0 the flag is
    # deprecated and ignored: every network is strongly typed [builder-11].
    strongly_typed_flag: bool
    # trtexec --stronglyTyped (10.x [trtexec-10]); 11.x: "--stronglyTyped is no longer needed" [trtexec-11]
    trtexec_strongly_typed: bool

    @property
    def major(self) -> int:
        return int(self.version.split(".")[0])


def rules_for(version: str) -> TrtRules:
    """Rules for a TensorRT version string ("10.3", "10.13.3.9", "11.4.0"). Versions before 10 are refused: medc's
    graphs need int4 weight-only DQ and the name-based tensor API (JetPack 6.0's TensorRT 8.6 has neither)."""
    try:
        major, minor = version_tuple(version, 2)
    except ValueError:
        raise MedcError(f"cannot read TensorRT version {version!r}; expected e.g. 10.3 or 11.4.") from None
    if major < 10:
        raise MedcError(f"TensorRT {version} is too old for medc's engines (int4 weight-only and the strongly typed "
                        "builder need TensorRT 10 or newer); on Jetson install JetPack 6.1+.")
    return TrtRules(f"{major}.{minor}", strongly_typed_flag=major == 10, trtexec_strongly_typed=major == 10)


# -- optimisation profiles ---------------------------------------------------------------------------------------------
# The named dynamic axes medc's exports use (compile/models/siglip.py, gemma3.py). One profile per component, and each
# of its min, opt and max is a *consistent* set (total = past + seq, sliding past = min(past, window - 1)): TensorRT
# runs tactics at the opt shapes, so an inconsistent opt set fails the build in shape checks.
AXES = ("batch", "seq", "total", "past_full", "past_sliding", "logits")
OPT_PREFILL_TOKENS = 256  # a typical prompt; the image token count when that is larger (MedGemma: 256)


def _axis_limits(manifest, context: int, max_batch: int, batch_max: int, generative: bool
                 ) -> dict[str, tuple[int, int, int]]:
    gen = manifest.generation or {}
    mm_tokens = int((manifest.preprocessing or {}).get("mm_tokens_per_image") or 0)
    opt_seq = min(context, max(OPT_PREFILL_TOKENS, mm_tokens))
    # The runtime prefills in chunks (an image whole: runtime/decoder.py), and an execution context's activation
    # memory is sized for the profile's max shapes: a step's tokens are bounded by the chunk, not the context.
    chunk = min(context, max(PREFILL_CHUNK, mm_tokens))
    keeps = [layer["keep"] for layer in gen.get("kv_layout", []) if layer.get("keep") is not None]
    sliding_max = min(min(keeps), context - 1) if keeps else context - 1
    return {
        # Decoding runs one sequence at a time far more often than a full batch: tune for batch 1 there.
        "batch": (1, 1 if generative else max_batch, batch_max),
        # min: a single decode step with an empty cache; opt: a prefill of opt_seq tokens, no cache yet;
        # max: seq up to one prefill chunk and past up to context - 1 (the last decode step). The max set cannot be
        # consistent for both at once; TensorRT only uses it as a bound.
        "seq": (1, opt_seq, chunk),
        "total": (1, opt_seq, context),
        "past_full": (0, 0, context - 1),
        "past_sliding": (0, 0, sliding_max),  # sliding layers keep window - 1 tokens (kv_layout "keep")
        "logits": (1, 1, chunk),  # generation asks for the last position; perplexity for a window's (512) all
    }


def derive_profiles(manifest, target, context: int, max_batch: int) -> dict[str, dict[str, dict[str, list[int]]]]:
    """{component: {input: {"min": shape, "opt": shape, "max": shape}}} from the manifest's input specs (named
    dynamic axes) and its KV layout. Static dimensions (image sizes, SigLIP's 64 text positions) stay fixed."""
    if max_batch < 1:
        raise MedcError(f"max batch must be at least 1 (got {max_batch}).")
    gen = manifest.generation or {}
    if gen:
        limit = int(gen.get("max_positions") or context)
        if context > limit:
            raise MedcError(f"context {context} exceeds this model's {limit} positions; pass --context {limit} or less.")
        if context < 2:
            raise MedcError(f"context {context} is too small for a decoder: it needs at least 2 tokens.")
    profiles: dict[str, dict[str, dict[str, list[int]]]] = {}
    for name, comp in manifest.components.items():
        generative = any("seq" in spec.shape for spec in comp.inputs)
        # The batch range also covers the bundle's own golden cases (MedGemma's decode case is batch 3), so that
        # `medc verify` can run every engine on the data the build was gated on.
        gated = max((int(c.get("batch", 1)) for c in (comp.fidelity or {}).get("cases", {}).values()), default=1)
        limits = _axis_limits(manifest, context, max_batch, max(max_batch, gated), generative)
        shapes = {}
        for spec in comp.inputs:
            unknown = [d for d in spec.shape if isinstance(d, str) and d not in limits]
            if unknown:
                raise MedcError(f"{name}.{spec.name}: no TensorRT profile rule for dynamic axis {unknown[0]!r} "
                                f"(known: {', '.join(AXES)}); target {target.name} cannot be profiled.")
            shapes[spec.name] = {which: [d if isinstance(d, int) else limits[d][i] for d in spec.shape]
                                 for i, which in enumerate(("min", "opt", "max"))}
        profiles[name] = shapes
    return profiles


def workspace_bytes(target, manifest) -> int:
    """The builder's workspace pool: half of what the memory plan leaves free on the target, between 256 MiB and
    4 GiB. TensorRT's default is the whole device memory, which on a Jetson (memory shared with the CPU, weights
    and KV already resident) lets tactic timing run the device out of memory."""
    usable = target.usable_bytes()
    planned = (manifest.build or {}).get("memory_plan", {}).get("total_bytes")
    free = usable - int(planned) if planned else usable // 2
    return int(min(max(free // 2, 256 * MIB), 4 * GIB))


# -- ONNX graphs TensorRT's parser takes: exact cast islands -----------------------------------------------------------
def make_trt_ready(model, target):
    """Rewrite `model` in place (and return it) so TensorRT's parser takes each node's data type: nodes on a type
    their parser row lacks, for any of the target's TensorRT versions, get exact cast islands (lint.TYPE_ISLANDS: the
    island computes the same values as the original node).
    Graph inputs stay as they are: int64 I/O is native in TensorRT >= 9 (see the module docstring). Idempotent."""
    _add_islands(model, target)
    return model


def make_trt_ready_file(path: Path, target) -> dict[str, int]:
    """`make_trt_ready` on an ONNX file, rewritten in place without loading its external weights (which stay where
    they are). Returns what changed ({"CumSum:INT64->FLOAT": 1}); the file is left untouched when nothing did."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    changed = _add_islands(model, target)
    if changed:
        onnx.save(model, str(path))
    return changed


def _add_islands(model, target) -> dict[str, int]:
    import onnx
    from onnx import helper

    t = lint.tensorrt_target(target)
    specs = [lint.parser_spec(v) for v in t.tensorrt]
    types = lint.infer_types(model)
    nodes, changed = [], Counter()
    for node in model.graph.node:
        operand = lint.typed_operand(node) if node.domain in ("", "ai.onnx") else None
        ttype = lint.type_name(types[operand]) if operand in types else None
        island = lint.TYPE_ISLANDS.get((node.op_type, ttype))
        if island is None or all(ttype in s.ops.get(node.op_type, ()) for s in specs):
            nodes.append(node)
            continue
        compute, cast_inputs, _ = island
        original = types[operand]
        tag = onnx.TensorProto.DataType.Name(compute).lower()
        base = node.name or node.output[0]
        for i in cast_inputs:
            if len(node.input) > i and node.input[i]:
                cast_name = f"{node.input[i]}_trt_{tag}_{base}"
                nodes.append(helper.make_node("Cast", [node.input[i]], [cast_name], to=compute,
                                              name=f"{base}_trt_cast_in{i}"))
                node.input[i] = cast_name
        nodes.append(node)
        for j, out in enumerate(node.output):
            if out:
                inner = f"{out}_trt_{tag}"
                node.output[j] = inner
                nodes.append(helper.make_node("Cast", [inner], [out], to=original, name=f"{base}_trt_cast_out{j}"))
        changed[f"{node.op_type}:{ttype}->{onnx.TensorProto.DataType.Name(compute)}"] += 1
    if changed:
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        log.info("TensorRT cast islands: %s", dict(changed))
    return dict(changed)


RECHECK_MARGIN = 0.01  # cosine a degraded component's rewrite may lose: fp16 emulated in its gate, run here


def _recheck(stage: Path, manifest, name: str) -> dict:
    """Re-run a rewritten component on its golden inputs (ONNX Runtime, CPU) against the component's own gate; a
    component kept below its gate (--allow-degraded: a full-size random-weights int4 decoder) against where its
    gate left it, since the rewrite only adds casts."""
    comp = manifest.components[name]
    golden = dict(np.load(stage / manifest.golden))
    with OrtSession(stage / comp.file, ["CPUExecutionProvider"]) as sess:
        result = evaluate(sess.run, golden_cases(golden, name), gate_tolerance(name, comp.precision))
    fidelity = comp.fidelity or {}
    kept = fidelity.get("degraded") and result["worst"]["cosine"] >= fidelity["worst"]["cosine"] - RECHECK_MARGIN
    if not (result["passed"] or kept):
        raise MedcError(f"{name}: the TensorRT form of the graph no longer meets its gate (worst cosine "
                        f"{result['worst']['cosine']:.6f}); this is a medc bug, please report it. Nothing was written.")
    return result["worst"]


# -- trtexec -----------------------------------------------------------------------------------------------------------
def _dims(shape: list[int]) -> str:
    return "x".join(str(d) for d in shape)


def trtexec_command(component: str, onnx_file: str, shapes: dict[str, dict[str, list[int]]], rules: TrtRules,
                    workspace: int) -> list[str]:
    """The trtexec arguments that build the same engine as `finish_engines` (run from the bundle directory).
    Flags [trtexec-10]: --memPoolSize=workspace:N is in MiB [trtexec-8to10]; no precision flags at all: the
    graph is typed (TensorRT 11 removed --fp16/--int8/--best [trtexec-11])."""
    args = ["trtexec", f"--onnx={onnx_file}", f"--saveEngine=tensorrt/{component}.plan"]
    dynamic = {n: s for n, s in shapes.items() if s["min"] != s["max"]}
    if dynamic:  # static inputs need no shape flags
        for which in ("min", "opt", "max"):
            spec = ",".join(f"{n}:{_dims(s[which])}" for n, s in dynamic.items())
            args.append(f"--{which}Shapes={spec}")
    args += [f"--memPoolSize=workspace:{max(1, workspace // MIB)}", f"--timingCacheFile={TIMING_CACHE}"]
    if rules.trtexec_strongly_typed:
        args.append("--stronglyTyped")
    args.append("--skipInference")  # build only; `medc verify` checks the engine
    return args


def trtexec_script(manifest, target_name: str, profiles: dict, versions: list[str], workspace: int) -> str:
    """A bash script with one trtexec line per component and per TensorRT major version the target names; it picks
    the block for the installed trtexec (its banner "[TensorRT v100300]") or MEDC_TRT_MAJOR."""
    majors = sorted({rules_for(v).major: rules_for(v) for v in versions}.items())
    lines = [
        "#!/usr/bin/env bash",
        "# Build this bundle's TensorRT engines with trtexec, without TensorRT's Python bindings (generated by medc).",
        f"# Equivalent to `medc engines BUNDLE --target {target_name}` on the device, except that the manifest",
        "# is not updated: the runtime will not use engines built this way until `medc engines BUNDLE` records them.",
        f"# Written for TensorRT {', '.join(versions)}. UNVERIFIED on hardware with this medc version.",
        "set -euo pipefail",
        'cd "$(dirname "$0")/.."',
        'major="${MEDC_TRT_MAJOR:-$(trtexec --help 2>&1 | sed -n \'s/.*\\[TensorRT v\\([0-9]*\\)[0-9]\\{4\\}\\].*/\\1/p\''
        ' | head -n 1)}"',
        'case "$major" in',
    ]
    for major, rules in majors:
        lines.append(f"  {major})")
        for name, comp in engine_components(manifest).items():
            cmd = trtexec_command(name, comp.file, profiles[name], rules, workspace)
            lines.append("    " + " \\\n      ".join(cmd))
        lines.append("    ;;")
    lines += [f'  *) echo "trtexec reports TensorRT major version \'$major\'; this bundle was prepared for '
              f'TensorRT {", ".join(versions)} (set MEDC_TRT_MAJOR to override)." >&2; exit 2 ;;', "esac", ""]
    return "\n".join(lines)


def engine_components(manifest) -> dict:
    """The components that become TensorRT engines: all but those the build pinned to an ONNX Runtime provider (a
    token-embedding table that is the lm_head's stored rows, compile/embedding.py SHARED_FORM)."""
    return {n: c for n, c in manifest.components.items() if not c.quantization.get("provider")}


# -- the build host: a TRT-ready bundle --------------------------------------------------------------------------------
def prepare_bundle(stage: Path, manifest, target, context: int, max_batch: int) -> dict:
    """Make `stage` TRT-ready (before it is hashed) and return the record stored as `manifest.tensorrt`: profiles,
    cast islands, trtexec lines, then the lint of every graph against them as the last step."""
    stage = Path(stage)
    profiles = derive_profiles(manifest, target, context, max_batch)
    rewrites = {}
    for name, comp in engine_components(manifest).items():
        fixes = make_trt_ready_file(stage / comp.file, target)
        if fixes:
            rewrites[name] = {"cast_islands": fixes, "recheck_worst": _recheck(stage, manifest, name)}
    workspace = workspace_bytes(target, manifest)
    versions = list(target.tensorrt) or ["10.13"]
    (stage / "tensorrt").mkdir(exist_ok=True)
    (stage / PROFILES_FILE).write_text(json.dumps({"context": context, "max_batch": max_batch,
                                                   "profiles": profiles}, indent=2) + "\n")
    script = stage / TRTEXEC_FILE
    script.write_text(trtexec_script(manifest, target.name, profiles, versions, workspace))
    script.chmod(0o755)
    report = lint.lint_components(stage, manifest, target, profiles)
    blocked = {}
    for finding in report.errors:  # the parser (or the builder) would refuse these graphs: say why, per graph
        blocked.setdefault(finding.component or "bundle", []).append(finding.message)
    blocked = {name: "; ".join(dict.fromkeys(messages)) for name, messages in blocked.items()}
    for name, why in blocked.items():
        log.warning("TensorRT: %s: %s", name, why)
    record = {"target": target.name, "compute_capability": target.compute_capability, "tensorrt_versions": versions,
              "profiles": profiles, "context": context, "max_batch": max_batch, "workspace_bytes": workspace,
              "graph_rewrites": rewrites, "blocked": blocked, "engines": {},
              "lint": {"ok": report.ok, "errors": len(report.errors), "warnings": len(report.warnings)},
              "status": "trt-blocked" if blocked else "trt-ready", "unverified": UNVERIFIED}
    if not blocked and _can_build_here(target):
        log.info("TensorRT and a compute capability %s GPU are here: building the engines now",
                 target.compute_capability)
        record = _build_all(stage, manifest, record, target, log.info)
    return record


def _can_build_here(target) -> bool:
    import importlib.util

    if importlib.util.find_spec("tensorrt") is None:
        return False
    gpu = gpu_info()
    return gpu is not None and gpu[1] == target.compute_capability


# -- the device: engines -----------------------------------------------------------------------------------------------
def finish_engines(bundle_dir: Path, target_name: str | None = None, log=print, sign_key=None, trust=None):
    """On the device (`medc engines BUNDLE`): build the engines of a TRT-ready bundle in place. They go into a record
    of their own (records/tensorrt.json: the engines, their TensorRT version and GPU, their sha256), signed by
    `sign_key` (a medc.signing.PrivateKey: the device's) when given, so that the build's manifest and its signature
    stay as they were. Returns the manifest with the record applied."""
    bundle_dir = Path(bundle_dir)
    manifest = Manifest.read(bundle_dir)  # the build's own, before any record
    if target_name is not None and target_name != manifest.target:
        raise MedcError(f"bundle {bundle_dir} was built for target {manifest.target!r}, not {target_name!r}; finish it "
                        f"with --target {manifest.target}, or build a bundle for {target_name} "
                        f"(`medc build MODEL --target {target_name}`).")
    target = get_target(manifest.target)
    record = manifest.tensorrt or {}
    if target.engine != "tensorrt" or not record.get("profiles"):
        raise MedcError(f"bundle {bundle_dir} (target {manifest.target}) has no TensorRT stage; build it for a GPU "
                        "target that uses TensorRT (`medc targets` lists them), e.g. `medc build MODEL --target t4`.")
    if record.get("blocked"):
        raise MedcError("cannot build TensorRT engines: " + "; ".join(f"{n}: {w}" for n, w in record["blocked"].items())
                        + ".")
    _drop_unrecorded(bundle_dir, manifest)
    # Never add engines to a bundle whose graphs changed since the build, or whose signature the site does not trust.
    current = open_bundle(bundle_dir, trust=trust).manifest
    tensorrt, built = _build_all(bundle_dir, manifest, record, (current.tensorrt or {}).get("built_with") or {},
                                 target, log)
    # Swapped in together: an interruption before the record is written leaves plans no record lists, which the
    # next run removes (_drop_unrecorded) instead of refusing the bundle.
    (bundle_dir / RECORDS_DIR / "tensorrt.json").unlink(missing_ok=True)
    for tmp, final in built:
        os.replace(tmp, final)
    added = {e["file"]: e["sha256"] for e in tensorrt["engines"].values()}
    if (bundle_dir / TIMING_CACHE).is_file():
        added[TIMING_CACHE] = sha256_file(bundle_dir / TIMING_CACHE)
    Record(name="tensorrt", kind="tensorrt-engines", base=digest(read_json_file(bundle_dir)), files=added,
           data={"tensorrt": tensorrt}, created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
           ).write(bundle_dir, sign_key)
    current.tensorrt = tensorrt
    return current


def _drop_unrecorded(bundle_dir: Path, manifest) -> None:
    """Engine files of a run that ended before writing its record (medc's own names only)."""
    if (bundle_dir / RECORDS_DIR / "tensorrt.json").is_file():
        return
    (bundle_dir / RECORDS_DIR / "tensorrt.sig").unlink(missing_ok=True)
    folder = bundle_dir / "tensorrt"
    for f in [*folder.glob("*.plan"), *folder.glob(".*.tmp"), bundle_dir / TIMING_CACHE]:
        rel = f.relative_to(bundle_dir).as_posix()
        if rel not in manifest.files and f.is_file() and not f.is_symlink():
            f.unlink()


def _build_all(bundle_dir: Path, manifest, record: dict, previous: dict, target,
               log) -> tuple[dict, list[tuple[Path, Path]]]:
    """The tensorrt section with its engines, and the (temporary, final) path of each engine file written.
    `previous`: what an earlier run built with (its timing cache is reused on the same TensorRT and GPU)."""
    trt = import_tensorrt(target)
    gpu = gpu_info()
    if gpu is None:
        raise MedcError("no NVIDIA GPU is visible (cuda-python's cudaGetDeviceProperties and nvidia-smi both failed); "
                        "TensorRT engines must be built on the GPU that will run them. Install cuda-python "
                        "(`pip install cuda-python`) if the GPU is there.")
    name, cc = gpu
    if cc != target.compute_capability:
        raise MedcError(f"this GPU ({name}) has compute capability {cc}, but the bundle is for target {target.name} "
                        f"(compute capability {target.compute_capability}). TensorRT engines cannot be built for "
                        "another GPU: run this on the target device, or build a bundle for this GPU.")
    rules = rules_for(trt.__version__)
    if not any(rules.version == v or trt.__version__.startswith(v + ".") for v in record["tensorrt_versions"]):
        log(f"warning: TensorRT {trt.__version__} is not a version target {target.name} was written against "
            f"({', '.join(record['tensorrt_versions'])}); building anyway")
    cache_path = bundle_dir / TIMING_CACHE
    # A timing cache only helps (and is only accepted) on the TensorRT version and GPU that wrote it.
    same = previous.get("tensorrt_version") == trt.__version__ and previous.get("compute_capability") == cc
    cache = cache_path.read_bytes() if (same and cache_path.is_file()) else b""
    engines, built = {}, []
    for comp_name, comp in engine_components(manifest).items():
        log(f"TensorRT {trt.__version__}: building {comp_name} engine")
        t0 = time.perf_counter()
        # Components gated on absolute error (fp32: 1e-4) must not run their MatMuls in TF32.
        exact = gate_tolerance(comp_name, comp.precision).max_abs is not None
        plan, cache = _build_engine(trt, bundle_dir / comp.file, record["profiles"][comp_name],
                                    record["workspace_bytes"], cache, rules, no_tf32=exact)
        out = bundle_dir / "tensorrt" / f"{comp_name}.plan"
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_bytes(plan)
        built.append((tmp, out))
        engines[comp_name] = {"file": f"tensorrt/{comp_name}.plan", "sha256": sha256_file(tmp), "bytes": len(plan),
                              "seconds": round(time.perf_counter() - t0, 1)}
    if cache:
        tmp = cache_path.with_name(f".{cache_path.name}.tmp")
        tmp.write_bytes(cache)
        built.append((tmp, cache_path))
    return {**record, "engines": engines, "status": "engines-built",
            "built_with": {"tensorrt_version": trt.__version__, "compute_capability": cc, "gpu": name,
                           "strongly_typed": True, "workspace_bytes": record["workspace_bytes"]}}, built


def _build_engine(trt, onnx_path: Path, shapes: dict, workspace: int, cache: bytes, rules: TrtRules,
                  no_tf32: bool) -> tuple[bytes, bytes]:
    """One serialized engine and the updated timing cache. UNVERIFIED on hardware; each call cites its page."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)  # [builder-10] [builder-11]
    flags = 0
    if rules.strongly_typed_flag:  # 10.x; 11.x: deprecated and ignored, every network is strongly typed [builder-11]
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    # EXPLICIT_BATCH is not passed: "Ignored because networks are always explicit batch in TensorRT 10.0" [builder-10]
    network = builder.create_network(flags)  # [builder-10]
    parser = trt.OnnxParser(network, logger)  # [parser-10]
    # parse_from_file, not parse(bytes): it resolves external weights (`.data`) next to the model [parser-10]
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]  # [parser-10]
        raise MedcError(f"TensorRT's ONNX parser rejected {onnx_path.name}: {'; '.join(errors)[:600]}. "
                        "Check the TensorRT version against the target (`medc targets`); report it if it matches.")
    config = builder.create_builder_config()  # [builder-10]
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace))  # [config-10]
    if no_tf32 and hasattr(trt.BuilderFlag, "TF32"):  # TF32 is on by default; fp32 gates need real fp32 [config-10]
        config.clear_flag(trt.BuilderFlag.TF32)
    # No BuilderFlag.FP16/INT8/BF16 and no int8_calibrator: removed in 11 [removed-11]; precision is in the graph.
    profile = builder.create_optimization_profile()  # [builder-10]
    for name, s in shapes.items():
        profile.set_shape(name, s["min"], s["opt"], s["max"])  # [profile-10] [profile-11]
    config.add_optimization_profile(profile)  # [config-10]
    timing = config.create_timing_cache(cache)  # empty bytes: a new cache [config-10]
    config.set_timing_cache(timing, ignore_mismatch=False)  # [config-10]
    plan = builder.build_serialized_network(network, config)  # IHostMemory or None [builder-10] [typing-11]
    if plan is None:
        raise MedcError(f"TensorRT could not build an engine from {onnx_path.name} (see TensorRT's messages above); "
                        "a smaller --context or --max-batch lowers the memory it needs.")
    new_cache = config.get_timing_cache().serialize()  # [config-10]
    return bytes(plan), bytes(new_cache)
