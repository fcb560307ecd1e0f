"""Precision recipes: which precision each component (and the decoder's lm_head) is built in.

`--precision` takes a preset name from `PRESETS` or an explicit list (`vision_encoder=int8,decoder=int4`);
`--recipe FILE` (JSON or TOML) sets each component and the quantisation options:

    [precision]            # or "precision": {...} in JSON
    vision_encoder = "int8"
    decoder = "int4"
    lm_head = "int8"       # a part of the decoder graph with its own precision
    [options]
    int4_block_size = 64   # 32 (default), 64 or 128

A preset names one precision per component kind; a component (or a target) that lacks it steps down the chain
int4 -> int8 -> fp16 -> fp32 to the first precision both allow, and the plan says so. An explicit list or a recipe
file is taken literally: a precision the component or target lacks is an error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from medc.errors import MedcError
from medc.specs import PRECISIONS

STEP_DOWN = ("int4", "int8", "fp16", "fp32")


def plan_only(target) -> tuple[str, ...]:
    """Precisions `medc plan` sizes for `target` but this medc does not build: fp8 everywhere, and bf16 on GPU
    targets (TensorRT bf16/fp8 needs typed graphs). On CPU targets bf16 is built as OpenVINO IR (compile/openvino.py);
    ONNX Runtime's CPU provider has no bf16 kernels to gate it with."""
    return ("fp8",) if target.kind == "cpu" else ("bf16", "fp8")


@dataclass(frozen=True)
class Preset:
    description: str
    default: str  # every component and part not named below
    overrides: dict[str, str] = field(default_factory=dict)
    portable: dict[str, str] = field(default_factory=dict)  # the portable flavour's (TensorRT's) own overrides


# Documented presets (README "Precisions"). Encoders never go below int8: their activations are quantised too and
# int4 weight-only pays on memory-bound decode, not on a compute-bound 4096-patch vision encoder.
PRESETS: dict[str, Preset] = {
    "fp32": Preset("the reference: every component fp32", "fp32"),
    "fp16": Preset("GPU targets: every component fp16, Gemma 3's overflow-prone parts kept fp32", "fp16"),
    "int8": Preset("encoders int8 (calibrated Q/DQ or dynamic), decoder and lm_head int8 weight-only, token "
                   "embeddings int8 blocks", "int8"),
    # The lm_head too on the ORT flavour: its top 1024 logits are rescored from int8 rows, which wins back most of what
    # int4 costs it (README "Precisions"). The portable flavour (TensorRT) has no rescoring, and an int4 lm_head
    # without it costs Gemma 3 270M +10.9% perplexity (benchmarks/results/w4a16-270m.md): its lm_head is int8 and,
    # embeddings being tied, the same stored rows are the token embeddings (compile/embedding.py SHARED_FORM).
    # The token embeddings stay int8: TensorRT has no int4 form of a gathered table (compile/embedding.py), and on
    # the ORT flavour `embed_tokens=int4` is an explicit choice for its gate to decide.
    "int4": Preset("vision encoder int8, decoder int4 weight-only (blocks of 32), token embeddings int8; lm_head "
                   "int4 with its top logits rescored from int8 rows (ORT flavour) or int8 stored once with the "
                   "tied token embeddings (TensorRT targets)", "int4",
                   {"vision_encoder": "int8", "image_encoder": "int8", "text_encoder": "int8",
                    "embed_tokens": "int8"}, {"lm_head": "int8"}),
    # CPU targets only (plan_only): the encoders as OpenVINO IR computed in bf16 on AVX512_BF16 / AMX; decoders have
    # no bf16 form and step down to fp32.
    "bf16": Preset("CPU targets with AVX512_BF16 or AMX: encoders as OpenVINO IR computed in bf16 (weights stored "
                   "fp16); the decoder fp32", "bf16"),
}

