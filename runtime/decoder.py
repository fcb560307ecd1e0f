"""A generative bundle's decoder at run time: one interface over a batch of KV slots, one implementation per graph
form, chosen once per bundle from its manifest (`GemmaPipeline`, runtime/gemma.py):

- `SlotDecoder` (`generation.attention` "gqa", compile/models/gemma3_gqa.py): ONNX Runtime's GroupQueryAttention
  updates each slot's KV buffer in place (runtime/kvcache.py). A step runs over a range of slots and adds any number
  of tokens per slot, so a prompt's chunk can ride beside the other slots' decode tokens (`packs`).
- `ExplicitDecoder` ("explicit", compile/models/gemma3.py): the cache is the graph's output, passed back in. A
  prompt prefills alone, a chunk per step (an image never split: `chunk_end`); the decoding slots step together as
  one left-padded batch, regrouped (each slot's cache cut out, then padded again to the longest) only when the set
  of slots changes. Left padding keeps every sequence's tokens contiguous at the right, which is what the
  sliding-window layers assume.
- `TrtDecoder` (runtime/trt_session.py): the explicit graph as a TensorRT engine, its cache kept on the GPU.

A step is a list of `Chunk`s, one per slot it advances; what goes into a step, and sampling, is runtime/batch.py's.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medc.errors import MedcError
from medc.runtime.kvcache import SlotCache, token_rows
from medc.system import version_tuple


@dataclass(eq=False)
class Chunk:
    """What one slot adds in a decoder step."""

    slot: int
    embeds: np.ndarray  # [n, hidden] float32: the slot's next n tokens
    logits_at: np.ndarray  # int64 [k]: rows of this chunk whose logits come back (the last, when generating)
    images: np.ndarray | None = None  # bool [n]: image soft tokens (whole images only: see `chunk_end`)


# Prompt tokens per prefill step of both decoders (an image longer than this is one step of its own): what bounds
# a prefill's activations, and what the planner sizes them for (compile/planner.py).
PREFILL_CHUNK = 512


def chunk_end(images: np.ndarray | None, start: int, size: int | None, total: int) -> int:
    """Where the prompt chunk that starts at `start` ends: `size` tokens at most (None: the whole prompt), but an
    image's soft tokens (`images`, bool over the whole prompt) never split: they attend to each other in both
    directions only within one step. A boundary inside an image moves back to the image's start, or, where the
    chunk starts with that image, forward to its end (the chunk grows to hold it)."""
    end = total if size is None else min(total, start + size)
    if images is None or end >= total or not (images[end - 1] and images[end]):
        return end
    first = end - 1
    while first > start and images[first - 1]:
        first -= 1
    if first > start:
        return first
    while end < total and images[end]:
        end += 1
    return end


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


def require_onnxruntime(version: tuple[int, int], why: str) -> None:
    """A bundle whose graphs this onnxruntime would refuse as invalid: say so before loading, with the fix."""
    import onnxruntime as ort

    if version_tuple(ort.__version__, 2) < version:
        need = ".".join(map(str, version))
        raise MedcError(f"this bundle needs onnxruntime >= {need} ({why}); this machine has {ort.__version__}. "
                        f"Upgrade it (`pip install -U 'onnxruntime>={need}'`), or rebuild the bundle for a GPU target "
                        "or with --flavour portable (explicit attention, which older onnxruntime runs).")


def _no_adapter(adapter, what: str) -> None:
    if adapter is not None:
        raise MedcError(f"run-time adapters need the decoder with LoRA slots (CPU targets, --adapter-slot); {what} "
                        "has none: merge the adapter at build (--adapter).")


class Decoder(ABC):
    """`slots` sequences' KV caches and the decoder graph that extends them, a step at a time."""

    packs = False  # a step may carry a prompt's chunk beside other slots' decode tokens
    prefill_chunk: int | None = None  # prompt tokens per step at most (None: a whole prompt in one step)
    chunks_images = False  # a prompt with images may prefill in chunks (else in one step, from an empty slot)

    def __init__(self, generation: dict, slots: int):
        self.gen = generation
        self.lengths = np.zeros(slots, np.int64)  # tokens each slot holds
        self.context = int(generation["max_positions"])

    @classmethod
    def check(cls) -> None:
        """Refuse, before anything is loaded, a bundle this machine's runtime cannot run with this decoder."""

    @property
    def slots(self) -> int:
        return len(self.lengths)

    def reset(self, slot: int) -> None:
        """The slot holds nothing: its next chunk starts a new sequence."""
        self.lengths[slot] = 0

    def carry_width(self) -> int | None:
        """The most prompt tokens one chunk may carry in a joint step (None: no limit beyond `prefill_chunk`)."""
        return None

    def check_room(self, slot: int, new_tokens: int) -> None:
        if self.lengths[slot] + new_tokens > self.context:
            raise MedcError(f"{int(self.lengths[slot]) + new_tokens} tokens exceed this build's context of "
                            f"{self.context}; shorten the prompt or max_new_tokens, or rebuild with --context N.")

    @abstractmethod
    def step(self, chunks: list[Chunk], adapter: Path | None = None) -> list[np.ndarray]:
        """One step: each chunk's tokens added to its slot. Returns each chunk's logits [len(logits_at), V]."""

    def close(self) -> None:
        pass


