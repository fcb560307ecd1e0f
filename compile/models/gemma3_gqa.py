"""The Gemma 3 decoder in its ORT flavour ("gqa"): one GroupQueryAttention node per layer, the KV cache updated in
place in per-sequence slots (runtime/kvcache.py), and every other op run on a step's real tokens only; for CPU
targets. How the graph is laid out is the comment below the imports."""

from __future__ import annotations

import numpy as np

from medc.compile.export import module_args
from medc.compile.models import gemma3
from medc.compile.models.siglip import builtin_images
from medc.compile.spec import ComponentSpec
from medc.runtime.decoder import image_attention
from medc.runtime.gemma import build_prompt_batch
from medc.runtime.kvcache import resident, sliding_capacity, token_rows
from medc.specs import TensorSpec

# The portable decoder (gemma3.py) concatenates past and new keys every step (a copy that grows with the context) and
# spells attention out in ~60 standard ops per layer. This one hands each layer's attention to one
# `com.microsoft.GroupQueryAttention` node: rotary embedding (from cos/sin tables of the build's context), causal and
# sliding-window masks, grouped heads, and a cache that is both input and output (the runtime binds one buffer to
# both, runtime/kvcache.py). Sliding layers use the operator's window-sized cache (`sliding_window_cache`), so they
# hold about W positions whatever the context.
#
# Gemma 3 lets the image tokens of one image attend to each other in both directions during prefill, which no fused
# attention kernel expresses (vLLM and SGLang special-case it too). Here a prompt with images is prefilled in one step
# from an empty slot, and for the image rows only, each layer recomputes attention explicitly over the step's own keys
# with the mask the runtime gives (`image_bias`, from `medc.runtime.decoder.image_attention`), replacing those rows of
# the fused result. That branch sits in an `If` (torch.cond) that text and decode steps skip; text-only models
# (Gemma 3 270M, MedGemma 27B text) have neither the If nor the branch.
#
# Inputs per step (runtime/decoder.py SlotDecoder): embeddings [B, S, H] right-padded per row; `query_seqlens` [B] valid rows per
# slot (0: idle); `token_rows` [T] the flat positions (row * S + column) of those valid rows, in order; `seqlens_k` [B]
# tokens the slot holds after the step minus one; `total_sequence_length` their max; `logits_index` [B, L] the rows
# whose logits are wanted (vocab is 262k: the last valid row when generating).
# The eager forward (used for the build's reference outputs) implements the operator's documented semantics in torch.
#
# Everything but attention runs on the T real tokens only (`token_rows`), the flat layout vLLM and llama.cpp batch in;
# only the GroupQueryAttention node sees the padded [B, S] layout it needs. That is what lets one step carry a new
# prompt's chunk and the other slots' decode tokens together (runtime/batch.py): padded, a 16-token prompt beside
# three decoding slots would run 64 rows through every projection, packed it runs 19. Moving between the layouts costs
# two GatherND and a Concat per layer (benchmarks/results/design-measurements.md).
#
# An int4 lm_head gets its top logits rescored from int8 rows by the weight-only conversion, an edit of the converted
# graph (`medc.compile.weight_only.add_rescoring`): the export is the same for every precision.


def rotate(x, cos, sin):
    """Rotary embedding, rotate-half layout (GroupQueryAttention's rotary_interleaved=0, as HF's Gemma 3)."""
    import torch

    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def _gqa_reference(q, k, v, past_k, past_v, seqlens_k, qlens, cos, sin, heads, kv_heads, scale, window, windowed):
    """GroupQueryAttention (do_rotary, shared past/present buffer, query_seqlens, optional windowed cache) in torch,
    row by row as its documentation states it. Output rows past a row's query length are zero (unspecified there)."""
    import torch

    b_, _, _ = q.shape
    cap, d = past_k.shape[2], past_k.shape[3]
    rep = heads // kv_heads
    out = torch.zeros_like(q)
    pk, pv = past_k.clone(), past_v.clone()
    for b in range(b_):
        t, n = int(seqlens_k[b]) + 1, int(qlens[b])
        if n == 0:
            continue
        p = t - n
        pos = torch.arange(p, t)
        qq = rotate(q[b, :n].view(n, heads, d), cos[pos][:, None], sin[pos][:, None])
        kk = rotate(k[b, :n].view(n, kv_heads, d), cos[pos][:, None], sin[pos][:, None])
        held = resident(p, cap, window if windowed else None)
        keys = torch.cat([past_k[b, :, :held], kk.transpose(0, 1)], 1)
        vals = torch.cat([past_v[b, :, :held], v[b, :n].view(n, kv_heads, d).transpose(0, 1)], 1)
        kpos = torch.arange(p - held, t)
        ok = kpos[None] <= pos[:, None]
        if window > 0:
            ok &= (pos[:, None] - kpos[None]) < window
        scores = (qq.view(n, kv_heads, rep, d).permute(1, 2, 0, 3) @ keys[:, None].transpose(-1, -2)) * scale
        o = torch.softmax(scores.masked_fill(~ok, float("-inf")), -1) @ vals[:, None]
        out[b, :n] = o.permute(2, 0, 1, 3).reshape(n, -1)
        if windowed:
            keep = resident(t, cap, window)
            pk[b, :, :keep], pv[b, :, :keep] = keys[:, -keep:], vals[:, -keep:]
        else:
            pk[b, :, p:t], pv[b, :, p:t] = keys[:, held:], vals[:, held:]
    return out, pk, pv


