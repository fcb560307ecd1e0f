"""The model registry: an explicit dict, no import side effects. Add a model by adding an entry here.

Architecture configs of the real models live here so that `--random-weights` builds and planning need no download.
"""

from __future__ import annotations

from medc.compile.models.gemma3_family import CHAT_TEMPLATE, GEMMA3, GEMMA3_TEXT
from medc.compile.models.siglip import SIGLIP
from medc.compile.spec import Family, ModelSpec

# Families by HF class; a local checkpoint is matched to one by its config.json "model_type".
FAMILIES: dict[str, Family] = {f.hf_class: f for f in (SIGLIP, GEMMA3, GEMMA3_TEXT)}


def family_for_model_type(model_type: str | None) -> Family | None:
    return next((f for f in FAMILIES.values() if model_type in f.model_types), None)


_SIGLIP_PREPROCESSOR = {
    "image_processor_type": "SiglipImageProcessor", "processor_class": "SiglipProcessor",
    "do_convert_rgb": True, "do_resize": True, "resample": 2, "do_rescale": True, "rescale_factor": 1 / 255,
    "do_normalize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
}


def _siglip_config(image_size, patch, hidden, ffn, layers, heads, vocab, text_len=64) -> dict:
    tower = {"hidden_size": hidden, "intermediate_size": ffn, "num_hidden_layers": layers,
             "num_attention_heads": heads, "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6}
    return {
        "model_type": "siglip",
        "text_config": {**tower, "model_type": "siglip_text_model", "vocab_size": vocab,
                        "max_position_embeddings": text_len, "projection_size": hidden,
                        "pad_token_id": 1, "bos_token_id": None, "eos_token_id": 1},
        "vision_config": {**tower, "model_type": "siglip_vision_model", "image_size": image_size,
                          "patch_size": patch, "num_channels": 3},
    }


def _gemma3_text(hidden, ffn, layers, heads, kv_heads, head_dim, qpas, vocab=262_208, window=1024, every=6,
                 max_positions=131_072) -> dict:
    """Gemma 3 decoder: every `every`-th layer global, the others sliding-window; linear RoPE x8 on global layers."""
    return {
        "model_type": "gemma3_text", "hidden_size": hidden, "intermediate_size": ffn, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
        "query_pre_attn_scalar": qpas, "vocab_size": vocab, "sliding_window": window,
        "layer_types": ["full_attention" if (i + 1) % every == 0 else "sliding_attention" for i in range(layers)],
        "max_position_embeddings": max_positions, "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": 1e-6,
        "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
                            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}},
        "final_logit_softcapping": None, "attn_logit_softcapping": None, "tie_word_embeddings": True,
        "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2,
    }


def _gemma3_mm(text: dict, image_size, patch, hidden, ffn, layers, heads, mm_tokens, boi, eoi, image) -> dict:
    return {
        "model_type": "gemma3", "text_config": text,
        "vision_config": {"model_type": "siglip_vision_model", "hidden_size": hidden, "intermediate_size": ffn,
                          "num_hidden_layers": layers, "num_attention_heads": heads, "image_size": image_size,
                          "patch_size": patch, "vision_use_head": False, "layer_norm_eps": 1e-6},
        "mm_tokens_per_image": mm_tokens, "boi_token_index": boi, "eoi_token_index": eoi, "image_token_index": image,
        "tie_word_embeddings": True,
    }


_GEMMA3_PREPROCESSOR = {
    "image_processor_type": "Gemma3ImageProcessor", "processor_class": "Gemma3Processor", "do_convert_rgb": True,
    "do_resize": True, "resample": 2, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
    "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "do_pan_and_scan": False,
}
# MedGemma 4B = Gemma 3 4B shape (shared/FACTS.md): 34 layers, 2560 wide, GQA 8/4, head 256; SigLIP 896 px.
_MEDGEMMA_4B = _gemma3_mm(_gemma3_text(2560, 10240, 34, 8, 4, 256, 256), 896, 14, 1152, 4304, 27, 16,
                          mm_tokens=256, boi=255_999, eoi=256_000, image=262_144)
_MEDGEMMA_4B_SPEC = dict(family=GEMMA3, config=_MEDGEMMA_4B, builtin_tokenizer="tiny-gemma-tokenizer.json",
                         chat_template=CHAT_TEMPLATE,
                         preprocessor={**_GEMMA3_PREPROCESSOR, "size": {"height": 896, "width": 896}})

MODELS: dict[str, ModelSpec] = {
    "medsiglip-448": ModelSpec(
        name="medsiglip-448", family=SIGLIP, hf_id="google/medsiglip-448",
        description="MedSigLIP-448: SigLIP image + text encoders (2 x 27 layers, 1152-d) for medical embeddings",
        config=_siglip_config(448, 14, 1152, 4304, 27, 16, vocab=32000),
        preprocessor={**_SIGLIP_PREPROCESSOR, "size": {"height": 448, "width": 448}},
        builtin_tokenizer="tiny-spiece.model",
    ),
    "medsiglip-tiny": ModelSpec(
        name="medsiglip-tiny", family=SIGLIP, tiny=True, seed=0,
        description="Tiny random SiglipModel with MedSigLIP's structure, for tests and the quick start",
        config=_siglip_config(224, 14, 64, 256, 2, 4, vocab=256),
        preprocessor={**_SIGLIP_PREPROCESSOR, "size": {"height": 224, "width": 224}},
        builtin_tokenizer="tiny-spiece.model",
    ),
    "medgemma-4b-it": ModelSpec(
        name="medgemma-4b-it", hf_id="google/medgemma-4b-it", **_MEDGEMMA_4B_SPEC,
        description="MedGemma 4B instruction-tuned: SigLIP 896 px vision + Gemma 3 4B decoder (chat)"),
    "medgemma-4b-pt": ModelSpec(
        name="medgemma-4b-pt", hf_id="google/medgemma-4b-pt", **{**_MEDGEMMA_4B_SPEC, "chat_template": None},
        description="MedGemma 4B pre-trained (base): plain completion, no chat template"),
    "medgemma-1.5-4b-it": ModelSpec(
        name="medgemma-1.5-4b-it", hf_id="google/medgemma-1.5-4b-it", **_MEDGEMMA_4B_SPEC,
        description="MedGemma 1.5 4B instruction-tuned (same architecture as MedGemma 4B)"),
    "medgemma-27b-text-it": ModelSpec(
        name="medgemma-27b-text-it", family=GEMMA3_TEXT, hf_id="google/medgemma-27b-text-it",
        description="MedGemma 27B text-only instruction-tuned (Gemma3ForCausalLM)",
        config=_gemma3_text(5376, 21504, 62, 32, 16, 128, 168), preprocessor={},
        builtin_tokenizer="tiny-gemma-tokenizer.json", chat_template=CHAT_TEMPLATE),
    "medgemma-tiny": ModelSpec(
        name="medgemma-tiny", family=GEMMA3, tiny=True, seed=0,
        description="Tiny random Gemma3ForConditionalGeneration: sliding + global layers, GQA, tiny SigLIP tower",
        config=_gemma3_mm(_gemma3_text(64, 128, 4, 4, 2, 16, 16, vocab=384, window=8, every=2, max_positions=512),
                          64, 8, 32, 64, 2, 2, mm_tokens=16, boi=6, eoi=7, image=8),
        preprocessor={**_GEMMA3_PREPROCESSOR, "size": {"height": 64, "width": 64}},
        builtin_tokenizer="tiny-gemma-tokenizer.json", chat_template=CHAT_TEMPLATE),
}
