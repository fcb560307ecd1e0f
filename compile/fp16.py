"""fp16 with fp32 islands, for decoders whose activations do not fit fp16 (Gemma 3): ONNX Runtime's converter, with
the overflow-prone parts kept fp32, found by structure and by measurement (`convert_fp16`); and `cpu_emulation`,
which makes a CPU show what fp16 storage does on a GPU."""

from __future__ import annotations

import copy
import heapq
import logging
import os
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
from onnx.external_data_helper import uses_external_data

from medc.compile.export import save_onnx
from medc.manifest import feeds_digest

# fp16's largest value is 65504. Gemma 3's residual stream and some MLP activations grow past it, and RMSNorm squares
# them (transformers issues 36822 and 39972), so a whole-graph fp16 conversion gives inf/NaN. Here the graph is
# converted with ONNX Runtime's own converter, but with parts kept fp32:
#
# 1. By structure, whatever the data (another prompt can be larger than the calibration ones):
#    - normalisation: the fused ops, or unfused, the chain from Pow(x) to the node that reads x again
#      (x * rsqrt(mean(x^2) + eps)): x^2 overflows fp16 from |x| = 256;
#    - the residual stream: the Adds that carry it from layer to layer and every node that reads it;
#    - Softmax;
#    - rotary angles (positions cast to float, times inverse frequencies, Cos/Sin): fp16 has no integers above 2048
#      and an angle of 1000 rad only to 0.5 rad, so long prompts would be rotated wrongly.
# 2. Measured: the fp32 graph runs in ONNX Runtime on the calibration feeds, each float tensor reduced to max |x| in
#    the graph itself, and every node that writes or reads a tensor above `threshold` (default 65504 / 16, headroom
#    for larger inputs) is kept fp32.
# 3. `convert_float_to_float16` (keep_io_types) inserts the Casts. Weights read only by fp32 nodes stay fp32.
#
# The converter casts every tensor between two fp32 nodes to fp16 and back, which overflows exactly where an island
# should protect, so those Cast pairs are removed afterwards (`_drop_round_trips`).
#
# On x86, ONNX Runtime's CPU provider cannot show fp16 overflow: it has no fp16 kernel for MatMul, Add, Mul, Gelu,
# Softmax, ... (onnxruntime 1.32), runs them in fp32 and drops the rounding between consecutive ones. `cpu_emulation`
# rewrites an fp16 graph so that the CPU rounds every fp16 tensor, as GPU storage does.

log = logging.getLogger(__name__)

FP16_MAX = 65504.0
HEADROOM = 16.0
FLOAT, FLOAT16 = 1, 10  # onnx.TensorProto element types

FUSED_NORMS = ("LayerNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization",
               "SkipSimplifiedLayerNormalization", "RMSNormalization")
ALWAYS_FP32_OPS = ("Softmax", *FUSED_NORMS)
STREAM_OUTPUT = {"Add": 0, "SkipLayerNormalization": 3, "SkipSimplifiedLayerNormalization": 3}  # output carrying it


class _Index:
    """Producer, consumers and element type of each tensor of a graph."""

    def __init__(self, graph):
        self.nodes = list(graph.node)
        self.producer = {o: n for n in graph.node for o in n.output if o}
        self.consumers = defaultdict(list)
        for node in graph.node:
            for name in dict.fromkeys(i for i in node.input if i):
                self.consumers[name].append(node)
        self.types = {v.name: v.type.tensor_type.elem_type for v in (*graph.value_info, *graph.input, *graph.output)}
        self.types.update({t.name: t.data_type for t in graph.initializer})
        self.initializers = {t.name for t in graph.initializer}

    def is_float(self, name: str) -> bool:
        return self.types.get(name) == FLOAT


