"""MedGemma / Gemma 3: decoder export vs HF, generation vs HF generate, prompts, sampling, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import medc.runtime
from medc.compile import loader
from medc.compile.build import BuildOptions, build
from medc.compile.export import module_args
from medc.compile.hf import hf_class, hf_config
from medc.compile.models import gemma3
from medc.compile.models.siglip import builtin_images
from medc.compile.registry import MODELS
from medc.errors import MedcError
from medc.manifest import Manifest
from medc.runtime.gemma import build_prompt_batch

PROMPTS = ["Is there a pneumothorax?", "List three causes of pleural effusion in an adult patient."]


def _hf_generate(model, assets, prompts, images, n):
    batch = build_prompt_batch(assets, prompts, images)
    kw = {"input_ids": torch.from_numpy(batch.input_ids), "attention_mask": torch.from_numpy(batch.attention_mask)}
    if images:
        from medc.runtime.preprocess import ImagePreprocessing

        pre = ImagePreprocessing.from_hf_config(MODELS["medgemma-tiny"].preprocessor)
        kw["pixel_values"] = torch.from_numpy(pre([im for row in images for im in row]))
        kw["token_type_ids"] = torch.from_numpy(batch.token_type_ids)
    with torch.no_grad():
        out = model.generate(**kw, max_new_tokens=n, do_sample=False, pad_token_id=0,
                             eos_token_id=[1, assets.special_ids["end_of_turn"]])
    result = []
    for row in out[:, batch.input_ids.shape[1]:].tolist():
        stop = next((i for i, t in enumerate(row) if t in (1, assets.special_ids["end_of_turn"])), len(row))
        result.append(row[:stop])
    return batch, result


def test_tiny_structure(gemma_tiny):
    tcfg = gemma3.text_config(gemma_tiny.config)
    kinds = set(tcfg.layer_types)
    assert kinds == {"sliding_attention", "full_attention"}
    assert tcfg.num_key_value_heads < tcfg.num_attention_heads  # GQA
    v = gemma_tiny.config.vision_config
    assert int(gemma_tiny.config.mm_tokens_per_image ** 0.5) ** 2 == gemma_tiny.config.mm_tokens_per_image
    assert (v.image_size // v.patch_size) % int(gemma_tiny.config.mm_tokens_per_image ** 0.5) == 0
    ids = build_prompt_batch(gemma_tiny.prompt_assets(), PROMPTS[:1]).input_ids
    assert ids.shape[1] > tcfg.sliding_window  # test prompts are longer than the window


def test_real_configs():
    """MedGemma 4B / 27B shapes from the registry, without allocating weights."""
    for name, layers, head_dim, qpas in (("medgemma-4b-it", 34, 256, 256), ("medgemma-27b-text-it", 62, 128, 168)):
        spec = MODELS[name]
        with torch.device("meta"):
            model = hf_class(spec.family)(hf_config(spec.family, spec.config))
        tcfg = gemma3.text_config(model.config)
        assert tcfg.num_hidden_layers == layers and tcfg.head_dim == head_dim and tcfg.query_pre_attn_scalar == qpas
        layout = gemma3.kv_layout(tcfg)
        assert [i for i, l in enumerate(layout) if l["keep"] is None][:2] == [5, 11]  # every 6th layer global
        n = sum(p.numel() for p in model.parameters())
        assert (4.2e9 < n < 4.4e9) if name.startswith("medgemma-4b") else (26.5e9 < n < 27.5e9)


def test_27b_attention_shapes_on_a_2_layer_model():
    """head_dim 128 with query_pre_attn_scalar 168 (scaling != 1/sqrt(head_dim)): our decoder == HF forward."""
    cfg = {**MODELS["medgemma-27b-text-it"].config, "num_hidden_layers": 2, "hidden_size": 256,
           "intermediate_size": 512, "vocab_size": 512, "sliding_window": 4,
           "layer_types": ["sliding_attention", "full_attention"]}
    from medc.compile.spec import ModelSpec

    spec = ModelSpec(name="x", family=MODELS["medgemma-27b-text-it"].family, description="", config=cfg, preprocessor={})
    model = loader.build_random(spec, seed=3)
    assert model.model.layers[0].self_attn.scaling == pytest.approx(168 ** -0.5)
    ids = torch.randint(3, 512, (2, 9))
    with torch.no_grad():
        ref = model(input_ids=ids).logits.numpy()
        comp = {c.name: c for c in gemma3.components(model.config)}["decoder"]
        dec = gemma3._decoder(model)
        feeds = {"inputs_embeds": gemma3._embed_tokens(model)(ids).numpy(), "attention_mask": np.ones((2, 9), np.int64),
                 "position_ids": np.tile(np.arange(9), (2, 1)), "token_type_ids": np.zeros((2, 9), np.int64),
                 "logits_positions": np.arange(9), **gemma3._empty_past(model.config, 2, {"full": 0, "sliding": 0})}
        out = dec(*module_args(dec, comp, feeds))[0].numpy()
    assert np.abs(out - ref).max() < 1e-4


def test_decoder_matches_hf_prefill_and_cached_decode(gemma_tiny):
    """Teacher-forced: prefill then token-by-token decode with the cache == HF's single full forward."""
    model = gemma_tiny.hf_model
    feeds = gemma3.prompt_feeds(gemma_tiny, PROMPTS[:1], builtin_images()[:1])
    comp = {c.name: c for c in gemma3.components(model.config)}["decoder"]
    dec = gemma3._decoder(model)
    ids = build_prompt_batch(gemma_tiny.prompt_assets(), PROMPTS[:1], [builtin_images()[:1]])
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids.input_ids), token_type_ids=torch.from_numpy(ids.token_type_ids),
                    pixel_values=torch.from_numpy(gemma_tiny.preprocessing(builtin_images()[:1])),
                    attention_mask=torch.from_numpy(ids.attention_mask)).logits.numpy()
        n = feeds["inputs_embeds"].shape[1]
        split = n - 4
        first = {k: (v[:, :split] if k in ("inputs_embeds", "position_ids", "token_type_ids", "attention_mask") else v)
                 for k, v in feeds.items()}
        first["logits_positions"] = np.arange(split)
        outs = dec(*module_args(dec, comp, first))
        assert np.abs(outs[0].numpy() - ref[:, :split]).max() < 1e-4
        past = [o for o in outs[1:]]
        window = gemma3.text_config(model.config).sliding_window
        assert past[0].shape[2] == window - 1 and past[2].shape[2] == split  # sliding keeps window-1, global all
        for j in range(split, n):
            step = {"inputs_embeds": feeds["inputs_embeds"][:, j:j + 1], "attention_mask": np.ones((1, j + 1), np.int64),
                    "position_ids": feeds["position_ids"][:, j:j + 1], "token_type_ids": feeds["token_type_ids"][:, j:j + 1],
                    "logits_positions": np.zeros(1, np.int64),
                    **{t.name: p.numpy() for t, p in zip(comp.inputs[5:], past)}}
            outs = dec(*module_args(dec, comp, step))
            past = list(outs[1:])
            assert np.abs(outs[0].numpy()[:, 0] - ref[:, j]).max() < 1e-4


