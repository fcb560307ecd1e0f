"""Run a memory-hungry graph transformation in a child process when the graph is large.

ONNX Runtime's optimiser, quantisers and fp16 converter hold several copies of a model at once (the model, an
augmented copy for calibration, a session, the result). In a child process all of that goes back to the OS when the
step ends, instead of staying fragmented in the builder next to the next step's copies.
"""

from __future__ import annotations

from pathlib import Path

ISOLATE_BYTES = 256 << 20  # graphs (weights included) above this size are transformed in a child process


def graph_bytes(path: Path) -> int:
    data = Path(str(path) + ".data")
    return Path(path).stat().st_size + (data.stat().st_size if data.exists() else 0)


def run(fn, src: Path, *args, isolate: bool | None = None):
    """`fn(src, *args)`, in a spawned child when `isolate` (default: when `src` is larger than ISOLATE_BYTES)."""
    if isolate is None:
        isolate = graph_bytes(src) > ISOLATE_BYTES
    if not isolate:
        return fn(src, *args)
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_quiet) as pool:
        return pool.submit(fn, src, *args).result()


def _quiet() -> None:
    """In the child: onnxruntime.quantization logs advice to the root logger that a medc user cannot act on."""
    import logging

    logging.getLogger().setLevel(logging.ERROR)