OPTION_KEYS = {"int4_block_size": (32, 64, 128), "int8_block_size": (16, 32, 64, 128),
               "embed_block_size": (16, 32, 64, 128),  # a quantised token-embedding table's rows (compile/embedding.py)
               # ORT flavour, int4 lm_head: how many of its top logits are recomputed from int8 rows (0: none)
               "lm_head_rescore": (0, 64, 256, 1024, 4096),
               # which decoder projections an int4 decoder keeps in int4 (the others int8); default all
               "int4_projections": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")}


@dataclass(frozen=True)
class Recipe:
    precisions: dict[str, str]  # component or part name -> precision
    options: dict = field(default_factory=dict)
    source: str = "preset"  # "preset:NAME" | "explicit" | "file:NAME"
    notes: tuple[str, ...] = ()

    def to_json(self) -> dict:
        return {"source": self.source, "precisions": dict(self.precisions), "options": dict(self.options)}


def resolve(precision: str, recipe_file: Path | None, components, target, flavour: str | None = None) -> Recipe:
    """The recipe for `components` (ComponentSpecs) on `target` and graph `flavour` (default: the target's), from
    --precision or --recipe."""
    names = [c.name for c in components]
    allowed = {c.name: c.precisions for c in components}
    owner = {}  # part -> its component
    for c in components:
        for part in c.parts:
            names.append(part)
            allowed[part], owner[part] = c.precisions, c.name
    if recipe_file is not None:
        wanted, options = _read_recipe(Path(recipe_file))
        source = f"file:{Path(recipe_file).name}"
        return Recipe(_explicit(wanted, names, allowed, owner, target, source), options, source)
    value = precision.strip()
    if "=" in value:
        wanted = {}
        for item in value.split(","):
            name, _, prec = item.partition("=")
            wanted[name.strip()] = prec.strip()
        return Recipe(_explicit(wanted, names, allowed, owner, target, "--precision"), {}, "explicit")
    if value in plan_only(target):
        target.check_precision(value)  # "t4 does not support bf16: needs compute capability 8.0+"
        return Recipe({n: value for n in names}, {}, f"preset:{value}",
                      (f"{value} is sized by the planner but not built by this medc version; build fp16 "
                       "(Gemma 3's overflow-prone parts stay fp32) or int8/int4",))
    if value not in PRESETS:
        raise MedcError(f"unknown precision {value!r}; choose a preset ({', '.join(PRESETS)}) or list components "
                        f"({', '.join(names)}) as name=precision,...")
    preset, chosen, notes = PRESETS[value], {}, []
    if preset.default not in target.precisions:
        raise MedcError(f"target {target.name} does not offer {preset.default} (it offers "
                        f"{', '.join(target.precisions)}). " + " ".join(target.notes))
    portable = (flavour or target.graph_flavour) == "portable"
    for name in names:
        want = (preset.portable if portable else {}).get(name) or preset.overrides.get(name, preset.default)
        got = _step_down(want, allowed[name], target.precisions)
        if got != want:
            notes.append(f"{name} has no {want} form on target {target.name}; built in {got}")
        chosen[name] = got
    return Recipe(chosen, {}, f"preset:{value}", tuple(notes))


def _step_down(want: str, component: tuple[str, ...], target: tuple[str, ...]) -> str:
    for p in STEP_DOWN[STEP_DOWN.index(want):] if want in STEP_DOWN else (want, "fp32"):
        if p in component and p in target:
            return p
    return "fp32"


def _explicit(wanted: dict, names: list[str], allowed: dict, owner: dict, target, where: str) -> dict[str, str]:
    """Named components get their precision, others fp32; a part not named follows its component."""
    chosen = {n: "fp32" for n in names}
    for name, prec in wanted.items():
        if name not in chosen:
            raise MedcError(f"{where} names component {name!r}; this model has {', '.join(names)}.")
        if prec in plan_only(target):
            target.check_precision(prec)
            raise MedcError(f"{prec} is not built by this medc version (only sized by `medc plan`); "
                            "use fp16, int8 or int4 for " + name + ".")
        if prec not in PRECISIONS:
            raise MedcError(f"unknown precision {prec!r} for {name}; choose one of {', '.join(PRECISIONS)}.")
        if prec not in allowed[name]:
            raise MedcError(f"{name} cannot be built in {prec}; it allows {', '.join(allowed[name])}.")
        if prec not in target.precisions:
            raise MedcError(f"target {target.name} does not offer {prec} (it offers {', '.join(target.precisions)}). "
                            + " ".join(target.notes))
        chosen[name] = prec
    for part, comp in owner.items():
        if part not in wanted:
            chosen[part] = chosen[comp]
    return chosen


def _read_recipe(path: Path) -> tuple[dict, dict]:
    if not path.is_file():
        raise MedcError(f"recipe file {path} does not exist.")
    try:
        if path.suffix == ".toml":
            try:
                import tomllib
            except ImportError:  # Python 3.10 (JetPack 6): no TOML reader in the standard library
                raise MedcError(f"TOML recipes need Python 3.11+; write {path.name} as JSON instead.") from None

            data = tomllib.loads(path.read_text())
        else:
            data = json.loads(path.read_text())
    except ValueError as e:
        raise MedcError(f"recipe file {path.name} is not valid {'TOML' if path.suffix == '.toml' else 'JSON'}: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("precision"), dict):
        raise MedcError(f"recipe file {path.name} needs a 'precision' table: component = precision.")
    unknown = set(data) - {"precision", "options"}
    if unknown:
        raise MedcError(f"recipe file {path.name}: unknown section(s) {', '.join(sorted(unknown))}; "
                        "allowed: precision, options.")
    options = data.get("options", {})
    for key, value in options.items():
        if key not in OPTION_KEYS:
            raise MedcError(f"recipe option {key!r} is unknown; allowed: {', '.join(OPTION_KEYS)}.")
        if isinstance(value, list):
            bad = [v for v in value if v not in OPTION_KEYS[key]]
            if bad or not value:
                raise MedcError(f"recipe option {key} = {value!r}: choose from {', '.join(OPTION_KEYS[key])}.")
        elif value not in OPTION_KEYS[key] or key == "int4_projections":
            raise MedcError(f"recipe option {key} = {value!r}; allowed: {', '.join(map(str, OPTION_KEYS[key]))}.")
    return {str(k): str(v) for k, v in data["precision"].items()}, dict(options)