def convert_fp16(src: Path, dst: Path, calibration_feeds: list[dict[str, np.ndarray]] | None,
                 threshold: float = FP16_MAX / HEADROOM, half_io: tuple[str, ...] = ()) -> dict:
    """Write `dst`: `src` (fp32) in fp16 with fp32 islands. Returns the manifest record.

    threshold: max |x| above which a tensor's writer and readers stay fp32.
    half_io: name prefixes of graph inputs and outputs that become fp16 (a decoder's KV cache, "past_"/"present_",
    which then costs half the memory); every other input and output stays fp32, so callers never see the change."""
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    # Quantised weights (a streamed 4B decoder's 2.7 GB) stay in their data file until the save: the float ones are
    # what the conversion reads (scales, norms), and ONNX Runtime measures the islands from `src`'s own data file.
    model = onnx.load(str(src), load_external_data=False)
    for t in model.graph.initializer:
        if t.data_type == FLOAT and uses_external_data(t):
            _load_tensor(t, src.parent)
    _name_nodes(model.graph)
    # The exporter lists some initializers in value_info too; the converter would then turn that entry to fp16 and
    # put a Cast in front of every fp32 node reading the weight (a copy of it per call). Initializers carry their type.
    weights = {t.name for t in model.graph.initializer}
    values = [v for v in model.graph.value_info if v.name not in weights]
    del model.graph.value_info[:]
    model.graph.value_info.extend(values)
    ix = _Index(model.graph)
    by_type = [n.name for n in ix.nodes if n.op_type in ALWAYS_FP32_OPS]
    rules = {"normalisation": _normalisation(ix), "residual stream": _residual_stream(ix, model.graph),
             "rotary angles": _rotary_angles(ix)}
    measured = {"threshold": threshold, "feeds": 0}
    above: dict[str, float] = {}
    if calibration_feeds:
        maxima = activation_maxima(model, calibration_feeds, src.parent)
        above = {t: m for t, m in maxima.items() if m > threshold}
        top = max(maxima, key=maxima.get)
        measured.update(feeds=len(calibration_feeds), digest=feeds_digest(calibration_feeds),
                        max_abs=maxima[top], max_tensor=top,
                        above_threshold=dict(sorted(above.items(), key=lambda kv: -kv[1])))
    else:
        log.warning("fp16 of %s without calibration feeds: only the structural fp32 islands are kept", src.name)
    # A tensor above the threshold must not pass through fp16 at all: keep its writer and all its readers fp32.
    rules["measured above threshold"] = {n.name for t in above
                                        for n in (*ix.consumers[t], *([ix.producer[t]] if t in ix.producer else []))}
    kept, why = set(by_type), {}
    for reason, names in rules.items():  # each node under the first reason that keeps it
        why[reason] = sorted(names - kept)
        kept |= names
    kept -= set(by_type)

    io = [v.name for v in (*model.graph.input, *model.graph.output)]
    keep_io = [n for n in io if not n.startswith(half_io)] if half_io else True
    fp16 = convert_float_to_float16(model, keep_io_types=keep_io, disable_shape_infer=True,
                                    op_block_list=[*DEFAULT_OP_BLOCK_LIST, *ALWAYS_FP32_OPS],
                                    node_block_list=sorted(kept))
    _drop_repeated_casts(fp16.graph)
    dropped = _drop_round_trips(fp16.graph)
    _toposort(fp16.graph)  # the converter appends its Casts at the end; ONNX wants producers first
    for t in fp16.graph.initializer:
        if uses_external_data(t):
            _load_tensor(t, src.parent)
    save_onnx(fp16, dst)
    fp32_weights = [t for t in fp16.graph.initializer if t.data_type == FLOAT]
    return {
        "method": "fp16", "io_types": "float32" if keep_io is True else "float32; fp16: " + ", ".join(
            f"{p}*" for p in half_io),
        "fp32_islands": {
            "op_types": sorted({n.op_type for n in ix.nodes if n.op_type in ALWAYS_FP32_OPS}),
            "why": {reason: {"count": len(names), "nodes": names} for reason, names in why.items()},
            "measured": measured,
            "nodes_fp32": len(kept) + len(by_type), "nodes_total": len(ix.nodes),
            "fp32_weights": {"count": len(fp32_weights), "elements": int(sum(np.prod(t.dims) for t in fp32_weights))},
            "round_trips_removed": dropped,
        },
    }


