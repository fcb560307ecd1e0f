"""What `medc build` will do, decided before any weights are read.

`resolve` turns the MODEL argument (a registry name, a checkpoint folder, a GGUF file) into a `ResolvedModel`, once
per build; `make_plan` turns it and the `BuildOptions` into a `Plan`: the recipe, each component's conversion
candidates and graph optimiser, and the decoder's graph form and context. `medc build --dry-run` prints the plan,
the planner (compile/planner.py) sizes it, and the loader and the streamed path read the resolved model.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

from medc.compile import recipes
from medc.compile.embedding import SHARED_FORM, EmbeddingConfig, config_for as embedding_config, shares_head
from medc.compile.gguf import gguf_config
from medc.compile.hf import hf_config
from medc.compile.registry import FAMILIES, MODELS, family_for_model_type
from medc.compile.spec import DecoderForm, DecoderSettings, Family, ModelSpec
from medc.compile.weight_only import PROJECTIONS, WeightOnlyConfig
from medc.errors import MedcError
from medc.targets import Target, get_target

FLAVOURS = ("ort", "portable")  # decoder graphs: ONNX Runtime's fused ops, or standard ops (TensorRT)
DEFAULT_RESCORE = 1024  # an int4 lm_head's logits recomputed from int8 rows (weight_only.add_rescoring)


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
    sign_key: Path | None = None  # private key (medc keygen) that signs the manifest
    # CPU targets: which runtime's forms are built candidates: "ort" (ONNX Runtime), "openvino" (OpenVINO IR), or
    # "auto" (both, gated and timed; the fastest that passes is kept). Encoder components only: decoders stay on ONNX
    # Runtime (benchmarks/results/openvino-gemma3-270m.md). None: "ort", except bf16 components, which only
    # OpenVINO builds on a CPU.
    backend: str | None = None
    vocab: Path | None = None  # a `medc vocab` list: the decoder's lm_head keeps only its rows (compile/vocab.py)
    adapters: tuple[Path, ...] = ()  # PEFT LoRA adapter folders merged before export (compile/adapters.py)
    adapter_scale: float = 1.0  # multiplies each adapter's alpha / r
    adapter_slots: tuple[Path, ...] = ()  # adapters kept apart, activated per request (the decoder gets LoRA slots)


# -- the model ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSource:
    """Where a build's weights come from."""

    kind: str  # "tiny" (a built-in random model) | "random" (--random-weights) | "checkpoint"
    path: Path | None = None  # the checkpoint folder or GGUF file; None: a registry model whose weights are not here
    format: str = "safetensors"  # | "gguf"
    looked: tuple[str, ...] = ()  # where a registry model's weights were looked for


@dataclass(frozen=True)
class ResolvedModel:
    """The MODEL argument, resolved: its spec (family, registry entry or a spec made for a local file), its
    config.json and where its weights are."""

    spec: ModelSpec
    config: dict
    source: ModelSource

    @property
    def family(self) -> Family:
        return self.spec.family

    @cached_property
    def hf_config(self):
        """The transformers config object of `config` (imports transformers)."""
        return hf_config(self.spec.family, self.config)


def model_search_dirs(spec: ModelSpec) -> list[Path]:
    """Where a registry model's real weights are looked for, in order (then the Hugging Face cache, offline)."""
    dirs = []
    if os.environ.get("MEDC_MODELS"):
        dirs.append(Path(os.environ["MEDC_MODELS"]) / spec.name)
    dirs.append(Path.home() / ".cache" / "medc" / "models" / spec.name)
    return dirs


def _hf_cache_snapshot(hf_id: str) -> Path | None:
    """The locally cached snapshot of a hub repo, if any. Offline: never downloads."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(hf_id, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached (LocalEntryNotFoundError), or the hub library missing
        return None


def checkpoint_config(path: Path, family: Family | None = None) -> dict:
    """A checkpoint folder's config.json, checked to be a model medc builds (of `family`, when given)."""
    if not path.is_dir():
        raise MedcError(f"{path} is not a directory; pass a Hugging Face checkpoint directory "
                        "(config.json + *.safetensors).")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise MedcError(f"{path} is not a Hugging Face checkpoint: config.json is missing.")
    try:
        config = json.loads(cfg_file.read_text())
    except ValueError as e:
        raise MedcError(f"{cfg_file} is not valid JSON ({e}).") from None
    model_type = config.get("model_type")
    found = family_for_model_type(model_type)
    if found is None:
        kinds = ", ".join(f"{f.hf_class} ({'/'.join(f.model_types)})" for f in FAMILIES.values())
        raise MedcError(f"{path} holds a {model_type!r} model; medc builds {kinds}.")
    if family is not None and found is not family:
        raise MedcError(f"{path} holds a {model_type!r} model, but this model is a {family.hf_class}.")
    return config