def test_token_type_ids_matter(gemma_tiny):
    """Image tokens attend to each other both ways in prefill; dropping token_type_ids changes the logits."""
    model = gemma_tiny.hf_model
    feeds = gemma3.prompt_feeds(gemma_tiny, PROMPTS[:1], builtin_images()[:1])
    comp = {c.name: c for c in gemma3.components(model.config)}["decoder"]
    dec = gemma3._decoder(model)
    with torch.no_grad():
        a = dec(*module_args(dec, comp, feeds))[0].numpy()
        b = dec(*module_args(dec, comp, {**feeds, "token_type_ids": np.zeros_like(feeds["token_type_ids"])}))[0].numpy()
    assert feeds["token_type_ids"].sum() == gemma_tiny.config.mm_tokens_per_image
    assert np.abs(a - b).max() > 1e-3


@pytest.mark.parametrize("form", ["gqa", "explicit"])
@pytest.mark.parametrize("case", ["text", "image", "batch"])
def test_greedy_equals_hf_generate(gemma_fp32, gemma_portable, gemma_tiny, case, form):
    """Both decoder forms: the ORT flavour (GroupQueryAttention, slots) and the portable one (explicit attention)."""
    images = {"text": None, "image": [builtin_images()[:1]], "batch": None}[case]
    prompts = PROMPTS if case == "batch" else PROMPTS[:1]
    with medc.runtime.load(gemma_fp32 if form == "gqa" else gemma_portable) as m:
        assert m.attention == form
        ours = m.generate_ids(prompts, images=images, max_new_tokens=24)
        batch, ref = _hf_generate(gemma_tiny.hf_model, m.assets, prompts, images, 24)
    assert batch.input_ids.shape[1] > gemma3.text_config(gemma_tiny.config).sliding_window
    if case == "batch":
        assert batch.attention_mask.min() == 0  # left padding exercised
    assert ours == ref and len(ours[0]) > 3


