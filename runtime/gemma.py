"""MedGemma / Gemma 3 at run time: prompts (chat template, image tokens), then prefill and cached decode.

numpy + onnxruntime + tokenizers + jinja2; no torch. The KV cache stays in ONNX Runtime values between steps (the
present outputs of one step are bound as the past inputs of the next), so a decode step does not copy the cache
through numpy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from medc.errors import MedcError
from medc.runtime.session import Pipeline


@dataclass
class PromptAssets:
    """What turning text (and images) into decoder inputs needs; built from a bundle manifest or at build time."""

    tokenizer: object  # tokenizers.Tokenizer
    chat_template: str | None
    special_ids: dict[str, int]  # bos, eos, pad, boi, eoi, image, start_of_turn, end_of_turn
    special_tokens: dict[str, str]  # the same, as strings
    mm_tokens_per_image: int = 0
    max_positions: int = 131072


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


def image_attention(is_image: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """For a prefill of one prompt from an empty cache: the rows of its image tokens [R] and their attention mask
    over the prompt as additive biases [2, R, S] (global layers, sliding layers), as HF's Gemma 3 builds it: image
    tokens of one image see each other in both directions, OR the causal mask, AND (sliding layers) the window."""
    is_image = np.asarray(is_image, bool)
    rows = np.nonzero(is_image)[0].astype(np.int64)
    prev = np.concatenate([[False], is_image[:-1]])
    block = np.where(is_image, np.cumsum(is_image & ~prev), 0)
    q, k = rows[:, None], np.arange(len(is_image))[None]
    allowed = ((block[rows][:, None] == block[None]) & (block[None] > 0)) | (k <= q)
    neg = np.float32(-1e30)  # every row sees itself, so no row is all -inf
    bias = np.stack([np.where(allowed, 0, neg), np.where(allowed & (k > q - window), 0, neg)]).astype(np.float32)
    return rows, bias


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False  # run exactly max_new_tokens (benchmarks and fidelity gates)

    def validate(self) -> None:
        if self.max_new_tokens <= 0:
            raise MedcError(f"max_new_tokens must be >= 1 (got {self.max_new_tokens}).")
        if self.temperature < 0:
            raise MedcError(f"temperature must be >= 0 (got {self.temperature}); 0 means greedy.")
        if self.top_k < 0:
            raise MedcError(f"top_k must be >= 0 (got {self.top_k}); 0 turns it off.")
        if not 0 < self.top_p <= 1:
            raise MedcError(f"top_p must be in (0, 1] (got {self.top_p}).")


def choose(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> np.ndarray:
    """Next token per row of [B, V] logits: greedy, or temperature / top-k / top-p sampling."""
    if params.temperature == 0:
        return logits.argmax(-1)
    x = logits.astype(np.float64) / params.temperature
    if params.top_k:
        kth = np.sort(x, axis=-1)[:, -min(params.top_k, x.shape[-1])][:, None]
        x = np.where(x < kth, -np.inf, x)
    p = np.exp(x - x.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    if params.top_p < 1:
        order = np.argsort(-p, axis=-1)
        sorted_p = np.take_along_axis(p, order, -1)
        keep = np.cumsum(sorted_p, -1) - sorted_p < params.top_p  # always keeps the top token
        mask = np.zeros_like(p, bool)
        np.put_along_axis(mask, order, keep, -1)
        p = np.where(mask, p, 0)
        p /= p.sum(-1, keepdims=True)
    return np.array([rng.choice(len(row), p=row) for row in p])


GQA_ONNXRUNTIME = (1, 32)  # GroupQueryAttention's query_seqlens input (the slot form, compile/models/gemma3_gqa.py)


def _require_onnxruntime(version: tuple[int, int], why: str) -> None:
    """A bundle whose graphs this onnxruntime would refuse as invalid: say so before loading, with the fix."""
    import onnxruntime as ort

    have = tuple(int(x) for x in ort.__version__.split(".")[:2] if x.isdigit())
    if have < version:
        need = ".".join(map(str, version))
        raise MedcError(f"this bundle needs onnxruntime >= {need} ({why}); this machine has {ort.__version__}. "
                        f"Upgrade it (`pip install -U 'onnxruntime>={need}'`), or rebuild the bundle for a GPU target "
                        "or with --flavour portable (explicit attention, which older onnxruntime runs).")


class GemmaPipeline(Pipeline):
    """`with medc.runtime.load(bundle) as m: print(m.generate("Is there a pneumothorax?", images=["cxr.png"]))`."""

    def __init__(self, bundle, threads: int | None = None):
        super().__init__(bundle, threads)
        m = bundle.manifest
        self.gen = m.generation
        self.preprocess = None
        if "image" in m.preprocessing:
            from medc.runtime.preprocess import ImagePreprocessing

            self.preprocess = ImagePreprocessing.from_json(m.preprocessing["image"])
        self._assets = None
        self._packs: bool | None = None
        if self.attention == "gqa":
            _require_onnxruntime(GQA_ONNXRUNTIME, "its decoder's GroupQueryAttention reads query_seqlens")

    @property
    def assets(self) -> PromptAssets:
        if self._assets is None:
            from tokenizers import Tokenizer

            t = self.bundle.manifest.tokenizer
            self._assets = PromptAssets(
                tokenizer=Tokenizer.from_file(str(self.bundle.file(t["file"]))), chat_template=t.get("chat_template"),
                special_ids=t["special_ids"], special_tokens=t["special_tokens"],
                mm_tokens_per_image=int(self.bundle.manifest.preprocessing.get("mm_tokens_per_image", 0)),
                max_positions=int(self.gen["max_positions"]))
        return self._assets

    @property
    def eos_ids(self) -> set[int]:
        return set(self.bundle.manifest.tokenizer["eos_token_ids"])

    @property
    def packs(self) -> bool:
        """Whether the decoder runs only a step's real tokens (`token_rows`, compile/models/gemma3_gqa.py), so a
        prompt's chunk and other slots' decode tokens share one step at the cost of their tokens, not of padding.
        Slot-form bundles built before it pad instead; the scheduler then runs prefills as steps of their own."""
        if self._packs is None:
            self._packs = self.attention == "gqa" and any(
                i.name == "token_rows" for i in self._sessions["decoder"].open()._sess.get_inputs())
        return self._packs

    @property
    def attention(self) -> str:
        """"gqa": KV slots updated in place (runtime/kvcache.py); "explicit": the cache is passed step to step."""
        return self.gen.get("attention", "explicit")

    # -- generation -------------------------------------------------------------------------------------------------
    def generate(self, prompt: str | list[str], images=None, params: SamplingParams | None = None, **kw) -> str | list[str]:
        """Whole answers. `prompt` may be a list (batched, left-padded); `images` a list of images for one prompt or a
        list of lists for a batch."""
        single = isinstance(prompt, str)
        prompts = [prompt] if single else list(prompt)
        out = [[] for _ in prompts]
        for step in self.stream(prompts, images, params, **kw):
            for i, tok in enumerate(step):
                if tok is not None:
                    out[i].append(tok)
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
        """Yields, per decode step, the new token of each prompt (None once that prompt has stopped)."""
        params = params or SamplingParams(**kw)
        params.validate()
        if images is not None and prompts and images and not isinstance(images[0], (list, tuple)):
            images = [list(images)] * len(prompts) if len(prompts) == 1 else [[im] for im in images]
        if self.attention == "gqa":
            yield from self._stream_slots(prompts, images, params, callback)
            return
        batch = build_prompt_batch(self.assets, prompts, images)
        b, s = batch.input_ids.shape
        if s + params.max_new_tokens > self.assets.max_positions:
            raise MedcError(f"prompt of {s} tokens + {params.max_new_tokens} new tokens exceeds this build's context "
                            f"limit of {self.assets.max_positions} tokens; shorten the prompt or max_new_tokens.")
        embeds = self._embed(batch.input_ids)
        if images:
            flat = [im for row in images for im in row]
            feats = self._sessions["vision_encoder"].run({"pixel_values": self.preprocess(flat)})["image_features"]
            embeds[batch.input_ids == self.assets.special_ids["image"]] = feats.reshape(-1, embeds.shape[-1])
        rng = np.random.default_rng(params.seed)
        decoder = self._sessions["decoder"].open()
        past = self._empty_past(b)
        feeds = {"inputs_embeds": embeds, "attention_mask": batch.attention_mask, "position_ids": batch.position_ids,
                 "token_type_ids": batch.token_type_ids, "logits_positions": np.array([s - 1], np.int64)}
        mask, pos = batch.attention_mask, batch.position_ids[:, -1:]
        done = np.zeros(b, bool)
        for _ in range(params.max_new_tokens):
            logits, past = self._step(decoder, feeds, past)
            tokens = choose(logits[:, -1], params, rng)
            step = [None if done[i] else int(t) for i, t in enumerate(tokens)]
            if not params.ignore_eos:
                done |= np.isin(tokens, list(self.eos_ids))
                step = [None if (t is not None and t in self.eos_ids) else t for t in step]
            if callback:
                callback(step)
            yield step
            if done.all():
                return
            mask = np.concatenate([mask, np.ones((b, 1), np.int64)], axis=1)
            pos = pos + 1
            feeds = {"inputs_embeds": self._embed(tokens[:, None].astype(np.int64)), "attention_mask": mask,
                     "position_ids": pos, "token_type_ids": np.zeros((b, 1), np.int64),
                     "logits_positions": np.zeros(1, np.int64)}

    # -- the ORT flavour: KV slots updated in place ----------------------------------------------------------------
    PREFILL_CHUNK = 512  # prompt tokens per step: a prefill's chunks, or what one serving step carries (scheduler.py)

    def new_cache(self, slots: int):
        from medc.runtime.kvcache import SlotCache

        return SlotCache(self.gen, slots)

    def step(self, cache, lo: int, hi: int, embeds: np.ndarray, new, logits_index, image_rows=None,
             image_bias=None) -> np.ndarray:
        """One decoder call over slots [lo, hi): row r adds new[r] tokens (right-padded rows of `embeds`, 0 = idle).
        Returns logits [hi - lo, L, V] at `logits_index` rows; the slots' caches are updated in place."""
        new = np.asarray(new, np.int64)
        held = cache.lengths[lo:hi]
        total = held + new
        sess = self._sessions["decoder"].open()._sess
        binding = cache.bindings.get((lo, hi))
        if binding is None:  # the cache stays bound between steps over the same slots; only the inputs change
            binding = cache.bindings[(lo, hi)] = sess.io_binding()
            for name, value in cache.values(lo, hi).items():  # past and present: the same memory
                binding.bind_ortvalue_input(name, value)
                binding.bind_ortvalue_output(name.replace("past_", "present_"), value)
        feeds = {"inputs_embeds": embeds, "seqlens_k": np.maximum(total - 1, 0).astype(np.int32),
                 "total_sequence_length": np.array(max(int(total.max()), 1), np.int32),
                 "query_seqlens": new.astype(np.int32), "logits_index": np.asarray(logits_index, np.int64),
                 "image_rows": np.zeros(0, np.int64) if image_rows is None else image_rows,
                 "image_bias": (np.zeros((2, 0, embeds.shape[1]), np.float32) if image_bias is None else image_bias)}
        if self.packs:
            from medc.runtime.kvcache import token_rows

            feeds["token_rows"] = token_rows(new, embeds.shape[1])
        for name, arr in feeds.items():
            binding.bind_cpu_input(name, np.require(arr, requirements="C"))
        binding.bind_output("logits", "cpu")
        sess.run_with_iobinding(binding)
        cache.lengths[lo:hi] = total
        return binding.get_outputs()[-1].numpy()

    def prefill_steps(self, cache, slot: int, ids: list[int], pixel_values: np.ndarray | None = None):
        """Prefill one prompt into an empty slot: yields None after each chunk but the last, then the last
        position's logits [V]. A prompt with images runs as one step (its image rows attend both ways)."""
        ids = np.asarray([ids], np.int64)
        embeds = self._embed(ids)
        is_image = ids[0] == self.assets.special_ids.get("image", -1)
        cache.reset(slot)
        cache.check_room(slot, ids.shape[1])
        if pixel_values is not None and len(pixel_values):
            feats = self._sessions["vision_encoder"].run({"pixel_values": pixel_values})["image_features"]
            embeds[0, is_image] = feats.reshape(-1, embeds.shape[-1])
            rows, bias = image_attention(is_image, int(self.gen["sliding_window"]))
            n = ids.shape[1]
            yield self.step(cache, slot, slot + 1, embeds, [n], [[n - 1]], rows, bias)[0, -1]
            return
        n = ids.shape[1]
        for start in range(0, n, self.PREFILL_CHUNK):
            chunk = embeds[:, start:start + self.PREFILL_CHUNK]
            m = chunk.shape[1]
            logits = self.step(cache, slot, slot + 1, chunk, [m], [[m - 1]])
            yield logits[0, -1] if start + m == n else None

    def prefill_slot(self, cache, slot: int, ids: list[int], pixel_values: np.ndarray | None = None) -> np.ndarray:
        *_, logits = self.prefill_steps(cache, slot, ids, pixel_values)
        return logits

    def _stream_slots(self, prompts, images, params: SamplingParams, callback):
        seqs = [encode_prompt(self.assets, p, len(images[i]) if images else 0) for i, p in enumerate(prompts)]
        longest = max(len(x) for x in seqs)
        if longest + params.max_new_tokens > self.assets.max_positions:
            raise MedcError(f"prompt of {longest} tokens + {params.max_new_tokens} new tokens exceeds this build's "
                            f"context limit of {self.assets.max_positions} tokens; shorten the prompt or "
                            "max_new_tokens, or rebuild with --context N.")
        b = len(seqs)
        cache = self.new_cache(b)
        logits = np.stack([self.prefill_slot(cache, i, ids, self.preprocess(images[i]) if images and images[i] else None)
                           for i, ids in enumerate(seqs)])
        rng = np.random.default_rng(params.seed)
        done = np.zeros(b, bool)
        for _ in range(params.max_new_tokens):
            logits[done] = 0  # idle rows' outputs are unspecified
            tokens = choose(logits, params, rng)
            step = [None if done[i] else int(t) for i, t in enumerate(tokens)]
            if not params.ignore_eos:
                done |= np.isin(tokens, list(self.eos_ids))
                step = [None if (t is not None and t in self.eos_ids) else t for t in step]
            if callback:
                callback(step)
            yield step
            if done.all():
                return
            logits = self.step(cache, 0, b, self._embed(tokens[:, None].astype(np.int64)), (~done).astype(np.int64),
                               np.zeros((b, 1), np.int64))[:, 0]

    # -- one sequence at a time, for continuous batching (runtime/scheduler.py) ---------------------------------
    def prefill(self, ids: list[int], pixel_values: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
        """One prompt, unpadded: the last position's logits [V] and its KV cache as numpy arrays [1, kv, n, d] (the
        same first step as `stream` with a single prompt)."""
        batch = np.asarray([ids], np.int64)
        s = batch.shape[1]
        embeds = self._embed(batch)
        types = (batch == self.assets.special_ids.get("image", -1)).astype(np.int64)
        if pixel_values is not None and len(pixel_values):
            feats = self._sessions["vision_encoder"].run({"pixel_values": pixel_values})["image_features"]
            embeds[types == 1] = feats.reshape(-1, embeds.shape[-1])
        feeds = {"inputs_embeds": embeds, "attention_mask": np.ones((1, s), np.int64),
                 "position_ids": np.arange(s, dtype=np.int64)[None], "token_type_ids": types,
                 "logits_positions": np.array([s - 1], np.int64)}
        logits, present = self._step(self._sessions["decoder"].open(), feeds, self._empty_past(1))
        return logits[0, -1], {k: v.numpy() for k, v in present.items()}

    def decode(self, tokens: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
               past: dict) -> tuple[np.ndarray, dict]:
        """One decode step for a batch: tokens [B], mask [B, past + 1], positions [B]; `past` holds numpy arrays or
        the OrtValues a previous step returned. -> logits [B, V] and the present KV (OrtValues)."""
        import onnxruntime as ort

        b = len(tokens)
        feeds = {"inputs_embeds": self._embed(np.asarray(tokens, np.int64)[:, None]), "attention_mask": attention_mask,
                 "position_ids": np.asarray(position_ids, np.int64)[:, None],
                 "token_type_ids": np.zeros((b, 1), np.int64), "logits_positions": np.zeros(1, np.int64)}
        past = {k: v if isinstance(v, ort.OrtValue) else ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v))
                for k, v in past.items()}
        logits, present = self._step(self._sessions["decoder"].open(), feeds, past)
        return logits[:, -1], present

    def _embed(self, ids: np.ndarray) -> np.ndarray:
        return self._sessions["embed_tokens"].run({"input_ids": ids})["inputs_embeds"]

    def _empty_past(self, batch: int) -> dict:
        import onnxruntime as ort

        g = self.gen
        shape = lambda: (batch, g["num_kv_heads"], 0, g["head_dim"])  # noqa: E731
        return {f"past_{kv}.{i}": ort.OrtValue.ortvalue_from_numpy(np.zeros(shape(), np.float32))
                for i in range(g["num_layers"]) for kv in ("key", "value")}

    def _step(self, session, feeds: dict[str, np.ndarray], past: dict) -> tuple[np.ndarray, dict]:
        """One decoder call with IOBinding: past KV goes in as the OrtValues the previous step produced. On a GPU
        provider the present KV stays in device memory (only the logits come back): copying the whole cache to the
        host and back every step would cost more than the step."""
        sess = session._sess
        binding = sess.io_binding()
        for name, arr in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(arr))
        for name, value in past.items():
            binding.bind_ortvalue_input(name, value)
        names = [o.name for o in sess.get_outputs()]
        device = "cuda" if sess.get_providers()[0] in ("CUDAExecutionProvider", "TensorrtExecutionProvider") else "cpu"
        for name in names:
            binding.bind_output(name, "cpu" if name == "logits" else device)
        sess.run_with_iobinding(binding)
        values = binding.get_outputs()
        logits = values[0].numpy()
        present = {n.replace("present_", "past_"): v for n, v in zip(names[1:], values[1:])}
        return logits, present
