"""Bounded activations (issue 28): prompts prefill in chunks on every decoder form, an image never split across
chunks, and the planner sizing the decoder's activations for one chunk (the vision encoder's released before
decoding)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import medc.runtime
from medc.compile import planner
from medc.compile.plan import BuildOptions, make_plan, resolve
from medc.runtime.batch import Batch, SamplingParams, Sequence
from medc.runtime.decoder import PREFILL_CHUNK, ExplicitDecoder, SlotDecoder, chunk_end
from medc.runtime.gemma import encode_prompt
from medc.runtime.trt_session import TrtDecoder

GIB = 2**30


def test_chunk_end_never_splits_an_image():
    img = np.zeros(30, bool)
    img[10:18] = True  # one image of 8 tokens at 10..17
    assert chunk_end(None, 0, 7, 30) == 7 and chunk_end(img, 0, 7, 30) == 7  # text only: the plain boundary
    assert chunk_end(img, 7, 7, 30) == 10  # 14 falls inside the image: back to its start
    assert chunk_end(img, 10, 7, 30) == 18  # the chunk starts at the image: it grows to hold all of it
    assert chunk_end(img, 10, 8, 30) == 18 and chunk_end(img, 18, 7, 30) == 25
    assert chunk_end(img, 0, 10, 30) == 10 and chunk_end(img, 0, 18, 30) == 18  # boundaries at the image's edges
    assert chunk_end(img, 0, None, 30) == 30 and chunk_end(img, 25, 7, 30) == 30


def test_every_decoder_chunks_its_prefill():
    assert SlotDecoder.prefill_chunk == ExplicitDecoder.prefill_chunk == PREFILL_CHUNK
    # the TensorRT decoder is the explicit one with its cache on the GPU: the same chunks, images whole
    assert TrtDecoder.prefill_chunk == PREFILL_CHUNK and TrtDecoder.chunks_images
    assert not SlotDecoder.chunks_images  # its image mask (image_attention) is built for a prompt from empty


def _first_step(m, ids: list[int], chunk: int | None, pixels=None) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """A prompt through the sampling loop with `chunk` tokens per prefill step: the logits its first token is chosen
    from, and each step's (tokens, image tokens)."""
    dec = m.decoder(1)
    dec.prefill_chunk = chunk
    steps, logits = [], []
    run = dec.step

    def step(chunks):  # records what each call carried, then runs it
        c = chunks[0]
        steps.append((len(c.embeds), 0 if c.images is None else int(c.images.sum())))
        out = run(chunks)
        logits.append(out[0][-1])
        return out

    dec.step = step
    batch = Batch(dec, m.embed, m.encode_images, m.assets.special_ids.get("image"), m.eos_ids)
    seq = Sequence(ids, pixels, SamplingParams(max_new_tokens=1))
    batch.admit(seq)
    while seq.prefilling:
        batch.step()
    return logits[-1], steps


@pytest.fixture(scope="module")
def portable(gemma_portable):
    with medc.runtime.load(gemma_portable) as m:
        yield m