def gqa(qkv, past_k, past_v, seqlens_k, total, qlens, cos, sin, heads: int, kv_heads: int, scale: float,
        window: int, windowed: bool):
    """One GroupQueryAttention node (packed QKV [B, S, (heads + 2 kv_heads) d]) when exporting; its reference
    semantics when run eagerly."""
    import torch

    if not torch.onnx.is_in_onnx_export():
        q, k, v = qkv.split([heads * past_k.shape[-1], kv_heads * past_k.shape[-1], kv_heads * past_k.shape[-1]], -1)
        return _gqa_reference(q, k, v, past_k, past_v, seqlens_k, qlens, cos, sin, heads, kv_heads, scale, window,
                              windowed)
    attrs = dict(num_heads=heads, kv_num_heads=kv_heads, scale=scale, local_window_size=window, do_rotary=1)
    if windowed:
        attrs["sliding_window_cache"] = 1
    # Inputs by position: query, key, value (absent: packed in the query), past key/value, seqlens_k,
    # total_sequence_length, cos_cache, sin_cache, position_ids, attention_bias, head_sink, k_scale, v_scale,
    # q_norm_weight, k_norm_weight (CUDA/WebGPU only), query_seqlens.
    d = past_k.shape[-1]
    return torch.onnx.ops.symbolic_multi_out(
        "com.microsoft::GroupQueryAttention",
        [qkv, None, None, past_k, past_v, seqlens_k, total, cos, sin, None, None, None, None, None, None, None, qlens],
        attrs, dtypes=[qkv.dtype, past_k.dtype, past_v.dtype],
        shapes=[(*qkv.shape[:2], heads * d), past_k.shape, past_v.shape], version=1)


def gather_nd(x, index):
    """x[index[..., 0], index[..., 1], ...] as ONE GatherND node: a step's moves between the real tokens and the
    padded layout run once per layer, and spelled with reshapes and a Gather they cost 2-3 nodes each."""
    import torch

    if not torch.onnx.is_in_onnx_export():
        return x[tuple(index.unbind(-1))]
    return torch.onnx.ops.symbolic("::GatherND", [x, index], {}, dtype=x.dtype,
                                   shape=(*index.shape[:-1], *x.shape[index.shape[-1]:]))


