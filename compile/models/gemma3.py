"""Gemma 3 / MedGemma components: vision encoder, token embedding, and the decoder in its explicit (portable) form.

The decoder is our own forward over Hugging Face's modules (same weights, same norms, rotary and MLP), written with
explicit masks so that one graph serves prefill and decode and exports with dynamic batch, sequence and past length:
- image tokens of one image attend to each other in both directions during prefill (token_type_ids), as HF does;
- sliding-window layers see only keys within the window and return at most `window - 1` past tokens (all a next
  query can see), global layers keep everything; the manifest records this layout for the planner and runtime;
- logits only for the positions in `logits_positions` (the last one for generation: the vocab is 262k).
It is checked against HF's own forward (prefill and cached decode) in the tests. This is the portable flavour:
standard ONNX ops only, for ONNX Runtime and TensorRT alike. The ORT flavour's decoder is gemma3_gqa.py; the family
(both forms, bundle assets, the whole-model gate) is gemma3_family.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medc.compile.export import module_args
from medc.compile.models.siglip import builtin_images
from medc.compile.spec import ComponentSpec
from medc.errors import MedcError
from medc.runtime.gemma import build_prompt_batch
from medc.runtime.preprocess import image_files, load_image
from medc.specs import TensorSpec

# A few real prompts for the gate (no patient data).
PROMPTS = [
    "Describe the findings in this chest x-ray.",
    "Is there a pneumothorax?",
    "What is the most likely diagnosis for a patient with fever, cough and a lobar consolidation?",
    "List three causes of pleural effusion.",
]


def text_config(config):
    """The decoder's config: `text_config` of the multimodal model, or the causal LM's own config."""
    return getattr(config, "text_config", None) or config


def _parts(model):
    """(Gemma3TextModel, lm_head, vision tower or None, projector or None) of either HF class."""
    inner = model.model
    if hasattr(inner, "language_model"):  # Gemma3ForConditionalGeneration
        return inner.language_model, model.lm_head, inner.vision_tower, inner.multi_modal_projector
    return inner, model.lm_head, None, None  # Gemma3ForCausalLM


def kv_layout(tcfg) -> list[dict]:
    """Per layer: attention type and how many past tokens its KV cache keeps (None: all)."""
    return [{"type": t, "keep": (tcfg.sliding_window - 1) if t == "sliding_attention" else None}
            for t in tcfg.layer_types]


def kv_positions(text: dict, context: int) -> list[int]:
    """Past tokens each layer's cache holds at `context` (a text config dict; what the planner sizes): `kv_layout`."""
    window = text.get("sliding_window") or context
    return [min(context, window - 1) if t == "sliding_attention" else context for t in text["layer_types"]]


