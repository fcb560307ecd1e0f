"""The KV cache of the ORT-flavour Gemma 3 decoder: per-sequence slots that ONNX Runtime updates in place.

The decoder's attention is ONNX Runtime's GroupQueryAttention with past and present bound to the *same* memory: a
step writes its new keys and values into the buffer and nothing is copied, whatever the context length. Each layer
has one numpy buffer `[slots, kv_heads, capacity, head_dim]`; a slot is one sequence, and a step runs over a
contiguous range of slots (a view, so nothing is copied either). Per slot the runtime keeps only the number of
tokens it holds; ONNX Runtime is told, per row, how many tokens the step adds (`query_seqlens`, 0 = idle row, its
cache untouched) and how many the slot will hold after it (`seqlens_k` + 1). So sequences of any lengths decode
together, join and leave between steps, and a long prompt is prefilled in chunks between others' decode steps.

Capacities: global layers hold the whole context; sliding-window layers hold a window-sized buffer that the
operator compacts itself (`sliding_window_cache`): after T tokens, rows [0, L(T)) hold the last L(T) positions, with
W <= L(T) <= capacity (`resident`). The slack above the window (capacity - W) is how many steps pass between two
compactions.
"""

from __future__ import annotations

import numpy as np


def sliding_capacity(window: int) -> int:
    """Rows of a sliding layer's buffer: the window plus 1/8 of it, so the operator compacts every W/8 tokens
    (a memmove of W rows) instead of every token."""
    return window + max(1, window // 8)


def resident(tokens: int, capacity: int, window: int | None) -> int:
    """How many positions a layer's buffer holds after `tokens` tokens (GroupQueryAttention's windowed layout:
    L = T up to the capacity, then it drops G = capacity - window + 1 positions at a time)."""
    if window is None or tokens <= capacity:
        return tokens
    g = capacity - window + 1
    return tokens - g * (-(-(tokens - capacity) // g))


def token_rows(new, columns: int) -> np.ndarray:
    """A step's real tokens in its right-padded [rows, columns] layout: the flat positions row * columns + c of
    each row's first new[row] columns, in order (the decoder's `token_rows` input)."""
    return np.flatnonzero(np.arange(columns) < np.asarray(new)[:, None]).astype(np.int64)


class SlotCache:
    """KV buffers for `slots` sequences, laid out as the manifest's `generation.kv_cache` says."""

    def __init__(self, generation: dict, slots: int, dtype=np.float32):
        kv = generation["kv_cache"]
        self.context = int(kv["context"])
        self.capacities = [int(c) for c in kv["capacity"]]
        self.names = [f"past_{k}.{i}" for i in range(len(self.capacities)) for k in ("key", "value")]
        shape = lambda cap: (slots, int(generation["num_kv_heads"]), cap, int(generation["head_dim"]))  # noqa: E731
        # np.zeros maps fresh pages: a slot's memory becomes resident only as its tokens are written.
        self.buffers = {n: np.zeros(shape(self.capacities[i // 2]), dtype) for i, n in enumerate(self.names)}
        self.lengths = np.zeros(slots, np.int64)  # tokens each slot holds
        self._values: dict[tuple[int, int], dict] = {}
        self.bindings: dict[tuple[int, int], object] = {}  # the decoder's IOBinding per slot range (SlotDecoder)

    @property
    def slots(self) -> int:
        return len(self.lengths)

    def values(self, lo: int, hi: int) -> dict:
        """OrtValues over slots [lo, hi) of every buffer (views: ONNX Runtime writes into this memory)."""
        if (lo, hi) not in self._values:
            import onnxruntime as ort

            self._values[(lo, hi)] = {n: ort.OrtValue.ortvalue_from_numpy(b[lo:hi]) for n, b in self.buffers.items()}
        return self._values[(lo, hi)]
