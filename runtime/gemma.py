"""MedGemma / Gemma 3 at run time: prompts (chat template, image tokens) and the pipeline that generates from them.

numpy + onnxruntime + tokenizers + jinja2; no torch. The pipeline picks its decoder once, from the bundle's graph
form (runtime/decoder.py), and generates with the sampling loop the server uses too (runtime/batch.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

from pathlib import Path

import numpy as np

from medc.errors import MedcError
from medc.runtime.batch import Batch, SamplingParams, Sequence
from medc.runtime.decoder import DECODERS, Decoder
from medc.runtime.preprocess import ImagePreprocessing
from medc.runtime.session import OrtSession, Pipeline
from medc.runtime.trt_session import TrtDecoder, TrtSession
from medc.runtime.vocabmap import VocabMap

__all__ = ["GemmaPipeline", "PromptAssets", "SamplingParams", "build_prompt_batch", "encode_messages",
           "encode_prompt", "max_slices", "planned_positions"]


@dataclass
class PromptAssets:
    """What turning text (and images) into decoder inputs needs; built from a bundle manifest or at build time."""

    tokenizer: object  # tokenizers.Tokenizer
    chat_template: str | None
    special_ids: dict[str, int]  # bos, eos, pad, boi, eoi, image, start_of_turn, end_of_turn
    special_tokens: dict[str, str]  # the same, as strings
    mm_tokens_per_image: int = 0
    max_positions: int = 131072
    memory_positions: int | None = None  # tokens one prompt's KV may hold by the build's memory plan (planned_positions)


@dataclass
class PromptBatch:
    input_ids: np.ndarray  # int64 [B, S], left-padded
    attention_mask: np.ndarray  # int64 [B, S], 0 on padding
    position_ids: np.ndarray  # int64 [B, S]
    token_type_ids: np.ndarray  # int64 [B, S], 1 on image soft tokens
    lengths: list[int] = field(default_factory=list)


def render_prompt(assets: PromptAssets, prompt: str, n_images: int) -> tuple[str, bool]:
    """(text, add_special_tokens): the chat template for instruction models, plain completion for base models."""
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": prompt}]
    return render_messages(assets, [{"role": "user", "content": content}])


def render_messages(assets: PromptAssets, messages: list[dict]) -> tuple[str, bool]:
    """A conversation (OpenAI-style roles; content a string or parts {"type": "image"} / {"type": "text", "text"})
    -> (text, add_special_tokens). Without a chat template (base models) the parts are concatenated as completion."""
    if assets.chat_template:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(msg):
            raise MedcError(f"chat template: {msg}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)
        env.globals["raise_exception"] = raise_exception
        try:
            text = env.from_string(assets.chat_template).render(
                messages=messages, add_generation_prompt=True,
                bos_token=assets.special_tokens["bos"], eos_token=assets.special_tokens["eos"])
        except jinja2.TemplateError as e:  # e.g. a system message that holds only an image
            raise MedcError(f"the chat template cannot render these messages ({type(e).__name__}); "
                            "check roles and content parts.") from None
        return text, False  # the template writes <bos> itself
    boi = assets.special_tokens.get("boi", "")
    parts = [p for m in messages for p in
             ([{"type": "text", "text": m["content"]}] if isinstance(m["content"], str) else m["content"])]
    return "".join(boi if p["type"] == "image" else p["text"] for p in parts), True


def expand_images(assets: PromptAssets, text: str) -> str:
    """Each <start_of_image> becomes the full image sequence, as Gemma3Processor does."""
    t = assets.special_tokens
    if not assets.mm_tokens_per_image or "boi" not in t:  # text-only model
        return text
    full = f"\n\n{t['boi']}{t['image'] * assets.mm_tokens_per_image}{t['eoi']}\n\n"
    return text.replace(t["boi"], full)


def encode_prompt(assets: PromptAssets, prompt: str, n_images: int = 0) -> list[int]:
    if n_images and not assets.mm_tokens_per_image:
        raise MedcError("this model is text-only: it takes no images.")
    return _encode(assets, *render_prompt(assets, prompt, n_images), n_images)


def planned_positions(memory_plan: dict | None, generation: dict) -> int | None:
    """Tokens (prompt and answer) whose KV cache one sequence may hold by the build's memory plan
    (manifest build.memory_plan); None when the plan names no usable memory. The rule, from the manifest's numbers
    only (the runtime does not import medc.compile):

      KV budget of one sequence = min(kv_bytes, usable_bytes - (total_bytes - kv_bytes)) / batch
      (what the plan gave the KV cache at `context` tokens, less any shortfall of the target's usable memory:
      weights, activations planned at the full context and the runtime's own memory are taken as fixed)
      KV(T) = KV at context x sum over layers of min(T, keep) / sum over layers of min(context, keep)
      (generation.kv_layout: a sliding-window layer keeps at most `keep` positions; without a layout KV grows
      linearly)

    The largest T <= context with KV(T) <= that budget. When the plan fits, it is `context`: the memory bounds
    nothing the context does not; a plan over its target's memory (an --allow-degraded build, or a manifest tightened
    for a smaller device) bounds it below."""
    plan = memory_plan or {}
    keys = ("context", "kv_bytes", "usable_bytes", "total_bytes")
    if any(plan.get(k) is None for k in keys) or not plan["kv_bytes"]:
        return None
    context, kv, batch = int(plan["context"]), int(plan["kv_bytes"]), max(1, int(plan.get("batch") or 1))
    budget = min(kv, int(plan["usable_bytes"]) - (int(plan["total_bytes"]) - kv)) / batch
    keeps = [layer.get("keep") for layer in generation.get("kv_layout") or []] or [None]

    def kv_at(t: int) -> float:
        held = sum(min(t, k or t) for k in keeps)
        return kv / batch * held / sum(min(context, k or context) for k in keeps)

    if budget <= 0:
        return 0
    lo, hi = 0, context  # kv_at grows with t: the largest t whose KV fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if kv_at(mid) <= budget else (lo, mid - 1)
    return lo


def prompt_positions(assets) -> int:
    """Tokens one prompt and its answer may hold here: the context, or less where the memory plan says so."""
    mem = getattr(assets, "memory_positions", None)
    return assets.max_positions if mem is None else min(assets.max_positions, mem)


def image_tokens(assets) -> int:
    """Tokens one more image adds to a prompt that holds one: its soft tokens, begin/end of image and the newlines
    between (measured from 2 images and 1: the newlines of images side by side may merge into fewer tokens)."""
    return max(1, len(encode_prompt(assets, "", 2)) - len(encode_prompt(assets, "", 1)))


def max_slices(assets, prompt: str, max_new_tokens: int) -> int:
    """How many images of `assets.mm_tokens_per_image` tokens (each with its begin/end tokens) fit together with the
    prompt and the answer in `prompt_positions` (the bundle's context, bounded by its memory plan: see
    `planned_positions`): the default --slices, and the bound for a larger one."""
    room = prompt_positions(assets) - len(encode_prompt(assets, prompt, 1)) - max_new_tokens
    return 0 if room < 0 else 1 + room // image_tokens(assets)


def encode_messages(assets: PromptAssets, messages: list[dict]) -> list[int]:
    """Token ids of a conversation (see `render_messages`), ready for generation."""
    n_images = sum(1 for m in messages if not isinstance(m["content"], str)
                   for p in m["content"] if p["type"] == "image")
    if n_images and not assets.mm_tokens_per_image:
        raise MedcError("this model is text-only: it takes no images.")
    return _encode(assets, *render_messages(assets, messages), n_images)


def _encode(assets: PromptAssets, text: str, add_special: bool, n_images: int) -> list[int]:
    ids = assets.tokenizer.encode(expand_images(assets, text), add_special_tokens=add_special).ids
    found = sum(1 for i in ids if i == assets.special_ids.get("image")) // max(assets.mm_tokens_per_image, 1)
    if found != n_images:
        raise MedcError(f"the prompt holds {found} image slots but {n_images} images were given.")
    return ids


def build_prompt_batch(assets: PromptAssets, prompts: list[str], images: list[list] | None = None) -> PromptBatch:
    seqs = [encode_prompt(assets, p, len(images[i]) if images else 0) for i, p in enumerate(prompts)]
    longest = max(len(s) for s in seqs)
    b = len(seqs)
    ids = np.full((b, longest), assets.special_ids["pad"], np.int64)
    mask = np.zeros((b, longest), np.int64)
    for i, s in enumerate(seqs):
        ids[i, longest - len(s):] = s
        mask[i, longest - len(s):] = 1
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    types = (ids == assets.special_ids.get("image", -1)).astype(np.int64)
    return PromptBatch(ids, mask, positions, types, [len(s) for s in seqs])


class GemmaPipeline(Pipeline):
    """`with medc.runtime.load(bundle) as m: print(m.generate("Is there a pneumothorax?", images=["cxr.png"]))`."""

    def __init__(self, bundle, threads: int | None = None):
        super().__init__(bundle, threads)
        m = bundle.manifest
        self.gen = m.generation
        self.preprocess = ImagePreprocessing.from_json(m.preprocessing["image"]) if "image" in m.preprocessing else None
        self._assets = None
        # The decoder, chosen once: the engine's when the bundle has one that runs here, else the graph form's.
        engine = isinstance(self._sessions["decoder"], TrtSession)
        self._decoder = TrtDecoder if engine else DECODERS[self.attention]
        self._decoder.check()
        self.vocab = VocabMap.from_bundle(bundle)  # None unless built with --vocab (reduced lm_head)
        # The vision encoder runs before a prompt's first decoder step: its activations are released after each
        # run (ONNX Runtime's arena shrinkage; a TensorRT context given its memory per run), so they are never held
        # beside the decoder's.
        vision = self._sessions.get("vision_encoder")
        if isinstance(vision, (OrtSession, TrtSession)):
            vision.release_activations = True

    @property
    def attention(self) -> str:
        """The decoder's graph form, as built: "gqa" (KV slots updated in place) or "explicit" (standard ops)."""
        return self.gen.get("attention", "explicit")

    @property
    def assets(self) -> PromptAssets:
        if self._assets is None:
            from tokenizers import Tokenizer

            t = self.bundle.manifest.tokenizer
            self._assets = PromptAssets(
                tokenizer=Tokenizer.from_file(str(self.bundle.file(t["file"]))), chat_template=t.get("chat_template"),
                special_ids=t["special_ids"], special_tokens=t["special_tokens"],
                mm_tokens_per_image=int(self.bundle.manifest.preprocessing.get("mm_tokens_per_image", 0)),
                max_positions=int(self.gen["max_positions"]),
                memory_positions=planned_positions((self.bundle.manifest.build or {}).get("memory_plan"), self.gen))
        return self._assets

    @property
    def eos_ids(self) -> set[int]:
        return set(self.bundle.manifest.tokenizer["eos_token_ids"])

    # -- the parts the sampling loop runs ---------------------------------------------------------------------------
    def decoder(self, slots: int) -> Decoder:
        """A decoder with KV caches for `slots` sequences (its memory lives as long as it does)."""
        # The text graphs load before the cache, the larger first: a graph is held twice while it loads (ONNX
        # Runtime parses the file, then copies its weights), so the larger one's load peak meets nothing else
        # resident (the planner counts it so: compile/planner.py `load_bytes`).
        comps = self.bundle.manifest.components
        for name in sorted(("embed_tokens", "decoder"), key=lambda n: -self.bundle.file(comps[n].file).stat().st_size):
            self._sessions[name].open()
        return self._decoder(self._sessions["decoder"], self.gen, slots)

    def embed(self, ids: np.ndarray) -> np.ndarray:
        """Token ids [B, S] -> embeddings [B, S, H]."""
        return self._sessions["embed_tokens"].run({"input_ids": ids})["inputs_embeds"]

    def encode_images(self, pixel_values: np.ndarray) -> np.ndarray:
        """Preprocessed images [N, 3, H, W] -> their soft tokens [N, tokens per image, H]."""
        return self._sessions["vision_encoder"].run({"pixel_values": pixel_values})["image_features"]

    def batch(self, slots: int) -> Batch:
        """The sampling loop over a new decoder of `slots` slots (runtime/batch.py)."""
        return Batch(self.decoder(slots), self.embed, self.encode_images, self.assets.special_ids.get("image"),
                     self.eos_ids, self.vocab, self.adapters)

    @property
    def adapters(self) -> dict[str, Path]:
        """Run-time LoRA adapters (`medc build --adapter-slot`, `medc adapter add`): name -> file in the bundle."""
        lora = self.gen.get("lora") or {}
        return {name: self.bundle.file(a["file"]) for name, a in lora.get("adapters", {}).items()}

    # -- generation -------------------------------------------------------------------------------------------------
    def generate(self, prompt: str | list[str], images=None, params: SamplingParams | None = None, **kw) -> str | list[str]:
        """Whole answers. `prompt` may be a list; `images` a list of images for one prompt or a list of lists for a
        batch."""
        single = isinstance(prompt, str)
        out = self.generate_ids([prompt] if single else list(prompt), images, params, **kw)
        texts = [self.assets.tokenizer.decode(ids, skip_special_tokens=True) for ids in out]
        return texts[0] if single else texts

    def generate_ids(self, prompts: list[str], images=None, params: SamplingParams | None = None, **kw) -> list[list[int]]:
        out = [[] for _ in prompts]
        for step in self.stream(prompts, images, params, **kw):
            for i, tok in enumerate(step):
                if tok is not None:
                    out[i].append(tok)
        return out

    def stream(self, prompts: list[str], images=None, params: SamplingParams | None = None,
               callback: Callable[[list[int | None]], None] | None = None, **kw) -> Iterator[list[int | None]]:
        """Yields, per position of the answers, the new token of each prompt (None once that prompt has stopped)."""
        params = params or SamplingParams(**kw)
        params.validate()
        if params.adapter is not None and params.adapter not in self.adapters:
            raise MedcError(f"this bundle has no adapter {params.adapter!r}; it has "
                            f"{', '.join(self.adapters) or 'none'} (`medc adapter add BUNDLE DIR` adds one).")
        if images is not None and prompts and images and not isinstance(images[0], (list, tuple)):
            images = [list(images)] * len(prompts) if len(prompts) == 1 else [[im] for im in images]
        ids = [encode_prompt(self.assets, p, len(images[i]) if images else 0) for i, p in enumerate(prompts)]
        longest = max(len(x) for x in ids)
        if longest + params.max_new_tokens > self.assets.max_positions:
            raise MedcError(f"prompt of {longest} tokens + {params.max_new_tokens} new tokens exceeds this build's "
                            f"context limit of {self.assets.max_positions} tokens; shorten the prompt or "
                            "max_new_tokens, or rebuild with --context N.")
        tokens: list[list[int]] = [[] for _ in ids]
        seqs = [Sequence(x, self.preprocess(images[i]) if images and images[i] else None, params,
                         emit=lambda kind, value, out=tokens[i]: out.append(value) if kind == "token" else None)
                for i, x in enumerate(ids)]
        batch = self.batch(len(seqs))
        for seq in seqs:
            batch.admit(seq)
        for k in range(params.max_new_tokens):  # answer position k: once every prompt has its token k, or stopped
            while batch.active and not all(len(t) > k or s.finished for t, s in zip(tokens, seqs)):
                batch.step()
            step = [t[k] if len(t) > k else None for t in tokens]
            if callback:
                callback(step)
            yield step
            # done once every prompt has stopped: at its last token, or (an end-of-turn token) the step after it
            if all(s.finished and len(t) <= k + (s.finished != "stop") for t, s in zip(tokens, seqs)):
                return