# -- ORT flavour: KV slots updated in place -------------------------------------------------------------------------
GQA_ONNXRUNTIME = (1, 32)  # GroupQueryAttention's query_seqlens input (the slot form, compile/models/gemma3_gqa.py)


class SlotDecoder(Decoder):
    """GroupQueryAttention with past and present bound to the same buffers: a step writes its new keys and values
    in place and copies nothing, whatever the context. A step runs over slots [lo, hi); rows of slots it does not
    advance add nothing (their caches untouched)."""

    prefill_chunk = PREFILL_CHUNK

    def __init__(self, session, generation: dict, slots: int):
        super().__init__(generation, slots)
        self.session = session
        self.cache = SlotCache(generation, slots)
        self.lengths = self.cache.lengths  # one count per slot, shared with the cache
        self.context = self.cache.context
        # The decoder computes only a step's real tokens (`token_rows`); slot-form bundles built before that pad
        # instead, and then prompts prefill in steps of their own.
        self.packs = "token_rows" in session.input_names

    @classmethod
    def check(cls) -> None:
        require_onnxruntime(GQA_ONNXRUNTIME, "its decoder's GroupQueryAttention reads query_seqlens")

    def carry_width(self) -> int:
        """A joint step pads every row to its widest chunk, and GroupQueryAttention requires each row's cached
        tokens plus that padded width to fit the cache: a slot deep in its context narrows what a prompt may carry."""
        return max(0, self.context - int(self.lengths.max()))

    def step(self, chunks: list[Chunk], adapter: Path | None = None) -> list[np.ndarray]:
        lo, hi = min(c.slot for c in chunks), max(c.slot for c in chunks) + 1
        width = max(len(c.embeds) for c in chunks)
        wanted = max(len(c.logits_at) for c in chunks)
        embeds = np.zeros((hi - lo, width, chunks[0].embeds.shape[-1]), np.float32)
        new = np.zeros(hi - lo, np.int64)
        index = np.zeros((hi - lo, wanted), np.int64)
        rows = bias = None
        for c in chunks:
            r, n = c.slot - lo, len(c.embeds)
            embeds[r, :n], new[r] = c.embeds, n
            index[r] = np.pad(c.logits_at, (0, wanted - len(c.logits_at)), mode="edge")
            if c.images is not None and c.images.any():
                if len(chunks) > 1 or self.lengths[c.slot]:
                    raise MedcError("a prompt with images is prefilled alone, from an empty slot.")
                rows, bias = image_attention(c.images, int(self.gen["sliding_window"]))
        logits = self._run(lo, hi, embeds, new, index, rows, bias, adapter)
        return [logits[c.slot - lo, :len(c.logits_at)] for c in chunks]

    def _run(self, lo: int, hi: int, embeds: np.ndarray, new: np.ndarray, logits_index: np.ndarray,
             image_rows=None, image_bias=None, adapter: Path | None = None) -> np.ndarray:
        """One decoder call over slots [lo, hi): row r adds new[r] tokens (right-padded rows of `embeds`, 0 = idle).
        Returns logits [hi - lo, L, V] at `logits_index` rows; the slots' caches are updated in place."""
        cache = self.cache
        held = cache.lengths[lo:hi]
        total = held + new
        binding = cache.bindings.get((lo, hi))
        if binding is None:  # the cache stays bound between steps over the same slots; only the inputs change
            binding = cache.bindings[(lo, hi)] = self.session.io_binding()
            for name, value in cache.values(lo, hi).items():  # past and present: the same memory
                binding.bind_ortvalue_input(name, value)
                binding.bind_ortvalue_output(name.replace("past_", "present_"), value)
        feeds = {"inputs_embeds": embeds, "seqlens_k": np.maximum(total - 1, 0).astype(np.int32),
                 "total_sequence_length": np.array(max(int(total.max()), 1), np.int32),
                 "query_seqlens": new.astype(np.int32), "logits_index": logits_index,
                 "image_rows": np.zeros(0, np.int64) if image_rows is None else image_rows,
                 "image_bias": (np.zeros((2, 0, embeds.shape[1]), np.float32) if image_bias is None else image_bias)}
        if self.packs:
            feeds["token_rows"] = token_rows(new, embeds.shape[1])
        for name, arr in feeds.items():
            binding.bind_cpu_input(name, np.require(arr, requirements="C"))
        binding.bind_output("logits", "cpu")
        self.session.run_bound(binding, adapter)
        cache.lengths[lo:hi] = total
        return binding.get_outputs()[-1].numpy()


