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
from medc.runtime.batch import Batch, SamplingParams, Sequence
from medc.runtime.decoder import Chunk, image_attention
from medc.runtime.gemma import build_prompt_batch
from medc.runtime.kvcache import resident, token_rows

from conftest import decode, prefill

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


def test_chunked_prefill_equals_one_step(gemma_fp32):
    with medc.runtime.load(gemma_fp32) as m:
        ids = build_prompt_batch(m.assets, [PROMPT]).input_ids[0].tolist()
        dec = m.decoder(1)
        whole = prefill(m, dec, 0, ids)
        chunks = prefill(m, dec, 0, ids, chunk=7)  # several chunks, each past the sliding window (8)
        assert len(whole) == 1 and len(chunks) == -(-len(ids) // 7)
        assert np.abs(chunks[-1] - whole[0]).max() < 1e-4
        # the sampling loop carries a prompt in chunks of the decoder's prefill size, a step each
        dec.prefill_chunk = 7
        batch = Batch(dec, m.embed, m.encode_images, None, m.eos_ids)
        seq = Sequence(ids, None, SamplingParams(max_new_tokens=1))
        batch.admit(seq)
        steps = 0
        while seq.prefilling:
            batch.step()
            steps += 1
        assert steps == len(chunks) and seq.generated == 1 and batch.steps == steps


def test_slots_decode_together_as_alone(gemma_fp32):
    """Three sequences of different lengths in slots 0..2 of one cache, the middle one idle for a step: each row's
    logits equal the same sequence decoded alone (rows of idle slots leave their cache untouched)."""
    with medc.runtime.load(gemma_fp32) as m:
        prompts = [build_prompt_batch(m.assets, [p]).input_ids[0].tolist()
                   for p in (PROMPT, "Is there a pneumothorax?", "Describe the heart size.")]
        dec = m.decoder(3)
        first = [int(prefill(m, dec, i, ids)[-1].argmax()) for i, ids in enumerate(prompts)]
        together = decode(m, dec, {0: first[0], 2: first[2]})
        assert dec.lengths.tolist() == [len(prompts[0]) + 1, len(prompts[1]), len(prompts[2]) + 1]
        later = decode(m, dec, {1: first[1]})[1]  # the idle one catches up alone
        for row, logits in ((0, together[0]), (1, later), (2, together[2])):
            alone = m.decoder(1)
            prefill(m, alone, 0, prompts[row])
            ref = decode(m, alone, {0: first[row]})[0]
            assert np.abs(logits - ref).max() < 1e-4, row


def test_token_rows():
    assert token_rows([3, 0, 1, 2], 3).tolist() == [0, 1, 2, 6, 9, 10]
    assert token_rows([0, 0], 4).tolist() == []


def test_a_prompt_rides_in_a_decode_step(gemma_fp32):
    """One step that carries a new prompt (slot 1, 20 tokens) beside two decoding slots (0 and 2): each row's
    logits, and the next step's, equal the same work done in separate steps. The decoder computes only the step's
    real tokens (`token_rows`): padding columns must change nothing."""
    with medc.runtime.load(gemma_fp32) as m:
        prompts = [build_prompt_batch(m.assets, [p]).input_ids[0].tolist()
                   for p in (PROMPT, "Is there a pneumothorax? Answer in one sentence, then list the signs.",
                             "Describe the heart size.")]
        decoders = {"packed": m.decoder(3), "apart": m.decoder(3)}
        assert decoders["packed"].packs
        for dec in decoders.values():
            for slot in (0, 2):
                prefill(m, dec, slot, prompts[slot])
        new_ids = np.array(prompts[1])
        width = len(new_ids)
        packed_dec = decoders["packed"]
        packed_dec.reset(1)
        embeds = m.embed(np.concatenate([[5], new_ids, [7]])[None])[0]
        packed = packed_dec.step([Chunk(0, embeds[:1], np.zeros(1, np.int64)),
                                  Chunk(1, embeds[1:1 + width], np.array([width - 1])),
                                  Chunk(2, embeds[1 + width:], np.zeros(1, np.int64))])
        apart = decoders["apart"]
        ref_prompt = prefill(m, apart, 1, prompts[1])[-1]
        ref_decode = decode(m, apart, {0: 5, 2: 7})
        assert np.abs(packed[1][0] - ref_prompt).max() < 1e-4
        assert max(np.abs(packed[i][0] - ref_decode[s]).max() for i, s in ((0, 0), (2, 2))) < 1e-4
        assert packed_dec.lengths.tolist() == apart.lengths.tolist()
        after = {k: decode(m, d, {0: 3, 1: 4, 2: 6}) for k, d in decoders.items()}  # the caches the two ways wrote
        assert max(np.abs(after["packed"][s] - after["apart"][s]).max() for s in range(3)) < 1e-4  # are the same


def test_long_prompts_together_fit_the_padded_step(gemma_fp32):
    """Four 448-token prompts in a 512-token build: once the first decodes from 448 cached tokens, a joint step's
    padded width must leave its row room in the cache (GroupQueryAttention checks cached + padded width per row), so
    the others carry narrower chunks; every prompt still decodes the tokens it decodes alone."""
    from medc.benchmarks.generation import fixed_prompt

    with medc.runtime.load(gemma_fp32) as m:
        text = fixed_prompt(m.assets, 448)
        alone = m.generate_ids([text], max_new_tokens=32, ignore_eos=True)[0]
        together = m.generate_ids([text] * 4, max_new_tokens=32, ignore_eos=True)
        assert together == [alone] * 4 and len(alone) == 32


def test_image_prompt_rows_attend_both_ways(gemma_fp32, gemma_tiny):
    """Prefill with an image == HF's logits; without the image rows' correction (treated as text) they differ."""
    with medc.runtime.load(gemma_fp32) as m:
        images = builtin_images()[:1]
        batch = build_prompt_batch(m.assets, [PROMPT], [images])
        ids = batch.input_ids[0].tolist()
        pixels = m.preprocess(images)
        ours = prefill(m, m.decoder(1), 0, ids, pixels=pixels)[0]
        with torch.no_grad():
            ref = gemma_tiny.hf_model(input_ids=torch.from_numpy(batch.input_ids), pixel_values=torch.from_numpy(pixels),
                                      token_type_ids=torch.from_numpy(batch.token_type_ids)).logits[0, -1].numpy()
        assert np.abs(ours - ref).max() < 1e-4
        # the same embeddings as a causal prefill (no image rows): not HF's result
        embeds = m.embed(batch.input_ids)[0]
        embeds[batch.token_type_ids[0] == 1] = m.encode_images(pixels).reshape(-1, embeds.shape[-1])
        causal = m.decoder(1).step([Chunk(0, embeds, np.array([len(ids) - 1]))])[0][-1]
        assert np.abs(causal - ref).max() > 1e-3


def test_context_limit_and_rebuild_hint(gemma_fp32):
    from medc.errors import MedcError

    with medc.runtime.load(gemma_fp32) as m:
        with pytest.raises(MedcError, match="exceed this build's context of 512.*--context"):
            prefill(m, m.decoder(1), 0, [2] * 513)


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
        ours = prefill(model, model.decoder(1), 0, ids[0].tolist())[-1]
    cos = float(ours @ ref / np.linalg.norm(ours) / np.linalg.norm(ref))
    assert cos > 0.99  # int8 decoder and (rescored) head on random weights
    assert gemma3.text_config(fp32.config).vocab_size < 1024


@pytest.mark.parametrize("vocab, top_k", [(4096, 64), (100, 64)], ids=["two-stage", "one-topk"])
def test_rescoring_recomputes_exactly_the_top_logits(vocab, top_k):
    """weight_only.add_rescoring on a graph whose head is coarse: the top_k logits by the coarse head, and only those,
    become the int8 rows' dot products; the two-stage top-k picks the same set as one TopK over the vocabulary."""
    import onnx_ir as ir
    import onnxruntime as ort

    from medc.compile import weight_only as quantize

    rng = np.random.default_rng(0)
    hidden_size = 64
    w = rng.standard_normal((vocab, hidden_size)).astype(np.float32)
    coarse = np.round(w * 2) / 2  # a head with int4-like error
    x = ir.Value(name="hidden", shape=ir.Shape([2, 3, hidden_size]), type=ir.TensorType(ir.DataType.FLOAT))
    graph = ir.Graph([x], [], nodes=[], opset_imports={"": 20}, name="head")
    weight = quantize.constant(graph, "w", np.ascontiguousarray(coarse.T))
    head = ir.node("MatMul", [x, weight], name="head")
    graph.append(head)
    logits = head.outputs[0]
    logits.name = "logits"
    graph.outputs.append(logits)
    rows, scales = quantize.int8_rows(w)
    quantize.add_rescoring(graph, logits, x, quantize.constant(graph, "rows", rows),
                           quantize.constant(graph, "scales", scales), top_k)
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