def resolve(model: str, random_weights: bool = False) -> ResolvedModel:
    """The MODEL argument of `medc build` / `medc plan`, resolved without loading weights."""
    if model in MODELS:
        spec = MODELS[model]
        if spec.tiny or random_weights:
            return ResolvedModel(spec, spec.config, ModelSource("tiny" if spec.tiny else "random"))
        dirs = model_search_dirs(spec)
        looked = [str(d) for d in dirs]
        found = next((d for d in dirs if d.is_dir()), None)
        if found is None and spec.hf_id:
            found = _hf_cache_snapshot(spec.hf_id)
            looked.append(f"Hugging Face cache ({spec.hf_id}, offline)")
        if found is None:  # planning needs only the registry's config; loading says where to put the weights
            return ResolvedModel(spec, spec.config, ModelSource("checkpoint", None, looked=tuple(looked)))
        return ResolvedModel(spec, checkpoint_config(found, spec.family), ModelSource("checkpoint", found))
    path = Path(model)
    if not path.exists():
        raise MedcError(f"unknown model {model!r}: not a registered model ({', '.join(sorted(MODELS))}) and not a "
                        "local directory.")
    if random_weights:
        raise MedcError("--random-weights applies to registry names, not checkpoint directories.")
    if path.suffix == ".gguf" and path.is_file():
        config = gguf_config(path)
        spec = ModelSpec(name=path.stem, family=FAMILIES["Gemma3ForCausalLM"], config=config, preprocessor={},
                         description=f"Gemma 3 GGUF ({path.name}), dequantised to fp32")
        return ResolvedModel(spec, config, ModelSource("checkpoint", path.resolve(), "gguf"))
    config = checkpoint_config(path)
    family = family_for_model_type(config["model_type"])
    spec = ModelSpec(name=path.name, family=family, description=f"local {family.hf_class} checkpoint", config=config,
                     preprocessor={})
    return ResolvedModel(spec, config, ModelSource("checkpoint", path))


# -- the plan -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ComponentPlan:
    name: str
    precision: str
    methods: list[str]  # candidate conversions after export+optimise; several = measure and keep the fastest passing
    file: str
    weight_only: WeightOnlyConfig | None = None  # decoders: per-weight precisions, weight format, rescoring
    fp16_islands: bool = False  # decoders at fp16: Gemma 3's overflow-prone parts stay fp32 (compile/fp16.py)
    optimizer: str | None = None  # None: the build's --optimizer
    embedding: EmbeddingConfig | None = None  # a quantised token-embedding table: its form and block size

    def stages(self) -> list[str]:
        conv = " | ".join(self.methods) if self.methods else "none (fp32)"
        if self.embedding is not None and self.embedding.form == SHARED_FORM:
            conv += f" ({SHARED_FORM}, stored once with the decoder's)"
        elif self.embedding is not None:
            conv += f" ({self.embedding.form}, blocks of {self.embedding.block_size})"
        if self.methods and self.weight_only is not None:
            conv += f" (lm_head {self.weight_only.head_precision}, {self.weight_only.form}"
            conv += ", fp16 activations and KV cache)" if self.weight_only.activations == "float16" else ")"
        opt = "standard ONNX ops only (portable)" if self.optimizer == "none" else "transformer fusions"
        return ["export (torch.onnx dynamo, dynamic batch)", f"optimise ({opt})",
                f"convert: {conv}", "fidelity gate vs PyTorch fp32 on held-out inputs"]


