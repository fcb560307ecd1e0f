"""Graph optimisation before precision conversion: transformer fusions, with a count of what was fused.

Well-kept optimisers, each a registry entry `(src, dst) -> fused counts`:
- `xformers`: onnxscript's `fuse_xformers` (the rewriter behind ORT's dynamo helper): SkipLayerNormalization, fused
  Attention (SDPA -> MultiHeadAttention -> Attention with packed QKV), Gelu; then constant folding with no size limit
  so the packed QKV weight is one initializer instead of a Concat evaluated on every call. Parity ~1e-7.
- `ort-transformers`: ONNX Runtime's transformer optimizer (model type "vit"): LayerNorm and BiasGelu fusions but
  attention left as plain MatMuls. Used for dynamic int8, where those MatMuls are quantised; inside a fused Attention
  op they would stay fp32 (measured: 1.5x slower than quantising them, benchmarks/).
- `none`: the exported graph (ONNX Runtime still applies its own level-3 optimisations at load time).
We do not run onnxscript's `optimize_for_ort`: its extra MatMul fusions break the SigLIP graph. Whatever is chosen,
the fidelity gate re-checks the result.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

log = logging.getLogger(__name__)


def _fuse_xformers(src: Path, dst: Path) -> tuple[dict[str, int], Counter, Counter]:
    import onnx_ir as ir
    import onnxscript.optimizer
    from onnxscript.rewriter.ort_fusions._core import fuse_xformers  # public API exports only optimize_for_ort

    model = ir.load(str(src))
    before = Counter(n.op_type for n in model.graph)
    model, counts = fuse_xformers(model)
    onnxscript.optimizer.optimize(model, input_size_limit=1 << 40, output_size_limit=1 << 40)
    after = Counter(n.op_type for n in model.graph)
    _save(ir.serde.serialize_model(model), dst)
    return {k: int(v) for k, v in counts.items() if v}, before, after


def _ort_transformers(src: Path, dst: Path) -> tuple[dict[str, int], Counter, Counter]:
    import onnx
    from onnxruntime.transformers.optimizer import optimize_model

    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
    before = _op_counts(src)  # optimize_model loads the file itself and rewrites that copy
    opt = optimize_model(str(src), model_type="vit", num_heads=0, hidden_size=0, opt_level=0)
    if not any(o.domain == "com.microsoft" for o in opt.model.opset_import):  # it adds contrib ops but not always
        opt.model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))  # their opset
    after = Counter(n.op_type for n in opt.model.graph.node)
    _save(opt.model, dst)
    return {k: int(v) for k, v in opt.get_fused_operator_statistics().items() if v}, before, after


def _none(src: Path, dst: Path) -> tuple[dict[str, int], Counter, Counter]:
    import onnx

    model = onnx.load(str(src))
    counts = Counter(n.op_type for n in model.graph.node)
    _save(model, dst)
    return {}, counts, counts


def _save(model, dst: Path) -> None:
    from medc.compile.export import save_onnx

    save_onnx(model, dst)


OPTIMIZERS = {"xformers": _fuse_xformers, "ort-transformers": _ort_transformers, "none": _none}


def optimize(src: Path, dst: Path, optimizer: str = "xformers", isolate: bool | None = None) -> dict:
    """Optimise `src` into `dst`; returns the manifest record (optimiser, fused counts, node counts before/after)."""
    from medc.compile import isolate as iso

    # Each optimiser counts nodes on the graph it already holds: parsing a 1 GB graph again for the count, before
    # and after, cost 8 s of a Gemma 3 270M build.
    fused, before, after = iso.run(OPTIMIZERS[optimizer], Path(src), Path(dst), isolate=isolate)
    log.info("optimised %s with %s: %s", src.name, optimizer, fused or "nothing fused")
    return {"optimizer": optimizer, "fused": fused, "nodes_before": sum(before.values()),
            "nodes_after": sum(after.values()), "ops_after": dict(sorted(after.items()))}


def optimize_cached(src: Path, dst: Path, optimizer: str, export_key: str | None) -> dict:
    """`optimize`, reused from ~/.cache/medc/exports when the same export was optimised the same way before (the
    270M decoder's xformers pass takes ~30 s, and every build of another precision repeats it). The key adds the
    optimiser, this file and the rewriters' versions to the export's key; no export key, no caching."""
    import hashlib
    from importlib import metadata

    import onnxruntime  # onnxruntime or onnxruntime-gpu, one module name: its own version, not a package's

    from medc.compile.export import cached

    key = None
    if export_key is not None:
        h = hashlib.sha256(f"{export_key}/{optimizer}/{dst.name}".encode())
        h.update(Path(__file__).read_bytes())
        versions = [metadata.version(p) for p in ("onnxscript", "onnx_ir", "onnx")] + [onnxruntime.__version__]
        h.update(str(versions).encode())
        key = f"{export_key}-opt-{h.hexdigest()[:16]}"
    hit, record = cached(key, dst, lambda: optimize(src, dst, optimizer))
    if hit:
        log.info("optimised %s with %s: reused from ~/.cache/medc/exports", src.name, optimizer)
    return record


def _op_counts(path: Path) -> Counter:
    import onnx

    return Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)
