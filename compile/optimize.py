"""Graph optimisation before quantisation: transformer fusions, with a count of what was fused.

Two well-kept optimisers exist and each is a registry entry:
- `xformers`: onnxscript's `fuse_xformers` (the rewriter ORT's own dynamo helper uses): SkipLayerNormalization,
  fused Attention (SDPA -> MHA -> Attention with packed QKV), Gelu. Parity ~1e-7.
- `none`: the exported graph as is (ONNX Runtime still applies its own level-3 optimisations at load time).
We deliberately do not run onnxscript's `optimize_for_ort` (its extra MatMul fusions break the SigLIP graph) and the
result is always re-checked by the fidelity gate.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

log = logging.getLogger(__name__)


def _fuse_xformers(src: Path, dst: Path) -> dict[str, int]:
    import onnx_ir as ir
    from onnxscript.rewriter.ort_fusions._core import fuse_xformers  # public API exports only optimize_for_ort

    model = ir.load(str(src))
    model, counts = fuse_xformers(model)
    _save_ir(model, dst)
    return {k: int(v) for k, v in counts.items() if v}


def _none(src: Path, dst: Path) -> dict[str, int]:
    import onnx

    from medc.compile.export import save_onnx

    save_onnx(onnx.load(str(src)), dst)
    return {}


def _save_ir(model, dst: Path) -> None:
    import onnx_ir as ir

    from medc.compile.export import save_onnx

    save_onnx(ir.serde.serialize_model(model), dst)


OPTIMIZERS = {"xformers": _fuse_xformers, "none": _none}


def optimize(src: Path, dst: Path, optimizer: str = "xformers") -> dict:
    """Optimise `src` into `dst`; returns the manifest record (optimiser, fused counts, node counts before/after)."""
    import onnx

    before = _op_counts(src)
    fused = OPTIMIZERS[optimizer](src, dst)
    after = _op_counts(dst)
    log.info("optimised %s with %s: %s", src.name, optimizer, fused or "nothing fused")
    return {"optimizer": optimizer, "fused": fused, "nodes_before": sum(before.values()),
            "nodes_after": sum(after.values()), "ops_after": dict(sorted(after.items()))}


def _op_counts(path: Path) -> Counter:
    import onnx

    return Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)