# -- portable flavour: the cache passed from step to step -----------------------------------------------------------
class ExplicitDecoder(Decoder):
    """The explicit-attention graph on ONNX Runtime. Between steps a batch's cache stays in ONNX Runtime values (on
    a GPU provider, in device memory: copying it to the host every step would cost more than the step).

    Prompts prefill `prefill_chunk` tokens per step, so a step's attention scores are chunk x context, not
    prompt x prompt (the planner sizes activations for one chunk). The graph builds its image mask from the step's
    own token_type_ids, so a chunk may follow cached tokens with images in it, as long as no image is split."""

    prefill_chunk = PREFILL_CHUNK
    chunks_images = True

    def __init__(self, session, generation: dict, slots: int):
        super().__init__(generation, slots)
        self.session = session
        self.names = [f"past_{kv}.{i}" for i in range(int(generation["num_layers"])) for kv in ("key", "value")]
        # Per cache input: how many past tokens it keeps (None: all), the manifest's KV layout (sliding or global).
        self.keep = {f"past_{kv}.{i}": layer["keep"] for i, layer in enumerate(generation["kv_layout"])
                     for kv in ("key", "value")}
        # A slot's cache while it is not in the batch: where its prompt's step left it, or host arrays once cut out.
        self._past: dict[int, dict] = {}
        self._batch: tuple[list[int], dict, np.ndarray] | None = None  # slots (-1: reset since), cache, mask

    def reset(self, slot: int) -> None:
        super().reset(slot)
        self._release(self._past.pop(slot, {}))
        if self._batch is not None and slot in self._batch[0]:  # its rows are stale: never reused, never cut out
            slots, past, mask = self._batch
            self._batch = ([-1 if s == slot else s for s in slots], past, mask)

    def step(self, chunks: list[Chunk], adapter: Path | None = None) -> list[np.ndarray]:
        _no_adapter(adapter, "the explicit-attention decoder")
        decode = [c for c in chunks if len(c.embeds) == 1 and self.lengths[c.slot] and c.images is None
                  and len(c.logits_at) == 1 and c.logits_at[0] == 0]
        out = {id(c): self._alone(c) for c in chunks if not any(c is d for d in decode)}
        if decode:
            for c, logits in zip(decode, self._decode(decode)):
                out[id(c)] = logits[None]
        return [out[id(c)] for c in chunks]

    def cache(self, slot: int) -> dict[str, np.ndarray]:
        """The slot's KV cache on the host, [1, kv heads, kept tokens, head dim] per layer."""
        if slot in self._past:
            return {k: self._host(v) for k, v in self._past[slot].items()}
        slots, past, _ = self._batch
        row = slots.index(slot)
        return {k: self._cut(k, self._host(v), row, slot) for k, v in past.items()}

    # -- steps --
    def _alone(self, c: Chunk) -> np.ndarray:
        """A chunk run by itself, unpadded (a prompt): its slot's cache comes out of the batch if it is in it."""
        held, n = int(self.lengths[c.slot]), len(c.embeds)
        past = self._take(c.slot) if held else self._empty()
        types = np.zeros(n, np.int64) if c.images is None else c.images.astype(np.int64)
        feeds = {"inputs_embeds": c.embeds[None], "attention_mask": np.ones((1, held + n), np.int64),
                 "position_ids": np.arange(held, held + n, dtype=np.int64)[None], "token_type_ids": types[None],
                 "logits_positions": np.asarray(c.logits_at, np.int64)}
        logits, present = self._call(feeds, past)
        self._past[c.slot] = present  # where the backend left it: a batch of this slot alone starts from it
        self.lengths[c.slot] += n
        return logits[0]

    def _decode(self, chunks: list[Chunk]) -> np.ndarray:
        """One token for each chunk's slot, in one call. -> logits [len(chunks), V]."""
        slots = [c.slot for c in chunks]
        if self._batch is None or self._batch[0] != slots:
            self._regroup(slots)
        _, past, mask = self._batch
        mask = np.concatenate([mask, np.ones((len(slots), 1), np.int64)], axis=1)
        feeds = {"inputs_embeds": np.stack([c.embeds for c in chunks]), "attention_mask": mask,
                 "position_ids": self.lengths[slots][:, None].copy(), "token_type_ids": np.zeros((len(slots), 1), np.int64),
                 "logits_positions": np.zeros(1, np.int64)}
        logits, present = self._call(feeds, past)
        self._batch = (slots, present, mask)
        self.lengths[slots] += 1
        return logits[:, -1]

    def _regroup(self, slots: list[int]) -> None:
        """Cut each slot's cache out of the old batch, then build the new batch left-padded to the longest (a slot
        alone needs no padding: its cache is used where it is)."""
        if self._batch is not None:
            self._unbatch()
        if len(slots) == 1:
            self._batch = (list(slots), self._past.pop(slots[0]), np.ones((1, int(self.lengths[slots[0]])), np.int64))
            return
        for slot in slots:
            values = self._past[slot]
            self._past[slot] = {k: self._host(v) for k, v in values.items()}
            self._release(values)
        longest = int(max(self.lengths[s] for s in slots))
        past = {}
        for k in self.names:
            length = self._kept(k, longest)
            first = self._past[slots[0]][k]
            arr = np.zeros((len(slots), first.shape[1], length, first.shape[3]), first.dtype)
            for row, slot in enumerate(slots):
                n = self._past[slot][k].shape[2]
                arr[row, :, length - n:] = self._past[slot][k][0]
            past[k] = arr
        mask = np.zeros((len(slots), longest), np.int64)
        for row, slot in enumerate(slots):
            mask[row, longest - self.lengths[slot]:] = 1
            del self._past[slot]  # the batch holds it now
        self._batch = (list(slots), past, mask)

    def _take(self, slot: int) -> dict:
        """The slot's cache, out of the batch when it is in it (the batch is then regrouped)."""
        if slot not in self._past:
            self._unbatch()
        return self._past.pop(slot)

    def _unbatch(self) -> None:
        """Every slot of the batch (but those reset since) gets its own cache back, on the host."""
        slots, past, _ = self._batch
        arrays = {k: self._host(v) for k, v in past.items()}
        for row, slot in enumerate(slots):
            if slot >= 0:
                self._past[slot] = {k: self._cut(k, a, row, slot) for k, a in arrays.items()}
        self._release(past)
        self._batch = None

    def _cut(self, name: str, batch: np.ndarray, row: int, slot: int) -> np.ndarray:
        return batch[row:row + 1, :, batch.shape[2] - self._kept(name, int(self.lengths[slot])):].copy()

    def _kept(self, name: str, cache_len: int) -> int:
        keep = self.keep[name]
        return cache_len if keep is None else min(cache_len, keep)

    def _empty(self) -> dict[str, np.ndarray]:
        shape = (1, int(self.gen["num_kv_heads"]), 0, int(self.gen["head_dim"]))
        # The graph's KV dtype (float16 on GPU builds: W4A16, fp16); bundles from before the record: float32.
        dtype = np.dtype(self.gen.get("kv_dtype", "float32"))
        return {k: np.zeros(shape, dtype) for k in self.names}

    # -- the backend (TrtDecoder overrides these three) --
    def _call(self, feeds: dict[str, np.ndarray], past: dict) -> tuple[np.ndarray, dict]:
        """One graph call: `past` holds host arrays or the values a previous call returned. -> (logits on the host,
        present cache as this backend's values, named past_*)."""
        import onnxruntime as ort

        binding = self.session.io_binding()
        for name, arr in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(arr))
        for name, value in past.items():
            if isinstance(value, np.ndarray):
                value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value))
            binding.bind_ortvalue_input(name, value)
        names = self.session.output_names
        device = "cuda" if self.session.on_gpu else "cpu"
        for name in names:
            binding.bind_output(name, "cpu" if name == "logits" else device)
        self.session.run_bound(binding)
        values = binding.get_outputs()
        return values[0].numpy(), {n.replace("present_", "past_"): v for n, v in zip(names[1:], values[1:])}

    def _host(self, value) -> np.ndarray:
        return value if isinstance(value, np.ndarray) else value.numpy()

    def _release(self, past: dict) -> None:
        """A batch's cache is no longer needed (ONNX Runtime frees its values itself)."""


# The decoder of each graph form, by the manifest's `generation.attention`.
DECODERS: dict[str, type[Decoder]] = {"gqa": SlotDecoder, "explicit": ExplicitDecoder}