def test_streaming_sampling_and_stop(gemma_fp32):
    with medc.runtime.load(gemma_fp32) as m:
        whole = m.generate(PROMPTS[0], max_new_tokens=16)
        seen = []
        streamed = list(m.stream([PROMPTS[0]], max_new_tokens=16, callback=seen.append))
        ids = [s[0] for s in streamed if s[0] is not None]
        assert m.assets.tokenizer.decode(ids, skip_special_tokens=True) == whole and seen == streamed
        a = m.generate(PROMPTS[0], max_new_tokens=12, temperature=0.9, top_k=50, top_p=0.95, seed=7)
        b = m.generate(PROMPTS[0], max_new_tokens=12, temperature=0.9, top_k=50, top_p=0.95, seed=7)
        c = m.generate(PROMPTS[0], max_new_tokens=12, temperature=0.9, top_k=50, top_p=0.95, seed=8)
        assert a == b and a != c
        # Stop tokens: make <end_of_turn> the only likely token by forcing eos ids to include the greedy first token.
        first = m.generate_ids([PROMPTS[0]], max_new_tokens=1)[0][0]
        m.bundle.manifest.tokenizer["eos_token_ids"].append(first)
        assert m.generate_ids([PROMPTS[0]], max_new_tokens=8) == [[]]


def test_int8_decoder_gate(gemma_int8):
    m = Manifest.read(gemma_int8)
    q = m.components["decoder"].quantization
    assert q["method"] == "weight-only" and q["format"] == "MatMulNBits" and q["lm_head"].startswith("int8")
    assert m.components["embed_tokens"].precision == "int8"  # int8 blocks (compile/embedding.py)
    for c in m.components.values():
        assert c.fidelity["passed"]
    with medc.runtime.load(gemma_int8) as model:
        assert len(model.generate_ids([PROMPTS[0]], max_new_tokens=4)[0]) >= 1


def test_manifest_records_kv_layout(gemma_fp32, gemma_portable):
    """Explicit decoder: sliding layers keep window - 1 past tokens. ORT flavour: slots of the context, sliding layers
    a window-sized buffer the operator compacts."""
    for bundle, sliding_keep in ((gemma_portable, 8 - 1), (gemma_fp32, 8 + 1)):
        m = Manifest.read(bundle)
        layout = m.generation["kv_layout"]
        assert [l["type"] for l in layout] == ["sliding_attention", "full_attention"] * 2
        assert m.generation["sliding_window"] == 8
        assert layout[0]["keep"] == sliding_keep and layout[1]["keep"] is None
        assert m.tokenizer["chat_template"] and m.tokenizer["special_ids"]["image"] == 8
    m = Manifest.read(gemma_fp32)
    assert m.generation["attention"] == "gqa" and m.generation["kv_cache"]["capacity"] == [9, 512, 9, 512]
    assert Manifest.read(gemma_portable).generation["attention"] == "explicit"