# -- modules ---------------------------------------------------------------------------------------------------------
def _decoder(model):
    import torch

    lm, head, _, _ = _parts(model)
    tcfg = lm.config
    neg = torch.finfo(torch.float32).min

    def rotate_half(z):
        half = z.shape[-1] // 2
        return torch.cat((-z[..., half:], z[..., :half]), dim=-1)

    class Decoder(torch.nn.Module):
        fixed_inputs = 5  # then past_key.0, past_value.0, past_key.1, ... as one tuple

        def __init__(self):
            super().__init__()
            self.lm, self.head = lm, head

        def forward(self, inputs_embeds, attention_mask, position_ids, token_type_ids, logits_positions, past):
            b, s, _ = inputs_embeds.shape
            total = attention_mask.shape[1]
            p = total - s  # past length of the global layers
            # Image blocks of this chunk: a block id per run of image tokens (0 = text).
            is_img = token_type_ids == 1
            prev = torch.nn.functional.pad(is_img, (1, 0), value=False)[:, :-1]
            block = torch.where(is_img, torch.cumsum((is_img & ~prev).to(torch.int64), dim=1), 0)
            q_pos = p + torch.arange(s).view(1, s, 1)
            k_pos = torch.arange(total).view(1, 1, total)
            key_block = torch.nn.functional.pad(block, (p, 0), value=0).unsqueeze(1)
            same_image = (block.unsqueeze(2) == key_block) & (block.unsqueeze(2) > 0)
            full_ok = attention_mask.bool().unsqueeze(1) & ((k_pos <= q_pos) | same_image)
            sliding_ok = full_ok & ((q_pos - k_pos) < tcfg.sliding_window)

            h = inputs_embeds
            rope = {t: self.lm.rotary_emb(h, position_ids, t) for t in set(tcfg.layer_types)}
            presents = []
            for i, layer in enumerate(self.lm.layers):
                kind, attn = tcfg.layer_types[i], layer.self_attn
                residual, x = h, layer.input_layernorm(h)
                q = attn.q_norm(attn.q_proj(x).view(b, s, -1, attn.head_dim).transpose(1, 2))
                k = attn.k_norm(attn.k_proj(x).view(b, s, -1, attn.head_dim).transpose(1, 2))
                v = attn.v_proj(x).view(b, s, -1, attn.head_dim).transpose(1, 2)
                cos, sin = (t.unsqueeze(1) for t in rope[kind])
                q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
                keys = torch.cat([past[2 * i], k], dim=2)
                values = torch.cat([past[2 * i + 1], v], dim=2)
                ok = (sliding_ok if kind == "sliding_attention" else full_ok)[:, :, total - keys.shape[2]:]
                # Grouped-query attention without repeating the cache: the `rep` query heads of one KV head are
                # one extra axis [b, kv, rep, s, d] that broadcasts against [b, kv, 1, total, d], so no step copies
                # the KV cache `rep` times (a copy that grows with the context).
                kv, rep = keys.shape[1], attn.num_key_value_groups
                qg = q.reshape(b, kv, rep, s, attn.head_dim)
                scores = (qg @ keys.unsqueeze(2).transpose(3, 4)) * attn.scaling
                if tcfg.attn_logit_softcapping is not None:
                    cap = tcfg.attn_logit_softcapping
                    scores = torch.tanh(scores / cap) * cap
                scores = scores.masked_fill(~ok[:, None, None], neg)
                out = torch.softmax(scores.float(), dim=-1) @ values.unsqueeze(2)
                out = attn.o_proj(out.reshape(b, kv * rep, s, attn.head_dim).transpose(1, 2).reshape(b, s, -1))
                h = residual + layer.post_attention_layernorm(out)
                h = h + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(h)))
                if kind == "sliding_attention":  # a later query sees at most window - 1 earlier keys
                    keys, values = keys[:, :, -(tcfg.sliding_window - 1):], values[:, :, -(tcfg.sliding_window - 1):]
                presents += [keys, values]
            return (vocab_logits(self.head, tcfg, self.lm.norm(h).index_select(1, logits_positions)), *presents)

    return Decoder().eval()


def vocab_logits(head, tcfg, h):
    """The vocabulary projection of the final hidden states, with Gemma's logit soft-capping where the config has it."""
    import torch

    logits = head(h)
    if tcfg.final_logit_softcapping is not None:
        cap = tcfg.final_logit_softcapping
        logits = torch.tanh(logits / cap) * cap
    return logits


def _embed_tokens(model):
    import torch

    lm, _, _, _ = _parts(model)

    class EmbedTokens(torch.nn.Module):  # Gemma scales embeddings by sqrt(hidden); HF's module includes it
        def __init__(self):
            super().__init__()
            self.embed = lm.embed_tokens

        def forward(self, input_ids):
            return self.embed(input_ids)

    return EmbedTokens().eval()


def _vision_encoder(model):
    import torch

    _, _, tower, projector = _parts(model)

    class VisionEncoder(torch.nn.Module):  # SigLIP tower + projector (RMSNorm, average pooling, projection)
        def __init__(self):
            super().__init__()
            self.tower, self.projector = tower, projector

        def forward(self, pixel_values):
            return self.projector(self.tower(pixel_values=pixel_values).last_hidden_state)

    return VisionEncoder().eval()


# -- inputs ------------------------------------------------------------------------------------------------------------
def _empty_past(tcfg, batch: int, lengths: dict[str, int]) -> dict[str, np.ndarray]:
    feeds = {}
    for i, layer in enumerate(kv_layout(tcfg)):
        n = lengths["sliding" if layer["keep"] is not None else "full"]
        for kv in ("key", "value"):
            feeds[f"past_{kv}.{i}"] = np.zeros((batch, tcfg.num_key_value_heads, n, tcfg.head_dim), np.float32)
    return feeds