@dataclass(frozen=True)
class Plan:
    model: str
    target: str
    out: Path
    components: list[ComponentPlan]
    source: str  # "tiny random" | "random weights" | "checkpoint"
    recipe: recipes.Recipe
    flavour: str
    family: str
    config: dict  # the HF config as a dict (the planner's input)
    decoder: DecoderSettings | None = None  # the decoder's graph form and context (None: no decoder)
    form: DecoderForm | None = None  # that form's description
    context: int | None = None  # as requested (--context); the planner's default otherwise
    max_batch: int = 1
    notes: list[str] = field(default_factory=list)
    lm_head_rows: int | None = None  # a reduced vocabulary's size (--vocab, set by its reader); None: all

    def recipe_record(self) -> dict:
        """The recipe as the manifest records it (`build.recipe`)."""
        return {**self.recipe.to_json(), "flavour": self.flavour}

    def render(self) -> str:
        lines = [f"medc build plan: {self.model} ({self.source}) -> {self.out}  [target {self.target}]",
                 f"  recipe ({self.recipe.source}): " + ", ".join(f"{k}={v}" for k, v in self.recipe.precisions.items())]
        for c in self.components:
            lines.append(f"  {c.name}: {c.precision} -> {c.file}")
            lines += [f"    {i}. {s}" for i, s in enumerate(c.stages(), 1)]
        lines += ["  bundle: tokenizer, preprocessor config, golden.npz (held-out inputs + reference outputs), "
                  "manifest.json (sha256 of every file)", "  write: temp dir beside OUT, renamed into place on success"]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


BACKENDS = ("ort", "openvino", "auto")


def _methods(precision: str, target: Target, comp, backend: str = "ort") -> list[str]:
    if precision == "bf16" and target.kind == "cpu":
        return ["ov-bf16"]
    if backend != "ort" and target.kind == "cpu" and comp.static_int8 and precision in ("fp32", "int8"):
        ov = ["ov-fp32"] if precision == "fp32" else ["ov-int8", "ov-int8-sq"]
        return ov if backend == "openvino" else (_methods(precision, target, comp) or ["fp32"]) + ov
    if precision in ("fp32", "bf16", "fp8"):  # GPU bf16, fp8: planned only (recipes.plan_only), refused by build()
        return []
    if precision == "fp16":
        return ["fp16"]
    if comp.name == "embed_tokens":  # a table read by rows: its own block form (compile/embedding.py)
        return ["embedding"]
    if not comp.static_int8:  # decoders: outliers, masks and prefill/decode shapes break activation ranges
        return ["weight-only"]
    return ["int8-static-qdq", "int8-dynamic"] if target.int8_method == "fastest" else ["int8-static-qdq"]


def attention_form(flavour: str, target: Target, decoder_precision: str) -> str:
    """The decoder's graph form (a key of `Family.forms`): "gqa", GroupQueryAttention with KV slots updated in
    place, for the ORT flavour on CPU targets; "explicit", standard ops, everywhere else. The slot form reads
    GroupQueryAttention's query_seqlens input, which onnxruntime-gpu (1.31.1) refuses as an invalid graph, and
    CUDA's GroupQueryAttention kernels take fp16/bf16 only; fp16 graphs need the fp32 islands medc.compile.fp16
    places in explicit graphs (benchmarks/results/cuda-check-h200.md)."""
    gqa = flavour == "ort" and target.kind == "cpu" and decoder_precision != "fp16"
    return "gqa" if gqa else "explicit"


def tied(config: dict) -> bool:
    """Whether the model's lm_head is its token-embedding table (Gemma 3: yes)."""
    return bool(config.get("text_config", config).get("tie_word_embeddings", True))


def without_sharing(plan: Plan) -> Plan:
    """`plan` with embed_tokens stored on its own (a reduced vocabulary's lm_head keeps fewer rows than the table)."""
    comps = []
    for c in plan.components:
        if c.embedding is not None and c.embedding.form == SHARED_FORM:
            c = replace(c, embedding=embedding_config(c.precision, plan.flavour,
                                                      int(plan.recipe.options.get("embed_block_size", 32))))
        elif c.weight_only is not None and c.weight_only.head_rows:
            c = replace(c, weight_only=replace(c.weight_only, head_rows=False))
        comps.append(c)
    return replace(plan, components=comps)


def _weight_only(recipe: recipes.Recipe, precision: str, flavour: str, form: DecoderForm,
                 target: Target, head_rows: bool = False) -> WeightOnlyConfig:
    """GPU targets run an int4/int8 decoder's activations and KV cache in fp16 (W4A16 / W8A16, with the fp16
    preset's fp32 islands): fp16 tensor cores, half the KV memory. CPUs keep fp32 activations (MatMulNBits' int8
    kernels quantise them per block at run time)."""
    o = recipe.options
    head = recipe.precisions.get("lm_head", precision)
    return WeightOnlyConfig(
        precision=precision, lm_head=head, form="qdq" if flavour == "portable" else "nbits",
        int4_projections=tuple(o.get("int4_projections", PROJECTIONS)),
        int4_block_size=int(o.get("int4_block_size", 32)), int8_block_size=int(o.get("int8_block_size", 16)),
        rescore=int(o.get("lm_head_rescore", DEFAULT_RESCORE)) if form.rescores and head == "int4" else 0,
        activations=gpu_activations(target, precision), head_rows=head_rows)


