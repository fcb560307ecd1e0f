"""Graph optimisation before precision conversion: transformer fusions, with a count of what was fused.

Well-kept optimisers, each a registry entry `(src, dst, split) -> fused counts`:
- `xformers`: onnxscript's `fuse_xformers` (the rewriter behind ORT's dynamo helper): SkipLayerNormalization, fused
  Attention (SDPA -> MultiHeadAttention -> Attention with packed QKV), Gelu; then constant folding with no size limit
  so the packed QKV weight is one initializer instead of a Concat evaluated on every call. Parity ~1e-7.
- `ort-transformers`: ONNX Runtime's transformer optimizer (model type "vit"): LayerNorm and BiasGelu fusions but
  attention left as plain MatMuls. Used for dynamic int8, where those MatMuls are quantised; inside a fused Attention
  op they would stay fp32, which is slower than quantising them (benchmarks/results/design-measurements.md).
- `none`: the exported graph (ONNX Runtime still applies its own level-3 optimisations at load time).
We do not run onnxscript's `optimize_for_ort`: its extra MatMul fusions break the SigLIP graph. Whatever is chosen,
the fidelity gate re-checks the result.

For CPU targets the residual-add norms are left unfused (`split_skip_norms`): ONNX Runtime's CPU kernels for
SkipLayerNormalization and SkipSimplifiedLayerNormalization are slower than the Add and the norm they replace, even
at one token, and so are whole graphs that use them (benchmarks/results/skip-norms-cpu.md). GPU execution providers
keep the fused kernels.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from importlib import metadata
from pathlib import Path

from medc.compile.export import cached, save_onnx
from medc.compile.isolate import run as run_isolated

log = logging.getLogger(__name__)


def split_for(target) -> bool:
    """Whether builds for `target` leave the residual-add norms unfused (see the module docstring)."""
    return getattr(target, "kind", None) == "cpu"


_SKIP_NORMS = {"SkipLayerNormalization": ("LayerNormalization", ""),  # -> (plain norm, its domain)
               "SkipSimplifiedLayerNormalization": ("SimplifiedLayerNormalization", "")}  # ORT's, default domain


def split_skip_norms(model) -> int:
    """In place on an onnx_ir model: each com.microsoft Skip(Simplified)LayerNormalization becomes Add(input, skip)
    [+ Add(bias)] and the plain norm, its sum output (the residual stream) kept. Returns how many were split.
    Nodes whose mean / inverse-std outputs are used (no exporter here makes them) are left alone."""
    import onnx_ir as ir

    count = 0
    for node in list(model.graph):
        if node.domain != "com.microsoft" or node.op_type not in _SKIP_NORMS:
            continue
        out = list(node.outputs) + [None] * (4 - len(node.outputs))
        if any(v is not None and (v.uses() or v.is_graph_output()) for v in out[1:3]):
            continue
        simplified = node.op_type == "SkipSimplifiedLayerNormalization"
        x, skip, gamma = node.inputs[:3]
        rest = list(node.inputs[3:]) + [None, None]
        beta, bias = (None, rest[0]) if simplified else (rest[0], rest[1])
        eps = node.attributes.get("epsilon")
        eps = eps.as_float() if eps is not None else 1e-12  # the contrib ops' default
        added = [ir.node("Add", [x, skip])]
        if bias is not None:
            added.append(ir.node("Add", [added[-1].outputs[0], bias]))
        norm_op, domain = _SKIP_NORMS[node.op_type]
        norm = ir.node(norm_op, [added[-1].outputs[0], gamma] + ([beta] if beta is not None else []),
                       {"axis": -1, "epsilon": eps}, domain=domain)
        model.graph.insert_before(node, [*added, norm])
        for old, new in ((out[0], norm.outputs[0]), (out[3], added[-1].outputs[0])):
            if old is not None:
                name, old.name = old.name, None  # names are unique in a graph: the new value takes this one over
                new.name, new.shape, new.type = name, old.shape, old.type
                old.replace_all_uses_with(new, replace_graph_outputs=True)
        model.graph.remove(node, safe=True)
        count += 1
    return count


def _fuse_xformers(src: Path, dst: Path, split: bool = False) -> tuple[dict[str, int], Counter, Counter]:
    import onnx_ir as ir
    import onnxscript.optimizer
    from onnxscript.rewriter.ort_fusions._core import fuse_xformers  # public API exports only optimize_for_ort

    model = ir.load(str(src))
    before = Counter(n.op_type for n in model.graph)
    model, counts = fuse_xformers(model)
    if split:
        counts["skip_norms_split"] = split_skip_norms(model)
    onnxscript.optimizer.optimize(model, input_size_limit=1 << 40, output_size_limit=1 << 40)
    after = Counter(n.op_type for n in model.graph)
    save_onnx(ir.serde.serialize_model(model), dst)
    return {k: int(v) for k, v in counts.items() if v}, before, after


def _ort_transformers(src: Path, dst: Path, split: bool = False) -> tuple[dict[str, int], Counter, Counter]:
    import onnx
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
    before = _op_counts(src)  # optimize_model loads the file itself and rewrites that copy
    options = FusionOptions("vit")
    options.enable_skip_layer_norm = options.enable_bias_skip_layer_norm = not split
    opt = optimize_model(str(src), model_type="vit", num_heads=0, hidden_size=0, opt_level=0, optimization_options=options)
    if not any(o.domain == "com.microsoft" for o in opt.model.opset_import):  # it adds contrib ops but not always
        opt.model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))  # their opset
    after = Counter(n.op_type for n in opt.model.graph.node)
    save_onnx(opt.model, dst)
    return {k: int(v) for k, v in opt.get_fused_operator_statistics().items() if v}, before, after


def _none(src: Path, dst: Path, split: bool = False) -> tuple[dict[str, int], Counter, Counter]:
    # nothing fused, so nothing to split
    import onnx

    model = onnx.load(str(src))
    counts = Counter(n.op_type for n in model.graph.node)
    save_onnx(model, dst)
    return {}, counts, counts


OPTIMIZERS = {"xformers": _fuse_xformers, "ort-transformers": _ort_transformers, "none": _none}


def optimize(src: Path, dst: Path, optimizer: str = "xformers", isolate: bool | None = None, split: bool = False) -> dict:
    """Optimise `src` into `dst`; returns the manifest record (optimiser, fused counts, node counts before/after).
    split: leave the residual-add norms unfused (CPU targets, `split_for`)."""
    # Each optimiser counts nodes on the graph it already holds: a second parse of a 1 GB graph costs seconds.
    fused, before, after = run_isolated(OPTIMIZERS[optimizer], Path(src), Path(dst), split, isolate=isolate)
    log.info("optimised %s with %s: %s", src.name, optimizer, fused or "nothing fused")
    return {"optimizer": optimizer, "fused": fused, "nodes_before": sum(before.values()),
            "nodes_after": sum(after.values()), "ops_after": dict(sorted(after.items()))}


def optimize_cached(src: Path, dst: Path, optimizer: str, export_key: str | None, split: bool = False) -> dict:
    """`optimize`, reused from ~/.cache/medc/exports when the same export was optimised the same way before (a
    decoder's xformers pass is long, and every build of another precision would repeat it). The key adds the
    optimiser, this file and the rewriters' versions to the export's key; no export key, no caching."""
    import onnxruntime  # onnxruntime or onnxruntime-gpu, one module name: its own version, not a package's

    key = None
    if export_key is not None:
        h = hashlib.sha256((f"{export_key}/{optimizer}/{dst.name}" + ("/split" if split else "")).encode())
        h.update(Path(__file__).read_bytes())
        versions = [metadata.version(p) for p in ("onnxscript", "onnx_ir", "onnx")] + [onnxruntime.__version__]
        h.update(str(versions).encode())
        key = f"{export_key}-opt-{h.hexdigest()[:16]}"
    hit, record = cached(key, dst, lambda: optimize(src, dst, optimizer, split=split))
    if hit:
        log.info("optimised %s with %s: reused from ~/.cache/medc/exports", src.name, optimizer)
    return record


def _op_counts(path: Path) -> Counter:
    import onnx

    return Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)
