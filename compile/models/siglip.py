"""SigLIP / MedSigLIP: two components (image and text encoder), each ending in the L2-normalised embedding.

logit_scale and logit_bias are not part of a graph: zero-shot scoring is one matmul the runtime does in numpy, and
keeping them in the manifest lets one image embedding be scored against any label set.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from medc.compile.spec import ComponentSpec, Family, builtin_data
from medc.errors import MedcError
from medc.runtime.preprocess import image_files, load_image
from medc.specs import TensorSpec

# Real prompts for the gate and for int8 calibration of the text encoder (no patient data: generic findings).
PROMPTS = [
    "a chest x-ray showing pneumothorax", "a chest x-ray with no acute findings", "pleural effusion",
    "cardiomegaly", "a fundus photograph with diabetic retinopathy", "normal fundus", "microaneurysms and hemorrhages",
    "a histopathology slide of adenocarcinoma", "benign tissue", "tumor infiltrating lymphocytes",
    "a dermatology photo of melanoma", "a benign nevus", "consolidation in the right lower lobe", "pulmonary edema",
    "a CT scan of the head without contrast", "an MRI of the shoulder", "an ultrasound image of the liver",
    "fracture of the left clavicle", "support devices in place", "lung opacity",
]

# CC0 images shipped with scikit-image: a retinal fundus photograph, immunohistochemistry, a retina crop.
_SKIMAGE_IMAGES = ("retina.jpg", "ihc.png", "microaneurysms.png")


def builtin_images() -> list:
    """Real medical images available offline (scikit-image's data folder). PIL images, RGB or greyscale."""
    from PIL import Image

    try:
        import skimage.data
    except ImportError:
        raise MedcError("scikit-image is needed for the built-in medical test images; install medc[build].") from None
    folder = Path(skimage.data.__file__).parent
    return [Image.open(folder / name).copy() for name in _SKIMAGE_IMAGES]


def _l2(x):
    return x / x.norm(p=2, dim=-1, keepdim=True)


def _image_encoder(model):
    import torch

    class ImageEncoder(torch.nn.Module):
        def __init__(self, vision_model):
            super().__init__()
            self.vision_model = vision_model

        def forward(self, pixel_values):
            return _l2(self.vision_model(pixel_values=pixel_values).pooler_output)

    return ImageEncoder(model.vision_model).eval()


def _text_reference(model):
    """HF's own text embedding (every layer over every token, then the last token): what the gate compares with."""
    import torch

    class TextReference(torch.nn.Module):
        # input_ids only, no attention mask: SigLIP is trained on max-length padded text without a mask, and
        # Google's MedSigLIP serving config takes input_ids alone.
        def __init__(self, text_model):
            super().__init__()
            self.text_model = text_model

        def forward(self, input_ids):
            return _l2(self.text_model(input_ids=input_ids).pooler_output)

    return TextReference(model.text_model).eval()


def _pooled_token_layer(layer, x):
    """HF's SiglipEncoderLayer for the last position only: its keys and values still come from every token, but
    its query, attention output, MLP and norms run on one row instead of max_length (64) rows."""
    import torch.nn.functional as F

    attn = layer.self_attn
    batch, _, dim = x.shape
    h = layer.layer_norm1(x)

    def heads(t):  # [B, T, D] -> [B, heads, T, head_dim]
        return t.view(batch, t.shape[1], -1, attn.head_dim).transpose(1, 2)

    q = heads(attn.q_proj(h[:, -1:]))
    out = F.scaled_dot_product_attention(q, heads(attn.k_proj(h)), heads(attn.v_proj(h)), scale=attn.scale)
    x = x[:, -1:] + attn.out_proj(out.transpose(1, 2).reshape(batch, 1, dim))
    return x + layer.mlp(layer.layer_norm2(x))


def _text_encoder(model):
    """The exported text encoder. SigLIP's text embedding is the last position's state (HF: `pooler_output =
    last_hidden_state[:, -1]`), so the last layer's work on the other 63 positions is thrown away: this module
    skips it (what that saves: benchmarks/results/design-measurements.md). The gate compares with `_text_reference` (HF's full computation), not with
    this."""
    import torch

    class TextEncoder(torch.nn.Module):
        def __init__(self, text_model):
            super().__init__()
            self.text_model = text_model

        def forward(self, input_ids):  # input_ids only, no mask: as `_text_reference`
            tm = self.text_model
            x = tm.embeddings(input_ids=input_ids)
            *body, last = tm.encoder.layers
            for layer in body:
                x = layer(x, None)
            x = _pooled_token_layer(last, x)
            return _l2(tm.head(tm.final_layer_norm(x[:, 0])))

    return TextEncoder(model.text_model).eval()


# -- inputs -------------------------------------------------------------------------------------------------------
def _image_dummy(loaded, batch, rng):
    p = loaded.preprocessing
    return {"pixel_values": rng.uniform(-1, 1, (batch, 3, p.height, p.width)).astype(np.float32)}


def _image_golden(loaded):
    rng = np.random.default_rng(1234)
    images = builtin_images()
    return {
        "real_images_b3": {"pixel_values": loaded.preprocessing(images)},
        "real_image_b1": {"pixel_values": loaded.preprocessing(images[:1])},
        "random_b1": _image_dummy(loaded, 1, rng),
    }


def _image_calibration(loaded, folder: Path | None):
    if folder is None:
        images = builtin_images()
        images += [im.transpose(0) for im in images]  # + horizontal flips
        return [{"pixel_values": loaded.preprocessing([im])} for im in images], {"source": "builtin", "count": len(images)}
    folder = Path(folder)
    if not folder.is_dir():
        raise MedcError(f"calibration folder {folder} does not exist; pass a folder of PNG, JPEG or DICOM images.")
    files = image_files(folder)
    if not files:
        raise MedcError(f"calibration folder {folder} holds no PNG, JPEG or DICOM images; add 16-64 representative "
                        "images.")
    feeds = [{"pixel_values": loaded.preprocessing([load_image(f)])} for f in files]
    return feeds, {"source": "user", "count": len(feeds)}


def _text_dummy(loaded, batch, rng):
    vocab = loaded.config.text_config.vocab_size
    ids = rng.integers(2, vocab, (batch, loaded.text_length), dtype=np.int64)
    return {"input_ids": ids}


def _text_golden(loaded):
    tok = loaded.tokenizer
    return {
        "prompts_b3": {"input_ids": tok(PROMPTS[:3])},
        "prompt_b1": {"input_ids": tok(PROMPTS[4:5])},
        "random_b1": _text_dummy(loaded, 1, np.random.default_rng(99)),
    }


def _text_calibration(loaded, folder):
    # Text calibration always uses the built-in prompt set: --calibration is a folder of images.
    return [{"input_ids": loaded.tokenizer([p])} for p in PROMPTS], {"source": "builtin-prompts", "count": len(PROMPTS)}


def components(config, decoder=None) -> tuple[ComponentSpec, ...]:
    v, t = config.vision_config, config.text_config
    dim_img, dim_txt = v.hidden_size, getattr(t, "projection_size", None) or t.hidden_size
    return (
        ComponentSpec(
            name="image_encoder",
            inputs=(TensorSpec("pixel_values", "float32", ("batch", 3, v.image_size, v.image_size)),),
            outputs=(TensorSpec("image_embeds", "float32", ("batch", dim_img)),),
            extract=_image_encoder, dummy_inputs=_image_dummy, golden_inputs=_image_golden,
            calibration=_image_calibration, fusion_model_type="vit",
        ),
        ComponentSpec(
            name="text_encoder",
            inputs=(TensorSpec("input_ids", "int64", ("batch", t.max_position_embeddings)),),
            outputs=(TensorSpec("text_embeds", "float32", ("batch", dim_txt)),),
            extract=_text_encoder, reference_extract=_text_reference, dummy_inputs=_text_dummy,
            golden_inputs=_text_golden,
            calibration=_text_calibration, fusion_model_type="vit",
        ),
    )


def write_assets(loaded, out: Path, decoder=None) -> dict:
    """Copy the tokenizer and preprocessor config into the bundle; return the manifest sections describing them."""
    (out / "tokenizer").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(loaded.tokenizer_file, out / "tokenizer" / "spiece.model")
    (out / "preprocessor_config.json").write_text(json.dumps(loaded.preprocessor_config, indent=2) + "\n")
    return {
        "tokenizer": {"kind": "siglip-sentencepiece", "file": "tokenizer/spiece.model",
                      "max_length": loaded.text_length, "do_lower_case": True,
                      "placeholder": loaded.source["kind"] == "random"},
        "preprocessing": {"image": loaded.preprocessing.to_json()},
    }


def extras(model) -> dict:
    return {"logit_scale": float(model.logit_scale.detach().reshape(-1)[0]),
            "logit_bias": float(model.logit_bias.detach().reshape(-1)[0])}


def prepare(loaded, checkpoint: Path | None) -> None:
    loaded.tokenizer_file = checkpoint / "spiece.model" if checkpoint else builtin_data(loaded.spec.builtin_tokenizer)


SIGLIP = Family(
    name="siglip", hf_class="SiglipModel", model_types=("siglip",), components=components,
    load_assets=write_assets, extras=extras, required_files=("spiece.model", "preprocessor_config.json"),
    prepare=prepare,
)