def _image_rows_attention(out, qkv, rows, bias, cos, sin, scale):
    """Attention of a prompt's image rows over the step's own keys with the runtime's bidirectional mask `bias`
    (batch 1, empty cache: positions are row numbers). out [b, s, heads d], qkv [b, s, (heads + 2 kv_heads) d]."""
    import torch

    b, s, _ = qkv.shape
    d = 2 * cos.shape[-1]  # the tables hold half a head
    heads, kv_heads = out.shape[-1] // d, (qkv.shape[-1] - out.shape[-1]) // (2 * d)
    q, k, v = qkv.split([heads * d, kv_heads * d, kv_heads * d], -1)
    q, k = q.reshape(b, s, heads, d), k.reshape(b, s, kv_heads, d)
    c, sn = cos[:s][:, None], sin[:s][:, None]
    qi = rotate(q, c, sn).index_select(1, rows).reshape(b, -1, kv_heads, heads // kv_heads, d).permute(0, 2, 3, 1, 4)
    kt = rotate(k, c, sn).permute(0, 2, 3, 1).unsqueeze(2)  # [b, kv, 1, d, s]
    scores = (qi @ kt) * scale + bias
    vv = v.reshape(b, s, kv_heads, d).permute(0, 2, 1, 3).unsqueeze(2)
    rows_out = (torch.softmax(scores, -1) @ vv).permute(0, 3, 1, 2, 4).reshape(b, -1, heads * d)
    return out.index_copy(1, rows, rows_out)


def _unchanged(out, qkv, rows, bias, cos, sin, scale):
    return out.clone()


def _decoder(model, context: int):
    import torch

    lm, head, vision, _ = gemma3._parts(model)
    tcfg = lm.config
    kinds = tcfg.layer_types
    # Text-only models (Gemma 3 270M, MedGemma 27B text) have no image rows: without the If, a decode step saves a
    # subgraph call per layer. The inputs stay, unused, so one runtime feeds both.
    images = vision is not None

    class Decoder(torch.nn.Module):
        fixed_inputs = 8  # then past_key.0, past_value.0, ... as one tuple

        def __init__(self):
            super().__init__()
            self.lm, self.head = lm, head
            positions = torch.arange(context)[None]
            for kind in sorted(set(kinds)):  # cos/sin tables [context, head_dim / 2] per rotary kind
                cos, sin = lm.rotary_emb(torch.zeros(1), positions, kind)
                half = tcfg.head_dim // 2
                self.register_buffer(f"cos_{kind}", cos[0, :, :half].contiguous(), persistent=False)
                self.register_buffer(f"sin_{kind}", sin[0, :, :half].contiguous(), persistent=False)

        def forward(self, inputs_embeds, seqlens_k, total_sequence_length, query_seqlens, token_rows, logits_index,
                    image_rows, image_bias, past):
            b, s, _ = inputs_embeds.shape
            t = token_rows.shape[0]

            # The real tokens as [1, T, C] (3-D, so projections export as MatMul: the weight-only quantisers
            # convert MatMul, not Gemm), and for each position of the padded layout the real token it shows: padding
            # shows token 0, whose rows GroupQueryAttention never reads (query_seqlens) nor writes to the cache.
            shown = torch.zeros(b * s, dtype=torch.int64).index_copy(0, token_rows, torch.arange(t))
            zeros = torch.zeros_like(shown)
            to_padded = torch.stack([zeros, shown], -1).view(b, s, 2)  # [1, T, C] -> [B, S, C]
            row = torch.div(token_rows, s, rounding_mode="floor")  # (aten.remainder by a symbolic size fails to export)
            to_real = torch.stack([row, token_rows - row * s], -1).unsqueeze(0)  # [B, S, C] -> [1, T, C]
            h = gather_nd(inputs_embeds, to_real)
            scale = torch.full((), float(self.lm.layers[0].self_attn.scaling))  # the same in every layer
            biases = {False: image_bias[0], True: image_bias[1]}  # global, sliding
            presents = []
            for i, layer in enumerate(self.lm.layers):
                attn, sliding = layer.self_attn, kinds[i] == "sliding_attention"
                cos, sin = getattr(self, f"cos_{kinds[i]}"), getattr(self, f"sin_{kinds[i]}")
                d = attn.head_dim
                residual, x = h, layer.input_layernorm(h)
                q = attn.q_norm(attn.q_proj(x).view(1, t, -1, d))
                k = attn.k_norm(attn.k_proj(x).view(1, t, -1, d))
                heads, kv_heads = q.shape[2], k.shape[2]
                qkv = torch.cat([q.reshape(1, t, heads * d), k.reshape(1, t, kv_heads * d), attn.v_proj(x)], -1)
                qkv = gather_nd(qkv, to_padded)  # the padded layout attention needs
                out, pk, pv = gqa(qkv, past[2 * i], past[2 * i + 1], seqlens_k, total_sequence_length,
                                  query_seqlens, cos, sin, heads, kv_heads, float(attn.scaling),
                                  tcfg.sliding_window if sliding else -1, sliding)

                # The exporter traces each torch.cond's branches with dynamo: module-level functions whose per-layer
                # values come as tensor operands trace faster than a closure per layer over its modules.
                if images:
                    out = torch.cond(image_rows.shape[0] > 0, _image_rows_attention, _unchanged,
                                     (out, qkv, image_rows, biases[sliding], cos, sin, scale))
                out = gather_nd(out, to_real)
                h = residual + layer.post_attention_layernorm(attn.o_proj(out))
                h = h + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(h)))
                presents += [pk, pv]
            wanted = shown.index_select(0, (torch.arange(b).unsqueeze(1) * s + logits_index).reshape(-1))
            h = self.lm.norm(gather_nd(h, torch.stack([torch.zeros_like(wanted), wanted], -1).view(b, -1, 2)))
            return (gemma3.vocab_logits(self.head, tcfg, h), *presents)

    return Decoder().eval()