def gpu_activations(target: Target, decoder_precision: str) -> str:
    """The dtype of a decoder's activations and KV cache: "float16" for int4/int8/fp16 decoders on GPU targets."""
    return "float16" if target.kind == "gpu" and decoder_precision in ("int4", "int8", "fp16") else "float32"


def make_plan(opts: BuildOptions, model: ResolvedModel) -> Plan:
    target = get_target(opts.target)
    flavour = opts.flavour or target.graph_flavour
    if flavour not in FLAVOURS:
        raise MedcError(f"unknown graph flavour {flavour!r}; choose one of {', '.join(FLAVOURS)}.")
    if opts.backend is not None and opts.backend not in BACKENDS:
        raise MedcError(f"unknown backend {opts.backend!r}; choose one of {', '.join(BACKENDS)}.")
    if opts.backend not in (None, "ort") and target.kind != "cpu":
        raise MedcError(f"--backend {opts.backend} is for CPU targets; {target.name} runs ONNX Runtime / TensorRT.")
    family, config = model.family, model.hf_config
    comps = family.components(config)
    recipe = recipes.resolve(opts.precision, opts.recipe, comps, target, flavour)
    decoder = form = None
    if any(c.parts for c in comps):
        precision = recipe.precisions[next(c for c in comps if c.parts).name]
        decoder = DecoderSettings(attention_form(flavour, target, precision),
                                  opts.context or family.default_context(config))
        form = family.forms[decoder.form]
        comps = family.components(config, decoder)
    if opts.backend == "ort" and target.kind == "cpu" and "bf16" in recipe.precisions.values():
        raise MedcError("bf16 on a CPU target is built as OpenVINO IR (ONNX Runtime's CPU provider has no bf16 "
                        "kernels): drop --backend ort, or build int8 for ONNX Runtime.")
    plans, notes = [], list(recipe.notes)
    shared = shares_head(recipe.precisions, flavour, target.kind == "gpu", tied(model.spec.config), False)
    if shared:
        notes.append("embed_tokens reads the int8 lm_head's rows, stored once in the decoder's data file (the "
                     "engine holds the lm_head; embed_tokens runs on ONNX Runtime's CPU provider)")
    for c in comps:
        p = recipe.precisions[c.name]
        methods = _methods(p, target, c, opts.backend or "ort")
        if c.parts and not methods and any(recipe.precisions[part] != "fp32" for part in c.parts):
            methods = ["weight-only"]  # an fp32 decoder with a quantised lm_head
        # Standard ONNX ops only for TensorRT (its parser has no importer for ORT's fused contrib ops) and for the
        # portable decoder; the streamed path reads this too.
        optimizer = "none" if (flavour == "portable" and c.parts) or target.engine == "tensorrt" else None
        embed = None
        if methods == ["embedding"]:
            hidden = int(model.spec.config.get("text_config", model.spec.config)["hidden_size"])
            embed = (EmbeddingConfig(p, SHARED_FORM, hidden) if shared else
                     embedding_config(p, flavour, int(recipe.options.get("embed_block_size", 32))))
        plans.append(ComponentPlan(c.name, p, methods, f"{c.name}.onnx",
                                   _weight_only(recipe, p, flavour, form, target, shared) if c.parts else None,
                                   bool(c.parts), optimizer, embed))
    source = {"tiny": "tiny random", "random": "random weights"}.get(model.source.kind, "checkpoint")
    if source != "checkpoint":
        notes.append("random weights: the bundle is marked NOT FOR CLINICAL USE")
    if form is not None and form.note:
        notes.append(f"decoder: {form.note}, context {decoder.context} tokens")
    return Plan(model.spec.name, target.name, Path(opts.out), plans, source, recipe, flavour, family.name,
                model.spec.config, decoder, form, opts.context, opts.max_batch, notes)


def plan_for(opts: BuildOptions) -> Plan:
    """`make_plan` of the model `opts` names (for `--dry-run` and tools that have nothing resolved yet)."""
    return make_plan(opts, resolve(opts.model, opts.random_weights))