def _decoder_dummy(loaded, batch, rng):
    tcfg = text_config(loaded.config)
    seq, past_full, past_sliding = 5, 4, 3  # distinct sizes so the exporter keeps the axes apart
    past = _empty_past(tcfg, batch, {"full": past_full, "sliding": min(past_sliding, tcfg.sliding_window - 1)})
    for name in past:
        past[name] = rng.standard_normal(past[name].shape).astype(np.float32)
    return {
        "inputs_embeds": rng.standard_normal((batch, seq, tcfg.hidden_size)).astype(np.float32),
        "attention_mask": np.ones((batch, past_full + seq), np.int64),
        "position_ids": np.tile(np.arange(past_full, past_full + seq), (batch, 1)).astype(np.int64),
        "token_type_ids": np.zeros((batch, seq), np.int64),
        "logits_positions": np.array([seq - 2, seq - 1], np.int64),
        **past,
    }


def prompt_feeds(loaded, prompts: list[str], images=None) -> dict[str, np.ndarray]:
    """Left-padded decoder feeds for a batch of prompts (each may hold one image), via the torch model."""
    import torch

    model = loaded.hf_model
    batch = build_prompt_batch(loaded.prompt_assets(), prompts, [images] * len(prompts) if images else None)
    with torch.no_grad():
        embeds = _embed_tokens(model)(torch.from_numpy(batch.input_ids)).numpy()
        if images:
            pixel_values = loaded.preprocessing(images)
            feats = _vision_encoder(model)(torch.from_numpy(pixel_values)).numpy()
            embeds[batch.input_ids == loaded.special_ids["image"]] = np.concatenate([feats] * len(prompts)).reshape(
                -1, embeds.shape[-1])
    tcfg = text_config(model.config)
    b, s = batch.input_ids.shape
    return {"inputs_embeds": embeds, "attention_mask": batch.attention_mask, "position_ids": batch.position_ids,
            "token_type_ids": batch.token_type_ids, "logits_positions": np.arange(s, dtype=np.int64),
            **_empty_past(tcfg, b, {"full": 0, "sliding": 0})}


def _decoder_golden(loaded):
    """Prefill of a real prompt (with an image on multimodal models) and a cached decode step at batch 3."""
    import torch

    model = loaded.hf_model
    has_vision = _parts(model)[2] is not None
    prefill = prompt_feeds(loaded, PROMPTS[:1], builtin_images()[:1] if has_vision else None)
    batch = prompt_feeds(loaded, PROMPTS[1:4])
    decoder = _decoder(model)
    comp = {c.name: c for c in components(model.config)}["decoder"]
    with torch.no_grad():
        outs = decoder(*module_args(decoder, comp, batch))
    b, s = batch["attention_mask"].shape
    last = np.asarray(outs[0][:, -1].argmax(-1))  # greedy next tokens
    next_embeds = _embed_tokens(model)(torch.from_numpy(last[:, None])).numpy()
    decode = {"inputs_embeds": next_embeds,
              "attention_mask": np.concatenate([batch["attention_mask"], np.ones((b, 1), np.int64)], axis=1),
              "position_ids": batch["position_ids"][:, -1:] + 1, "token_type_ids": np.zeros((b, 1), np.int64),
              "logits_positions": np.zeros(1, np.int64)}
    names = [t.name for t in comp.inputs[5:]]
    decode.update({n: o.numpy() for n, o in zip(names, outs[1:])})
    prefill["logits_positions"] = np.array([prefill["attention_mask"].shape[1] - 1], np.int64)
    return {"prefill_b1": prefill, "decode_b3": decode}


def _embed_dummy(loaded, batch, rng):
    vocab = text_config(loaded.config).vocab_size
    return {"input_ids": rng.integers(0, vocab, (batch, 7), dtype=np.int64)}