# -- which nodes stay fp32 ---------------------------------------------------------------------------------------------
def _normalisation(ix: _Index) -> set[str]:
    """Unfused norms: from each Pow(x, .) forward to the node that reads x again (RMSNorm: Pow, ReduceMean, Add eps,
    Sqrt, Reciprocal, Mul; LayerNorm: the same on x - mean), then the scale by a constant weight, as a fused norm
    includes it (Gemma 3 270M's post-norm weights take |x| to 2e4). Fused norms are kept by op type. A walk that
    does not come back to x within a few steps is not a norm: then only the Pow is kept (x^n overflows first)."""
    kept = set()
    for pow_node in (n for n in ix.nodes if n.op_type == "Pow"):
        x, seen, frontier, closing = pow_node.input[0], {pow_node.name}, list(pow_node.output), None
        for _ in range(6):
            nxt = []
            for t in frontier:
                for c in ix.consumers[t]:
                    if c.name not in seen:
                        seen.add(c.name)
                        if x in c.input:
                            closing = c
                        else:
                            nxt += c.output
            frontier = nxt
        if closing is None:
            kept.add(pow_node.name)
            continue
        kept |= seen
        readers = ix.consumers[closing.output[0]]
        if len(readers) == 1 and readers[0].op_type == "Mul" and any(i in ix.initializers for i in readers[0].input):
            kept.add(readers[0].name)
    return kept


def _residual_stream(ix: _Index, graph) -> set[str]:
    """Every node that reads the residual stream: it starts at the float graph input a norm reads first
    (inputs_embeds) and is carried by Add (fused: SkipSimplifiedLayerNormalization's 4th output)."""
    norms = {"Pow", *FUSED_NORMS}
    stream = [i.name for i in graph.input
              if ix.is_float(i.name) and any(c.op_type in norms for c in ix.consumers[i.name])]
    seen, kept = set(stream), set()
    while stream:
        for node in ix.consumers[stream.pop()]:
            kept.add(node.name)
            k = STREAM_OUTPUT.get(node.op_type)
            if k is not None and k < len(node.output) and node.output[k] and node.output[k] not in seen:
                seen.add(node.output[k])
                stream.append(node.output[k])
    return kept


def _rotary_angles(ix: _Index) -> set[str]:
    """Cos/Sin and the float nodes upstream of them: the position ids cast to float times the inverse frequencies."""
    kept, todo = set(), [n for n in ix.nodes if n.op_type in ("Cos", "Sin")]
    while todo:
        node = todo.pop()
        if node.name not in kept:
            kept.add(node.name)
            todo += [ix.producer[i] for i in node.input if i in ix.producer and ix.is_float(i)]
    return kept


def _load_tensor(t, base_dir: Path) -> None:
    """An initializer's external data read into it (it is then inline, as onnx.load would leave it)."""
    from onnx.external_data_helper import load_external_data_for_tensor

    load_external_data_for_tensor(t, str(base_dir))
    t.data_location = onnx.TensorProto.DEFAULT
    del t.external_data[:]