@pytest.mark.parametrize("bad,match", [
    (dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
    (dict(temperature=-1), "temperature must be >= 0"),
    (dict(top_p=1.5), "top_p must be in"),
    (dict(top_k=-2), "top_k must be >= 0"),
    (dict(max_new_tokens=600), "exceeds this build's context limit of 512"),
])
def test_bad_generation_input(gemma_fp32, bad, match):
    with medc.runtime.load(gemma_fp32) as m:
        with pytest.raises(MedcError, match=match):
            m.generate(PROMPTS[0], **bad)


def test_bad_image_input(gemma_fp32, tmp_path):
    bad = tmp_path / "scan.png"
    bad.write_bytes(b"not an image")
    with medc.runtime.load(gemma_fp32) as m:
        with pytest.raises(MedcError, match="corrupt or not an image"):
            m.generate(PROMPTS[0], images=[bad], max_new_tokens=2)
    from medc.runtime.gemma import encode_prompt

    with medc.runtime.load(gemma_fp32) as m:
        text = m.assets.special_tokens["boi"] + " two slots " + m.assets.special_tokens["boi"]
        with pytest.raises(MedcError, match="image slots but 1 images"):
            encode_prompt(m.assets, text, 1)


def test_cli_generation(gemma_fp32, real_images):
    from click.testing import CliRunner

    from medc.cli import main

    res = CliRunner().invoke(main, ["run", str(gemma_fp32), "--prompt", PROMPTS[0], "--image", str(real_images[0]),
                                    "--max-new-tokens", "6", "--json"])
    assert res.exit_code == 0, res.output
    assert '"tokens":' in res.output
    res = CliRunner().invoke(main, ["run", str(gemma_fp32), "--text", "x"])
    assert res.exit_code == 2 and "needs --prompt" in res.output


def test_not_a_gemma_checkpoint(tmp_path):
    import json

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(MedcError, match="holds a 'llama' model"):
        loader.load(str(tmp_path))


def test_int4_ort_and_portable_flavours(tmp_path_factory):
    """decoder int4 + lm_head int8 as MatMulNBits (ORT) and as blocked DequantizeLinear (portable, for TensorRT)."""
    import onnx
    from onnx import numpy_helper

    root = tmp_path_factory.mktemp("gemma-int4")
    bundles = {}
    for flavour in ("ort", "portable"):
        bundles[flavour] = root / flavour
        build(BuildOptions(model="medgemma-tiny", out=bundles[flavour], precision="decoder=int4,lm_head=int8",
                           flavour=flavour))
    q = {f: Manifest.read(b).components["decoder"].quantization for f, b in bundles.items()}
    assert q["ort"]["format"] == "MatMulNBits" and q["portable"]["format"].startswith("DequantizeLinear")
    assert q["ort"]["weights"] == "int4 asymmetric (uint4 zero points), blocks of 32"  # MatMulNBits takes zero points
    assert q["portable"]["weights"] == "int4 symmetric, blocks of 32"  # TensorRT: zero point 0
    assert q["portable"]["lm_head"] == "int8 symmetric, per output channel"  # TensorRT: int8 weights per channel
    assert Manifest.read(bundles["portable"]).build["recipe"]["flavour"] == "portable"

    graph = onnx.load(str(bundles["portable"] / "decoder.onnx"))
    assert {n.domain for n in graph.graph.node} <= {"", "ai.onnx"}  # standard ops only
    assert max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) >= 21  # blocked DQ, int4
    inits = {t.name: t for t in graph.graph.initializer}
    dq = [n for n in graph.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == 7 * 4 + 1  # q k v o gate up down x 4 layers, lm_head
    kinds = {(inits[n.input[0]].data_type, next((a.i for a in n.attribute if a.name == "block_size"), None))
             for n in dq}
    assert kinds == {(onnx.TensorProto.INT4, 32), (onnx.TensorProto.INT8, None)}
    for n in dq:  # symmetric: no zero point, or an all-zero one
        assert len(n.input) < 3 or not numpy_helper.to_array(inits[n.input[2]]).any()

    for b in bundles.values():  # both pass the decoder gate and generate through the runtime
        assert Manifest.read(b).components["decoder"].fidelity["passed"]
        with medc.runtime.load(b) as model:
            assert len(model.generate_ids([PROMPTS[0]], max_new_tokens=3, ignore_eos=True)[0]) == 3


def test_gqa_bundles_name_the_onnxruntime_they_need():
    """The slot-form decoder reads GroupQueryAttention's query_seqlens, which onnxruntime 1.31 (the newest
    onnxruntime-gpu) refuses as an invalid graph: the runtime says which version it needs and how to get there."""
    from medc.runtime.decoder import GQA_ONNXRUNTIME, require_onnxruntime

    require_onnxruntime(GQA_ONNXRUNTIME, "installed here")  # this machine runs the CPU tests' GQA bundles
    with pytest.raises(MedcError, match=r"needs onnxruntime >= 99\.0 .*this machine has .*--flavour portable"):
        require_onnxruntime((99, 0), "a future op")
