"""The model registry: an explicit dict, no import side effects. Add a model by adding an entry here.

Architecture configs of the real models live here so that `--random-weights` builds and planning need no download.
"""

from __future__ import annotations

from medc.compile.models.siglip import SIGLIP
from medc.compile.spec import Family, ModelSpec

# Families by name; a local checkpoint is matched to one by its config.json "model_type".
FAMILIES: dict[str, Family] = {SIGLIP.name: SIGLIP}


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


MODELS: dict[str, ModelSpec] = {
    "medsiglip-448": ModelSpec(
        name="medsiglip-448", family=SIGLIP, hf_id="google/medsiglip-448",
        description="MedSigLIP-448: SigLIP image + text encoders (2 x 27 layers, 1152-d) for medical embeddings",
        config=_siglip_config(448, 14, 1152, 4304, 27, 16, vocab=32000),
        preprocessor={**_SIGLIP_PREPROCESSOR, "size": {"height": 448, "width": 448}},
    ),
    "medsiglip-tiny": ModelSpec(
        name="medsiglip-tiny", family=SIGLIP, tiny=True, seed=0,
        description="Tiny random SiglipModel with MedSigLIP's structure, for tests and the quick start",
        config=_siglip_config(224, 14, 64, 256, 2, 4, vocab=256),
        preprocessor={**_SIGLIP_PREPROCESSOR, "size": {"height": 224, "width": 224}},
    ),
}