def activation_maxima(model, feeds: list[dict[str, np.ndarray]], base_dir: Path | None = None) -> dict[str, float]:
    """max |x| of every float tensor of the fp32 `model` (graph inputs and node outputs) over `feeds`. `base_dir`:
    where the data file of initializers still stored externally lies (the run reads them from there).

    ONNX Runtime computes them: a ReduceMax(Abs(x)) per tensor is added to the graph and only those scalars are
    outputs, so memory stays that of a normal run (exposing every intermediate as an output would hold them all).
    The model is restored before returning."""
    import onnxruntime as ort
    from onnx import helper

    graph = model.graph
    ix = _Index(graph)
    # Not the weights a quantised graph dequantises (DequantizeLinear of an initializer): they are not activations,
    # and a late reader of each would keep every dequantised weight of a 4B decoder alive at once (13 GB in fp32).
    weights = {o for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in ix.initializers
               for o in n.output}
    tensors = list(dict.fromkeys(o for n in graph.node for o in n.output
                                 if o and ix.is_float(o) and o not in weights))
    readers, outputs = {}, []
    for k, t in enumerate(tensors):
        readers[t] = [helper.make_node("Abs", [t], [f"fp16_calib_abs_{k}"]),
                      helper.make_node("ReduceMax", [f"fp16_calib_abs_{k}"], [f"fp16_calib_max_{k}"], keepdims=0)]
        outputs.append(helper.make_tensor_value_info(f"fp16_calib_max_{k}", FLOAT, []))
    maxima = dict.fromkeys(tensors, 0.0)
    original = list(graph.node)
    # Each reader right after its tensor's producer: ONNX Runtime runs nodes in this order where it may, so a tensor
    # is freed after its own readers rather than held to the end of the graph (a 4B prefill's activations: ~13 GB).
    del graph.node[:]
    graph.node.extend(x for n in original for x in (n, *(r for o in n.output for r in readers.get(o, ()))))
    graph.output.extend(outputs)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            if any(uses_external_data(t) for t in graph.initializer):  # beside their data file, which it reads
                handle, name = tempfile.mkstemp(suffix=".maxima.onnx", dir=base_dir)
                os.close(handle)
                path = Path(name)
                onnx.save(model, str(path))
            else:
                path = Path(tmp) / "maxima.onnx"
                save_onnx(model, path)
            try:
                session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            finally:
                path.unlink(missing_ok=True)
            names = [o.name for o in outputs]
            wanted = {i.name for i in session.get_inputs()}
            for feed in feeds:
                for t, value in zip(tensors, session.run(names, {k: v for k, v in feed.items() if k in wanted})):
                    maxima[t] = max(maxima[t], float(value))  # an empty tensor gives -inf, NaN is ignored
            del session
    finally:
        del graph.node[:]
        graph.node.extend(original)
        del graph.output[-len(outputs):]
    for feed in feeds:  # float graph inputs (the converter casts them to fp16 for fp16 readers)
        for name, arr in feed.items():
            if ix.is_float(name) and arr.size:
                maxima[name] = max(maxima.get(name, 0.0), float(np.abs(arr).max()))
    return maxima