# -- layout, inputs ----------------------------------------------------------------------------------------------------
def kv_positions(text: dict, context: int) -> list[int]:
    """Rows of each layer's slot buffer (a text config dict): the context on global layers, a window and its slack
    on sliding ones (runtime/kvcache.py sliding_capacity)."""
    window = text.get("sliding_window") or context
    return [sliding_capacity(window) if t == "sliding_attention" else context for t in text["layer_types"]]


def capacities(tcfg, context: int) -> list[int]:
    return kv_positions({"layer_types": tcfg.layer_types, "sliding_window": tcfg.sliding_window}, context)


def rotary_table_bytes(text: dict, context: int) -> int:
    """The cos and sin tables the graph holds: [context, head_dim / 2] fp32 per rotary kind (global, sliding)."""
    kinds = len(set(text.get("layer_types", ()))) or 1
    return 2 * kinds * context * (text["head_dim"] // 2) * 4


def kv_cache(tcfg, context: int) -> dict:
    """The manifest's `generation.kv_cache`: what the runtime allocates and the planner sizes."""
    return {"form": "slots", "context": context, "capacity": capacities(tcfg, context),
            "window": tcfg.sliding_window}


def generation(tcfg, context: int) -> dict:
    """What this form adds to the manifest's `generation` section: slots sized for the build's context, and each
    layer's buffer rows as its KV layout."""
    kv = kv_cache(tcfg, context)
    return {"kv_cache": kv, "max_positions": context,
            "kv_layout": [{"type": t, "keep": cap if t == "sliding_attention" else None}
                          for t, cap in zip(tcfg.layer_types, kv["capacity"])]}


def step_feeds(tcfg, embeds, held, new, logits_index, past, image_rows=None, image_bias=None) -> dict:
    """Decoder feeds for slots holding `held` tokens, adding `new` (right-padded rows of `embeds`)."""
    b, s, _ = embeds.shape
    total = np.asarray(held) + np.asarray(new)
    return {"inputs_embeds": embeds.astype(np.float32), "seqlens_k": np.maximum(total - 1, 0).astype(np.int32),
            "total_sequence_length": np.array(max(int(total.max()), 1), np.int32),
            "query_seqlens": np.asarray(new, np.int32), "token_rows": token_rows(new, s),
            "logits_index": np.asarray(logits_index, np.int64),
            "image_rows": np.zeros(0, np.int64) if image_rows is None else image_rows,
            "image_bias": np.zeros((2, 0, s), np.float32) if image_bias is None else image_bias, **past}


def _empty_past(tcfg, batch: int, caps: list[int]) -> dict[str, np.ndarray]:
    return {f"past_{kv}.{i}": np.zeros((batch, tcfg.num_key_value_heads, c, tcfg.head_dim), np.float32)
            for i, c in enumerate(caps) for kv in ("key", "value")}


def _dummy(loaded, batch, rng, context):
    tcfg = gemma3.text_config(loaded.config)
    # distinct sizes so the exporter keeps the axes apart; 2 image rows so the If keeps both branches
    caps = [11 if t == "sliding_attention" else 13 for t in tcfg.layer_types]
    past = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in _empty_past(tcfg, batch, caps).items()}
    embeds = rng.standard_normal((batch, 5, tcfg.hidden_size)).astype(np.float32)
    # 4 of 5 columns per row: the token count (4 * batch) differs from every other axis
    feeds = step_feeds(tcfg, embeds, [3] * batch, [4] * batch, np.tile([[1, 2, 3]], (batch, 1)), past,
                       np.array([1, 2], np.int64), np.zeros((2, 2, 5), np.float32))
    return feeds


