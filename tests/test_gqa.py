"""The ORT-flavour decoder (compile/models/gemma3_gqa.py, runtime/kvcache.py): GroupQueryAttention with KV slots
updated in place, chunked prefill, slots that decode together, the image rows' two-way attention, and the int4
lm_head's rescoring."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

import medc.runtime
from medc.compile import loader
from medc.compile.build import BuildOptions, build
from medc.compile.models import gemma3
from medc.compile.models.siglip import builtin_images
from medc.runtime.gemma import build_prompt_batch, image_attention
from medc.runtime.kvcache import resident, token_rows

PROMPT = "List three causes of pleural effusion in an adult patient, and how each is found on imaging."


def test_resident_layout_follows_the_operator_contract():
    """min(T, W) <= L(T) <= min(T, C), and it depends on T alone (so any split of the steps gives one layout)."""
    for window, capacity in ((8, 9), (8, 16), (512, 576)):
        for t in range(0, 3 * capacity):
            held = resident(t, capacity, window)
            assert min(t, window) <= held <= min(t, capacity)
        assert resident(capacity + 1, capacity, window) == capacity + 1 - (capacity - window + 1)
    assert resident(10_000, 4096, None) == 10_000  # global layers: everything (the context bounds it)


def test_image_attention_mask_is_hfs():
    """Rows of image tokens; two-way inside an image, causal elsewhere, and the window on sliding layers."""
    is_image = np.array([0, 1, 1, 1, 0, 0, 1, 1, 0], bool)
    rows, bias = image_attention(is_image, window=2)
    assert rows.tolist() == [1, 2, 3, 6, 7]
    ok = bias == 0
    assert ok[0, 0].tolist() == [1, 1, 1, 1, 0, 0, 0, 0, 0]  # first image token sees its whole image (global)
    assert ok[1, 0].tolist() == [1, 1, 1, 1, 0, 0, 0, 0, 0]  # later keys of its image are never cut by the window
    assert ok[1, 2].tolist() == [0, 0, 1, 1, 0, 0, 0, 0, 0]  # third: the window (2) drops earlier keys, image ones too
    assert ok[0, 3].tolist() == [1, 1, 1, 1, 1, 1, 1, 1, 0]  # second image: causal + its own image only


def test_chunked_prefill_equals_one_step(gemma_fp32, monkeypatch):
    with medc.runtime.load(gemma_fp32) as m:
        ids = build_prompt_batch(m.assets, [PROMPT]).input_ids[0].tolist()
        cache = m.new_cache(1)
        whole = m.prefill_slot(cache, 0, ids)
        monkeypatch.setattr(type(m), "PREFILL_CHUNK", 7)  # several chunks, each past the sliding window (8)
        chunks = list(m.prefill_steps(cache, 0, ids))
        assert len(chunks) == -(-len(ids) // 7) and all(c is None for c in chunks[:-1])
        assert np.abs(chunks[-1] - whole).max() < 1e-4


def test_slots_decode_together_as_alone(gemma_fp32):
    """Three sequences of different lengths in slots 0..2 of one cache, the middle one idle for a step: each row's
    logits equal the same sequence decoded alone (rows of idle slots leave their cache untouched)."""
    with medc.runtime.load(gemma_fp32) as m:
        prompts = [build_prompt_batch(m.assets, [p]).input_ids[0].tolist()
                   for p in (PROMPT, "Is there a pneumothorax?", "Describe the heart size.")]
        cache = m.new_cache(3)
        first = [int(m.prefill_slot(cache, i, ids).argmax()) for i, ids in enumerate(prompts)]
        tokens = np.array([[first[0]], [first[1]], [first[2]]])
        together = m.step(cache, 0, 3, m._embed(tokens), [1, 0, 1], np.zeros((3, 1), np.int64))[:, 0]
        assert cache.lengths.tolist() == [len(prompts[0]) + 1, len(prompts[1]), len(prompts[2]) + 1]
        later = m.step(cache, 1, 2, m._embed(tokens[1:2]), [1], [[0]])[0, 0]  # the idle one catches up alone
        for row, logits in ((0, together[0]), (1, later), (2, together[2])):
            alone = m.new_cache(1)
            m.prefill_slot(alone, 0, prompts[row])
            ref = m.step(alone, 0, 1, m._embed(tokens[row:row + 1]), [1], [[0]])[0, 0]
            assert np.abs(logits - ref).max() < 1e-4, row


def test_token_rows():
    assert token_rows([3, 0, 1, 2], 3).tolist() == [0, 1, 2, 6, 9, 10]
    assert token_rows([0, 0], 4).tolist() == []


def test_a_prompt_rides_in_a_decode_step(gemma_fp32):
    """One step that carries a new prompt (slot 1, 20 tokens) beside two decoding slots (0 and 2): each row's
    logits, and the next step's, equal the same work done in separate steps. The decoder computes only the step's
    real tokens (`token_rows`): padding columns must change nothing."""
    with medc.runtime.load(gemma_fp32) as m:
        assert m.packs
        prompts = [build_prompt_batch(m.assets, [p]).input_ids[0].tolist()
                   for p in (PROMPT, "Is there a pneumothorax? Answer in one sentence, then list the signs.",
                             "Describe the heart size.")]
        caches = {"packed": m.new_cache(3), "apart": m.new_cache(3)}
        for cache in caches.values():
            for slot in (0, 2):
                m.prefill_slot(cache, slot, prompts[slot])
        nxt = np.array([[5], [0], [7]])
        new_ids = np.array(prompts[1])
        width = len(new_ids)
        tokens = np.zeros((3, width), np.int64)
        tokens[0, 0], tokens[1], tokens[2, 0] = 5, new_ids, 7
        packed = m.step(caches["packed"], 0, 3, m._embed(tokens), [1, width, 1], [[0], [width - 1], [0]])[:, 0]
        apart = caches["apart"]
        ref_prompt = m.prefill_slot(apart, 1, prompts[1])
        ref_decode = m.step(apart, 0, 3, m._embed(nxt), [1, 0, 1], np.zeros((3, 1), np.int64))[:, 0]
        assert np.abs(packed[1] - ref_prompt).max() < 1e-4
        assert np.abs(packed[[0, 2]] - ref_decode[[0, 2]]).max() < 1e-4
        assert caches["packed"].lengths.tolist() == apart.lengths.tolist()
        after = {k: m.step(c, 0, 3, m._embed(np.array([[3], [4], [6]])), [1, 1, 1], np.zeros((3, 1), np.int64))[:, 0]
                 for k, c in caches.items()}  # the caches the two ways wrote hold the same keys and values
        assert np.abs(after["packed"] - after["apart"]).max() < 1e-4


def test_image_prompt_rows_attend_both_ways(gemma_fp32, gemma_tiny):
    """Prefill with an image == HF's logits; without the image rows' correction (treated as text) they differ."""
    with medc.runtime.load(gemma_fp32) as m:
        images = builtin_images()[:1]
        batch = build_prompt_batch(m.assets, [PROMPT], [images])
        ids = batch.input_ids[0].tolist()
        pixels = m.preprocess(images)
        ours = m.prefill_slot(m.new_cache(1), 0, ids, pixels)
        with torch.no_grad():
            ref = gemma_tiny.hf_model(input_ids=torch.from_numpy(batch.input_ids), pixel_values=torch.from_numpy(pixels),
                                      token_type_ids=torch.from_numpy(batch.token_type_ids)).logits[0, -1].numpy()
        assert np.abs(ours - ref).max() < 1e-4
        # the same embeddings as a causal prefill (no image rows): not HF's result
        cache = m.new_cache(1)
        embeds = m._embed(batch.input_ids)
        feats = m._sessions["vision_encoder"].run({"pixel_values": pixels})["image_features"]
        embeds[0, batch.token_type_ids[0] == 1] = feats.reshape(-1, embeds.shape[-1])
        causal = m.step(cache, 0, 1, embeds, [len(ids)], [[len(ids) - 1]])[0, -1]
        assert np.abs(causal - ref).max() > 1e-3


def test_context_limit_and_rebuild_hint(gemma_fp32):
    from medc.errors import MedcError

    with medc.runtime.load(gemma_fp32) as m:
        cache = m.new_cache(1)
        with pytest.raises(MedcError, match="exceed this build's context of 512.*--context"):
            m.prefill_slot(cache, 0, [2] * 513)


def test_int4_lm_head_is_rescored(tmp_path):
    """An int4 lm_head: TopK of its logits, those rows recomputed from int8 rows (GatherBlockQuantized). The perplexity
    effect is measured on real weights (tests/test_gemma_real.py)."""
    out = tmp_path / "b"
    m = build(BuildOptions(model="medgemma-tiny", out=out, precision="decoder=int8,lm_head=int4"))
    q = m.components["decoder"].quantization
    assert q["lm_head"] == "int4 asymmetric (uint4 zero points), blocks of 32"
    assert q["lm_head_rescore"]["top_k"] == 1024 and m.build["recipe"]["flavour"] == "ort"
    graph = onnx.load(str(out / "decoder.onnx"), load_external_data=False).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("TopK") == 1 and ops.count("GatherBlockQuantized") == 1
    # every projection (7 per layer) and the head are quantised: none was left as an fp32 MatMul or Gemm
    layers = gemma3.text_config(loader.load("medgemma-tiny").config).num_hidden_layers
    assert ops.count("MatMulNBits") == 7 * layers + 1 and "Gemm" not in ops
    assert not [n for n in graph.node if n.op_type == "MatMul" and any("proj" in i for i in n.input)]
    # tiny vocab (384) < 1024: every logit is rescored, so the head is effectively int8
    fp32 = loader.load("medgemma-tiny")
    ids = build_prompt_batch(fp32.prompt_assets(), [PROMPT]).input_ids
    with torch.no_grad():
        ref = fp32.hf_model(input_ids=torch.from_numpy(ids)).logits[0, -1].numpy()
    with medc.runtime.load(out) as model:
        ours = model.prefill_slot(model.new_cache(1), 0, ids[0].tolist())
    cos = float(ours @ ref / np.linalg.norm(ours) / np.linalg.norm(ref))
    assert cos > 0.99  # int8 decoder and (rescored) head on random weights
    assert gemma3.text_config(fp32.config).vocab_size < 1024


@pytest.mark.parametrize("vocab, top_k", [(4096, 64), (100, 64)], ids=["two-stage", "one-topk"])
def test_rescoring_recomputes_exactly_the_top_logits(vocab, top_k):
    """quantize.add_rescoring on a graph whose head is coarse: the top_k logits by the coarse head, and only those,
    become the int8 rows' dot products; the two-stage top-k picks the same set as one TopK over the vocabulary."""
    import onnx_ir as ir
    import onnxruntime as ort

    from medc.compile import quantize

    rng = np.random.default_rng(0)
    hidden_size = 64
    w = rng.standard_normal((vocab, hidden_size)).astype(np.float32)
    coarse = np.round(w * 2) / 2  # a head with int4-like error
    x = ir.Value(name="hidden", shape=ir.Shape([2, 3, hidden_size]), type=ir.TensorType(ir.DataType.FLOAT))
    graph = ir.Graph([x], [], nodes=[], opset_imports={"": 20}, name="head")
    weight = quantize._constant(graph, "w", np.ascontiguousarray(coarse.T))
    head = ir.node("MatMul", [x, weight], name="head")
    graph.append(head)
    logits = head.outputs[0]
    logits.name = "logits"
    graph.outputs.append(logits)
    rows, scales = quantize.int8_rows(w)
    quantize.add_rescoring(graph, logits, x, quantize._constant(graph, "rows", rows),
                           quantize._constant(graph, "scales", scales), top_k)
    proto = ir.serde.serialize_model(ir.Model(graph, ir_version=10))
    assert [o.name for o in proto.graph.output] == ["logits"]
    h = rng.standard_normal((2, 3, hidden_size)).astype(np.float32)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"hidden": h})[0]
    before = h @ coarse.T
    exact = h @ (((rows.astype(np.int16) - 128).reshape(vocab, -1, quantize.RESCORE_BLOCK)
                  * scales[..., None]).reshape(vocab, hidden_size)).T
    k = min(top_k, vocab)
    top = np.argsort(-before, axis=-1)[..., :k]
    expected = before.copy()
    np.put_along_axis(expected, top, np.take_along_axis(exact, top, -1), -1)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)
    changed = np.abs(got - before) > 1e-4
    assert changed.sum(-1).max() <= k and changed.any()