# -- graph surgery -----------------------------------------------------------------------------------------------------
def _name_nodes(graph) -> None:
    """node_block_list works on names, and ONNX Runtime refuses a graph with two alike: give every node a unique one."""
    seen = set()
    for k, node in enumerate(graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_fp16_{k}"
        seen.add(node.name)


def _drop_repeated_casts(graph) -> None:
    """onnxruntime < 1.32's converter puts one Cast per fp32 reader of an fp16 tensor, all alike (same name, same
    output): two writers of one tensor, a graph ONNX Runtime refuses. Seen on an H200 host, whose onnxruntime-gpu
    is 1.31.1 (benchmarks/cuda_check.py). Keep the first of identical nodes and of identical value_info entries."""
    for field in (graph.node, graph.value_info):
        seen, kept = set(), []
        for item in field:
            key = item.SerializeToString()
            if key not in seen:
                seen.add(key)
                kept.append(item)
        if len(kept) < len(field):
            del field[:]
            field.extend(kept)


def _cast_to(node) -> int | None:
    return next((a.i for a in node.attribute if a.name == "to"), None) if node.op_type == "Cast" else None


def _drop_round_trips(graph) -> int:
    """Remove Cast(fp32 -> fp16) -> Cast(fp16 -> fp32): readers of the second Cast read the fp32 tensor itself.
    A Cast to fp16 left without readers goes too. Returns how many pairs were removed."""
    ix = _Index(graph)
    outputs = {o.name for o in graph.output}
    rename, removed = {}, 0
    for node in ix.nodes:
        first = ix.producer.get(node.input[0]) if _cast_to(node) == FLOAT else None
        if first is None or _cast_to(first) != FLOAT16 or not ix.is_float(first.input[0]):
            continue
        removed += 1
        if node.output[0] in outputs:  # the graph output keeps its name
            node.op_type, node.input[0] = "Identity", first.input[0]
            del node.attribute[:]
        else:
            rename[node.output[0]] = first.input[0]
    for node in graph.node:
        for k, name in enumerate(node.input):
            while name in rename:
                name = rename[name]
            node.input[k] = name
    read = {i for n in graph.node if n.output[0] not in rename for i in n.input} | outputs
    keep = [n for n in graph.node if n.output[0] not in rename
            and not (_cast_to(n) == FLOAT16 and n.output[0] not in read)]
    names = {o for n in keep for o in n.output}
    values = [v for v in graph.value_info if v.name in names]
    del graph.node[:]
    graph.node.extend(keep)
    del graph.value_info[:]
    graph.value_info.extend(values)
    return removed


def _toposort(graph) -> None:
    """Order nodes so that each comes after the producers of its inputs, otherwise keeping their order."""
    nodes = list(graph.node)
    producer = {o: k for k, n in enumerate(nodes) for o in n.output if o}
    waits = [len({producer[i] for i in n.input if i in producer}) for n in nodes]
    readers = defaultdict(set)
    for k, n in enumerate(nodes):
        for i in n.input:
            if i in producer:
                readers[producer[i]].add(k)
    ready = [k for k, w in enumerate(waits) if w == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        k = heapq.heappop(ready)
        order.append(k)
        for r in readers[k]:
            waits[r] -= 1
            if waits[r] == 0:
                heapq.heappush(ready, r)
    if len(order) != len(nodes):
        raise ValueError("fp16 conversion left a cycle in the graph")
    del graph.node[:]
    graph.node.extend(nodes[k] for k in order)


def cpu_emulation(model):
    """The fp16 `model` as an fp32 graph in which every fp16 tensor is rounded through fp16 by an explicit Cast pair
    (fp16 weights become fp32 with the same values). ONNX Runtime keeps lossy Casts, so on the CPU this shows what
    fp16 storage does on a GPU: each op computes from fp16 values and its result is rounded to fp16 (inf above
    65504), as CUDA's fp16 kernels do with fp32 arithmetic inside. For checks only; the bundle ships `model`.

    Tensors computed from weights alone (a W4A16 decoder's dequantised weights, the transposed lm_head rows) are not
    rounded: they are weights, not activations (rounding them changes each by at most fp16's 2^-11 relative step),
    and a Cast pair on each would hold two more copies of every dequantised weight (the 4B lm_head's: 4 GB)."""
    from onnx import helper, numpy_helper

    model = copy.deepcopy(model)
    graph = model.graph
    ix = _Index(graph)
    halves = {name for name, t in ix.types.items() if t == FLOAT16}
    constant = set(ix.initializers)
    for node in graph.node:
        if node.op_type != "Constant" and node.input and all(not i or i in constant for i in node.input):
            constant.update(node.output)
    halves -= constant
    for t in graph.initializer:
        if t.data_type == FLOAT16:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name))
    for v in (*graph.value_info, *graph.input, *graph.output):
        if v.type.tensor_type.elem_type == FLOAT16:
            v.type.tensor_type.elem_type = FLOAT
    nodes = []
    for node in graph.node:
        for a in node.attribute:
            if a.name == "to" and node.op_type == "Cast" and a.i == FLOAT16:
                a.i = FLOAT
                if node.output[0] not in constant:
                    halves.add(node.output[0])
            elif a.type == a.TENSOR and a.t.data_type == FLOAT16:  # Constant, ConstantOfShape
                a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float32), a.t.name))
                halves.update(node.output)
        nodes.append(node)
        for k, name in enumerate(node.output):
            if name in halves:
                node.output[k] = f"{name}_exact"
                nodes += [helper.make_node("Cast", [f"{name}_exact"], [f"{name}_half"], to=FLOAT16),
                          helper.make_node("Cast", [f"{name}_half"], [name], to=FLOAT)]
    del graph.node[:]
    graph.node.extend(nodes)
    return model
