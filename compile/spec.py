"""Build-time specs: what a model is made of and how to cut it into ONNX components.

Frozen dataclasses filled in explicitly (see `medc.compile.registry.MODELS`). Callables here take torch objects, but
nothing in this module imports torch, so `medc build --dry-run` and planning stay light.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import numpy as np

from medc.specs import TensorSpec


@dataclass(frozen=True)
class ComponentSpec:
    """One exported graph: the torch module cut from the HF model, its I/O and how it is tested and calibrated."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    extract: Callable[[Any], Any]  # HF model -> torch.nn.Module whose forward takes the inputs in order
    # (loaded model, batch, rng) -> feeds; export uses batch 2, the gate other batch sizes
    dummy_inputs: Callable[[Any, int, np.random.Generator], dict[str, np.ndarray]]
    # (loaded model) -> {case name: feeds}: held-out inputs for the fidelity gate (real images, real prompts)
    golden_inputs: Callable[[Any], dict[str, dict[str, np.ndarray]]]
    # (loaded model, calibration dir or None) -> (list of feeds, description without file names)
    calibration: Callable[[Any, Path | None], tuple[list[dict[str, np.ndarray]], dict]]
    precisions: tuple[str, ...] = ("fp32", "fp16", "bf16", "int8")  # bf16: CPU targets, as OpenVINO IR
    # ORT transformer-optimizer model type used for fusions (None: ORT's generic graph optimisations only)
    fusion_model_type: str | None = None
    # Static (calibrated) int8 activations: for encoders. Decoders and embeddings get dynamic / weight-only int8.
    static_int8: bool = True
    # Parts of this graph with a precision of their own in recipes (the decoder's "lm_head").
    parts: tuple[str, ...] = ()
    # Outputs the fidelity gate compares (None: all). A decoder that updates its KV buffers in place leaves rows a
    # step does not write unspecified, so only its logits are compared.
    gated_outputs: tuple[str, ...] | None = None
    # Build settings baked into the graph (e.g. the decoder's attention form and context): part of its identity.
    variant: dict = field(default_factory=dict)
    # HF model -> the module the fidelity gate compares against; None: `extract`'s. A graph that skips work whose
    # result HF throws away (the text encoder runs its last layer for the pooled token only) names HF's own
    # computation here, so the gate checks the skipping too.
    reference_extract: Callable[[Any], Any] | None = None

    def reference_module(self, hf_model):
        return (self.reference_extract or self.extract)(hf_model)

    def reference(self, outputs) -> dict[str, np.ndarray]:
        """The torch module's outputs (a tensor or tuple) as the gate's reference arrays, gated outputs only."""
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        return {t.name: o.float().numpy() for t, o in zip(self.outputs, outputs)
                if self.gated_outputs is None or t.name in self.gated_outputs}


@dataclass(frozen=True)
class DecoderSettings:
    """Build settings baked into a decoder graph: its form (a key of `Family.forms`) and the context it serves."""

    form: str
    context: int


@dataclass(frozen=True)
class DecoderForm:
    """One graph form of a family's decoder: how attention and the KV cache are laid out. The manifest records its
    name (`generation.attention`) and the runtime picks its decoder by it (medc.runtime.decoder.DECODERS)."""

    name: str
    # (HF config, context) -> the family's components with this decoder
    components: Callable[[Any, int], tuple[ComponentSpec, ...]]
    # (text config dict, context) -> positions each layer's KV cache holds (the planner sizes the cache by it)
    kv_positions: Callable[[dict, int], list[int]]
    # (HF text config, context) -> entries this form adds to the manifest's `generation` section
    generation: Callable[[Any, int], dict]
    # (text config dict, context) -> bytes of graph constants sized by the context (rotary tables)
    context_bytes: Callable[[dict, int], int] = lambda text, context: 0
    rescores: bool = False  # an int4 lm_head's top logits can be recomputed from int8 rows (ONNX Runtime's ops)
    note: str = ""  # how the build plan describes it


@dataclass(frozen=True)
class Family:
    """An architecture medc knows: one HF class, its components and its runtime assets (tokenizer, processor)."""

    name: str  # also the runtime pipeline key
    hf_class: str  # transformers class name
    model_types: tuple[str, ...]  # config.json "model_type" values this family accepts
    # (HF config, DecoderSettings or None) -> components; None for models without a decoder (and a decoder's
    # default form)
    components: Callable[..., tuple[ComponentSpec, ...]]
    # (loaded model, bundle dir, DecoderSettings or None) -> manifest sections it wrote
    load_assets: Callable[..., dict]
    extras: Callable[[Any], dict]  # (HF model) -> numbers the runtime needs (e.g. logit_scale)
    required_files: tuple[str, ...]  # files a local checkpoint directory must have besides weights
    # (loaded model, checkpoint dir or None for built-in/random) -> fills tokenizer file, chat template, special ids
    prepare: Callable[[Any, Path | None], None]
    # Generative models, real weights: a whole-model gate run through the runtime on the finished bundle.
    # gate_reference(loaded) -> reference (torch phase); gate_check(pipeline, reference, precisions) -> result
    gate_reference: Callable[[Any], dict] | None = None
    gate_check: Callable[[Any, dict, dict], dict] | None = None
    gate_min_context: int = 0  # the whole-model gate's perplexity windows: a real-weights build needs this context
    forms: dict[str, DecoderForm] = field(default_factory=dict)  # decoder graph forms by name; {} without a decoder
    # (HF config) -> the context a build serves unless told (--context); None without a decoder
    default_context: Callable[[Any], int] | None = None


@dataclass(frozen=True)
class ModelSpec:
    """A registered model: a family plus the real architecture config, so random-weight builds work offline."""

    name: str
    family: Family
    description: str
    config: dict  # the HF config.json of the real model (architecture only)
    preprocessor: dict  # the HF preprocessor_config.json
    hf_id: str | None = None  # where the real weights live on the Hugging Face Hub
    tiny: bool = False  # a built-in test model: random weights, always available
    seed: int = 0
    # Tokenizer used for tiny and --random-weights builds (a file in medc/compile/data), and its chat template
    builtin_tokenizer: str | None = None
    chat_template: str | None = None


def builtin_data(name: str) -> Path:
    """A file shipped in medc/compile/data (the tiny models' tokenizers)."""
    return Path(str(resources.files("medc.compile").joinpath(f"data/{name}")))