def _golden(loaded, context):
    """Held-out steps, references from the eager forward: an image (or text) prompt prefilled from an empty slot;
    three text prompts prefilled together right-padded; then one decode step of those three slots."""
    import torch

    model = loaded.hf_model
    tcfg = gemma3.text_config(model.config)
    has_vision = gemma3._parts(model)[2] is not None
    assets = loaded.prompt_assets()
    comp = {c.name: c for c in components_for(model.config, context)}["decoder"]
    decoder = comp.extract(model)
    emb = gemma3._embed_tokens(model)

    def run(feeds):
        with torch.no_grad():
            outs = decoder(*module_args(decoder, comp, feeds))
        return [o.numpy() for o in outs]

    first = gemma3.prompt_feeds(loaded, gemma3.PROMPTS[:1], builtin_images()[:1] if has_vision else None)
    s = first["inputs_embeds"].shape[1]
    caps = [min(c, s + 8) if c == context else c for c in capacities(tcfg, context)]  # small golden buffers
    rows, bias = image_attention(first["token_type_ids"][0] == 1, tcfg.sliding_window)
    prefill = step_feeds(tcfg, first["inputs_embeds"], [0], [s], [[s - 2, s - 1]], _empty_past(tcfg, 1, caps),
                         rows if len(rows) else None, bias if len(rows) else None)

    ids = [build_prompt_batch(assets, [p]).input_ids[0] for p in gemma3.PROMPTS[1:4]]
    n = [len(x) for x in ids]
    longest = max(n)
    caps3 = [min(c, longest + 8) if c == context else c for c in capacities(tcfg, context)]
    padded = np.zeros((3, longest), np.int64)
    for r, x in enumerate(ids):
        padded[r, :len(x)] = x
    with torch.no_grad():
        embeds = emb(torch.from_numpy(padded)).numpy()
    chunks = step_feeds(tcfg, embeds, [0, 0, 0], n, [[m - 1] for m in n], _empty_past(tcfg, 3, caps3))
    outs = run(chunks)
    names = [t.name for t in comp.inputs[8:]]
    with torch.no_grad():
        nxt = emb(torch.from_numpy(outs[0][:, 0].argmax(-1)[:, None])).numpy()
    decode = step_feeds(tcfg, nxt, n, [1, 1, 1], [[0]] * 3, dict(zip(names, outs[1:])))
    return {"prefill_b1": prefill, "chunks_b3": chunks, "decode_b3": decode}


def components_for(config, context: int) -> tuple[ComponentSpec, ...]:
    """gemma3.components with this decoder in place of the portable one."""
    tcfg = gemma3.text_config(config)
    comps = [c for c in gemma3.components(config) if c.name != "decoder"]
    past, present = [], []
    for i, t in enumerate(tcfg.layer_types):
        axis = "capacity_sliding" if t == "sliding_attention" else "capacity_full"
        for kv in ("key", "value"):
            shape = ("batch", tcfg.num_key_value_heads, axis, tcfg.head_dim)
            past.append(TensorSpec(f"past_{kv}.{i}", "float32", shape))
            present.append(TensorSpec(f"present_{kv}.{i}", "float32", shape))
    comps.append(ComponentSpec(
        name="decoder",
        inputs=(TensorSpec("inputs_embeds", "float32", ("batch", "seq", tcfg.hidden_size)),
                TensorSpec("seqlens_k", "int32", ("batch",)),
                TensorSpec("total_sequence_length", "int32", ()),
                TensorSpec("query_seqlens", "int32", ("batch",)),
                TensorSpec("token_rows", "int64", ("tokens",)),
                TensorSpec("logits_index", "int64", ("batch", "logits")),
                TensorSpec("image_rows", "int64", ("image_rows",)),
                TensorSpec("image_bias", "float32", (2, "image_rows", "seq")), *past),
        outputs=(TensorSpec("logits", "float32", ("batch", "logits", tcfg.vocab_size)), *present),
        extract=lambda model: _decoder(model, context),
        dummy_inputs=lambda loaded, batch, rng: _dummy(loaded, batch, rng, context),
        golden_inputs=lambda loaded: _golden(loaded, context),
        calibration=gemma3._no_calibration, precisions=("fp32", "int8", "int4"), static_int8=False,
        parts=("lm_head",),
        # The cache outputs are the input buffers updated in place; rows a step does not define are unspecified.
        gated_outputs=("logits",), variant={"attention": "gqa", "context": context}))
    return tuple(comps)