def test_chunked_prefill_equals_one_step_text(portable):
    m = portable
    ids = encode_prompt(m.assets, "Is there a pneumothorax? Describe the findings and the most likely cause.")
    whole, one = _first_step(m, ids, None)
    chunked, steps = _first_step(m, ids, 7)
    assert len(one) == 1 and [n for n, _ in steps] == [7] * (len(ids) // 7) + ([len(ids) % 7] if len(ids) % 7 else [])
    assert np.abs(chunked - whole).max() < 1e-4 and chunked.argmax() == whole.argmax()


def test_chunked_prefill_equals_one_step_image(portable, real_images, monkeypatch):
    m = portable
    ids = encode_prompt(m.assets, "Findings?", 2)
    pixels = m.preprocess(real_images[:2])
    images = np.asarray(ids) == m.assets.special_ids["image"]
    per_image = m.assets.mm_tokens_per_image
    assert per_image > 7 and any(images[b - 1] and images[b] for b in range(7, len(ids), 7))  # 7 would cut one
    whole, _ = _first_step(m, ids, None, pixels)
    chunked, steps = _first_step(m, ids, 7, pixels)
    assert sorted(k for _, k in steps if k) == [per_image, per_image]  # each image whole, in one step
    assert sum(n for n, _ in steps) == len(ids) and max(n for n, _ in steps) == per_image
    assert np.abs(chunked - whole).max() < 1e-4 and chunked.argmax() == whole.argmax()
    # greedy generation through the pipeline: the same tokens with the runtime's chunk and with none
    monkeypatch.setattr(ExplicitDecoder, "prefill_chunk", 7)
    chunked_ids = m.generate_ids(["Findings?"], [real_images[:2]], max_new_tokens=8, ignore_eos=True)
    monkeypatch.setattr(ExplicitDecoder, "prefill_chunk", None)
    whole_ids = m.generate_ids(["Findings?"], [real_images[:2]], max_new_tokens=8, ignore_eos=True)
    assert chunked_ids == whole_ids


def test_vision_encoder_releases_its_arena(portable, real_images):
    vision = portable._sessions["vision_encoder"]
    assert vision.release_activations and vision._run_options() is not None
    portable.encode_images(portable.preprocess(real_images[:1]))  # runs with the run option ONNX Runtime reads


def _plan(context: int, target: str = "jetson-orin-nano-8gb", precision: str = "int4"):
    opts = BuildOptions(model="medgemma-4b-it", out=Path("x"), target=target, precision=precision, context=context)
    return planner.plan_build(make_plan(opts, resolve("medgemma-4b-it")), context)


def test_decoder_activations_are_one_chunks_by_hand():
    cfg = resolve("medgemma-4b-it").spec.config
    t = cfg["text_config"]
    h, f, heads, vocab = t["hidden_size"], t["intermediate_size"], t["num_attention_heads"], t["vocab_size"]
    assert planner.prefill_chunk(cfg, 8192) == 512 and planner.prefill_chunk(cfg, 300) == 300
    assert planner.prefill_chunk({**cfg, "mm_tokens_per_image": 1024}, 8192) == 1024  # an image is one step
    c, s = 512, 8192
    eager = 4 * (2 * heads * c * s + c * s + 3 * c * f + 8 * c * h) + 4 * vocab  # scores + softmax + mask, fp32
    assert planner._activations(cfg, "decoder", "int4", s, 1, fused=False) == eager
    assert planner._activations(cfg, "decoder", "int4", s, 1, fused=True) == 4 * (3 * c * f + 8 * c * h) + 4 * vocab
    assert planner._activations(cfg, "embed_tokens", "fp32", s, 1, fused=False) == 4 * c * h
    # the chunk bounds them: 8k context costs a 512-token chunk's MLP, only the scores grow with the context
    assert planner._activations(cfg, "decoder", "int4", 2 * s, 1, fused=True) == 4 * (3 * c * f + 8 * c * h) + 4 * vocab


def test_plan_names_the_chunk_and_counts_vision_apart():
    plan = _plan(8192)
    decoder = next(c for c in plan.components if c.name == "decoder")
    assert plan.prefill_chunk == 512 and plan.to_json()["prefill_chunk"] == 512
    assert "prefill chunk" in plan.render() and "512 tokens" in plan.render()
    assert decoder.activation_bytes < 0.2 * GIB  # a whole 8k prefill was 1.56 GiB
    # the runtime releases the vision encoder's activations after each run (ONNX Runtime's arena, a TensorRT
    # context's per-run memory), so they are not live beside the decoder's
    for p in (_plan(8192, "cpu", "int8"), plan):
        by = {c.name: c.activation_bytes for c in p.components}
        assert p.vision_released and p.activation_bytes == max(by["vision_encoder"], by["embed_tokens"] + by["decoder"])
        assert any("released before the decoder" in n for n in p.notes)


def test_runtime_tokenizer_and_load_terms_by_hand():
    """What the CPU runs showed the plan missed (benchmarks/results/plan-check-270m.md): the tokenizer in memory, and
    ONNX Runtime holding a graph twice while it loads (the larger text graph loads first, alone)."""
    from medc.targets import get_target

    cfg = resolve("medgemma-4b-it").spec.config
    recipe = {"vision_encoder": "fp32", "embed_tokens": "fp32", "decoder": "fp32", "lm_head": "fp32"}
    plan = planner.plan_memory("m", "gemma3", cfg, recipe, get_target("cpu"), 1024, 1, "ort")
    by = {c.name: c.weight_bytes for c in plan.components}
    tokenizer = planner.TOKENIZER_BYTES_PER_TOKEN * cfg["text_config"]["vocab_size"]
    assert plan.runtime_bytes == int(planner.RUNTIME_OVERHEAD_GIB["host"] * GIB + tokenizer)
    largest = max(by["embed_tokens"], by["decoder"])
    assert plan.load_bytes == max(0, 2 * largest - plan.weight_bytes - plan.kv_bytes, by["vision_encoder"])
    assert plan.total_bytes == (plan.weight_bytes + plan.kv_bytes + plan.runtime_bytes
                                + max(plan.activation_bytes, plan.load_bytes))
    # a discrete GPU's memory holds neither the tokenizer nor a host-side load copy
    h100 = planner.plan_memory("m", "gemma3", cfg, recipe, get_target("h100"), 1024, 1, "portable")
    assert h100.load_bytes == 0 and h100.runtime_bytes == int(planner.RUNTIME_OVERHEAD_GIB["datacenter"] * GIB)


def test_pipeline_loads_the_larger_text_graph_first(portable):
    comps = portable.bundle.manifest.components
    sizes = {n: portable.bundle.file(comps[n].file).stat().st_size for n in ("embed_tokens", "decoder")}
    opened = []
    for name in sizes:
        session = portable._sessions[name]
        session.close()
        session.open = (lambda s=session, n=name: (opened.append(n), type(s).open(s))[1])
    portable.decoder(1)
    assert opened[:2] == sorted(sizes, key=lambda n: -sizes[n])