def _embed_golden(loaded):
    ids = build_prompt_batch(loaded.prompt_assets(), PROMPTS[:3]).input_ids
    return {"prompts_b3": {"input_ids": ids}, "prompt_b1": {"input_ids": ids[:1]}}


def _vision_dummy(loaded, batch, rng):
    v = loaded.config.vision_config
    return {"pixel_values": rng.uniform(-1, 1, (batch, 3, v.image_size, v.image_size)).astype(np.float32)}


def _vision_golden(loaded):
    images = builtin_images()
    return {"real_images_b3": {"pixel_values": loaded.preprocessing(images)},
            "real_image_b1": {"pixel_values": loaded.preprocessing(images[:1])}}


def _vision_calibration(loaded, folder):
    if folder is None:
        images = builtin_images()
        return [{"pixel_values": loaded.preprocessing([im])} for im in images], {"source": "builtin", "count": len(images)}
    files = image_files(Path(folder))
    return [{"pixel_values": loaded.preprocessing([load_image(f)])} for f in files], {"source": "user", "count": len(files)}


def _no_calibration(loaded, folder):
    raise MedcError("static int8 is for encoders only: decoders and embeddings use dynamic or weight-only int8.")


def components(config) -> tuple[ComponentSpec, ...]:
    """vision_encoder (multimodal models), embed_tokens and this file's decoder (explicit attention)."""
    tcfg = text_config(config)
    layout = kv_layout(tcfg)
    past, present = [], []
    for i, layer in enumerate(layout):
        axis = "past_sliding" if layer["keep"] is not None else "past_full"
        out_axis = "present_sliding" if layer["keep"] is not None else "total"
        for kv in ("key", "value"):
            past.append(TensorSpec(f"past_{kv}.{i}", "float32", ("batch", tcfg.num_key_value_heads, axis, tcfg.head_dim)))
            present.append(TensorSpec(f"present_{kv}.{i}", "float32",
                                      ("batch", tcfg.num_key_value_heads, out_axis, tcfg.head_dim)))
    comps = []
    if hasattr(config, "vision_config") and config.vision_config is not None:
        v = config.vision_config
        comps.append(ComponentSpec(
            name="vision_encoder",
            inputs=(TensorSpec("pixel_values", "float32", ("batch", 3, v.image_size, v.image_size)),),
            outputs=(TensorSpec("image_features", "float32", ("batch", config.mm_tokens_per_image, tcfg.hidden_size)),),
            extract=_vision_encoder, dummy_inputs=_vision_dummy, golden_inputs=_vision_golden,
            calibration=_vision_calibration, fusion_model_type="vit"))
    comps.append(ComponentSpec(
        name="embed_tokens",
        inputs=(TensorSpec("input_ids", "int64", ("batch", "seq")),),
        outputs=(TensorSpec("inputs_embeds", "float32", ("batch", "seq", tcfg.hidden_size)),),
        extract=_embed_tokens, dummy_inputs=_embed_dummy, golden_inputs=_embed_golden,
        # int8/int4: rows quantised in blocks, looked up and dequantised in the graph (compile/embedding.py)
        calibration=_no_calibration, precisions=("fp32", "fp16", "int8", "int4"), static_int8=False))
    comps.append(ComponentSpec(
        name="decoder",
        inputs=(TensorSpec("inputs_embeds", "float32", ("batch", "seq", tcfg.hidden_size)),
                TensorSpec("attention_mask", "int64", ("batch", "total")),
                TensorSpec("position_ids", "int64", ("batch", "seq")),
                TensorSpec("token_type_ids", "int64", ("batch", "seq")),
                TensorSpec("logits_positions", "int64", ("logits",)), *past),
        outputs=(TensorSpec("logits", "float32", ("batch", "logits", tcfg.vocab_size)), *present),
        extract=_decoder, dummy_inputs=_decoder_dummy, golden_inputs=_decoder_golden,
        calibration=_no_calibration, precisions=("fp32", "fp16", "int8", "int4"), static_int8=False,
        parts=("lm_head",)))
    return tuple(comps)


def default_context(config) -> int:
    """The context a build serves unless told (--context): 4096 tokens, or the model's limit when smaller."""
    return min(4096, int(text_config(config).max_position_embeddings))
