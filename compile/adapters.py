"""PEFT LoRA adapters (DoRA too) merged into a model before export: `medc build MODEL --adapter DIR [--adapter DIR2]
[--adapter-scale S]`.

A hospital that fine-tunes MedGemma or MedSigLIP with PEFT ends up with an adapter folder (adapter_config.json +
adapter_model.safetensors), not a checkpoint. The build:
1. reads each adapter (safetensors only: adapter_model.bin is a pickle, refused with the command that converts it)
   and checks it fits the base: every module it targets exists and is a layer peft adapts, with the shapes of its
   low-rank matrices matching the layer's (not `base_model_name_or_path`, which names wherever it was trained);
2. applies them with peft, unmerged, and computes the fidelity references (each component's golden outputs and
   the whole-model greedy tokens and perplexity) from that model: HF + peft, as the site trained and evaluated it;
3. merges them with peft's own `merge_and_unload` and exports the merged weights.
So a bad merge cannot pass the gate. The manifest records each adapter (sha256, rank, alpha, target modules, the
scale applied) in `model.adapters`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medc.errors import MedcError

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PICKLED = "adapter_model.bin"
_CONVERT = ("python -c \"import torch, safetensors.torch as st; st.save_file(torch.load('DIR/adapter_model.bin', "
            "weights_only=True), 'DIR/adapter_model.safetensors')\" (on a machine you trust, in the adapter's folder)")


@dataclass(frozen=True)
class Adapter:
    path: Path
    sha256: str  # of adapter_model.safetensors
    peft_type: str  # "LORA"
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    use_dora: bool
    shapes: dict  # tensor name in the file -> shape

    def record(self, scale: float) -> dict:
        return {"name": self.path.name, "sha256": self.sha256, "peft_type": self.peft_type, "rank": self.rank,
                "alpha": self.alpha, "use_dora": self.use_dora, "target_modules": list(self.target_modules),
                "scale": scale}


def read(path: str | Path) -> Adapter:
    """An adapter folder, checked: PEFT LoRA, safetensors weights."""
    path = Path(path)
    if not path.is_dir():
        raise MedcError(f"--adapter {path} is not a folder; give the folder peft's save_pretrained wrote "
                        f"({CONFIG} + {WEIGHTS}).")
    if not (path / CONFIG).is_file():
        raise MedcError(f"{path} has no {CONFIG}: not a PEFT adapter folder.")
    if not (path / WEIGHTS).is_file():
        if (path / PICKLED).is_file():
            raise MedcError(f"{path} holds {PICKLED}, a pickle, which medc never loads (it can run code). Convert it "
                            f"to safetensors with: {_CONVERT.replace('DIR', str(path))}")
        raise MedcError(f"{path} has no {WEIGHTS}.")
    try:
        config = json.loads((path / CONFIG).read_text())
    except (OSError, ValueError) as e:
        raise MedcError(f"{path / CONFIG} is unreadable or not JSON ({type(e).__name__}).") from None
    if config.get("peft_type") != "LORA":
        raise MedcError(f"{path} is a {config.get('peft_type')!r} adapter; medc merges LoRA (and DoRA) adapters.")
    from safetensors import safe_open

    with safe_open(str(path / WEIGHTS), "np") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    targets = config.get("target_modules") or ()
    targets = (targets,) if isinstance(targets, str) else tuple(sorted(targets))
    digest = hashlib.sha256((path / WEIGHTS).read_bytes()).hexdigest()
    return Adapter(path, digest, "LORA", int(config.get("r", 8)), float(config.get("lora_alpha", 8)), targets,
                   bool(config.get("use_dora", False)), shapes)


def _module_name(key: str) -> tuple[str, str] | None:
    """'base_model.model.X.lora_A.weight' -> ('X', 'lora_A'); other keys (DoRA magnitudes, biases) -> None."""
    prefix = "base_model.model."
    name = key[len(prefix):] if key.startswith(prefix) else key
    for part in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"):
        marker = f".{part}"
        if marker in name:
            return name[:name.index(marker)], part
    return None


def check_fits(adapter: Adapter, model) -> None:
    """Refuse an adapter whose modules or shapes are not the model's, naming the first mismatch."""
    import torch

    modules = dict(model.named_modules())
    for key, shape in sorted(adapter.shapes.items()):
        parsed = _module_name(key)
        if parsed is None:
            continue
        name, part = parsed
        module = modules.get(name)
        if module is None:
            raise MedcError(f"adapter {adapter.path.name} does not fit this model: it adapts {name!r}, which the model "
                            "does not have. It was trained on another architecture or model size.")
        if isinstance(module, torch.nn.Linear):
            want = {"lora_A": (adapter_rank(shape, part), module.in_features),
                    "lora_B": (module.out_features, adapter_rank(shape, part))}.get(part)
        elif isinstance(module, torch.nn.Embedding):
            want = {"lora_embedding_A": (adapter_rank(shape, part), module.num_embeddings),
                    "lora_embedding_B": (module.embedding_dim, adapter_rank(shape, part))}.get(part)
        else:
            raise MedcError(f"adapter {adapter.path.name} adapts {name!r}, a {type(module).__name__}; medc merges "
                            "LoRA on Linear and Embedding layers.")
        if want is None or tuple(shape) != want:
            raise MedcError(f"adapter {adapter.path.name} does not fit this model: {key} has shape {list(shape)}, but "
                            f"{name!r} ({type(module).__name__}) needs {list(want) if want else 'another part'}. "
                            "It was trained on another model size.")


def adapter_rank(shape, part: str) -> int:
    return shape[0] if part in ("lora_A", "lora_embedding_A") else shape[-1]


def apply(model, adapters: list[Adapter], scale: float = 1.0):
    """Inject the adapters into `model` (in place, unmerged, all active); returns the PeftModel around it. The
    weights are read from safetensors here, not through peft's from_pretrained, which would also accept a pickle."""
    import dataclasses

    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from peft.tuners.lora import LoraLayer
    from safetensors.torch import load_file

    known = {f.name for f in dataclasses.fields(LoraConfig)}
    names = [f"adapter{i}" for i in range(len(adapters))]
    peft_model = None
    for name, a in zip(names, adapters):
        raw = json.loads((a.path / CONFIG).read_text())
        config = LoraConfig(**{k: v for k, v in raw.items() if k in known and k != "peft_type"})
        config.inference_mode = True
        if peft_model is None:
            peft_model = get_peft_model(model, config, adapter_name=name)
        else:
            peft_model.add_adapter(name, config)
        result = set_peft_model_state_dict(peft_model, load_file(str(a.path / WEIGHTS)), adapter_name=name)
        if getattr(result, "unexpected_keys", None):
            raise MedcError(f"adapter {a.path.name} holds tensors peft does not place in this model "
                            f"({result.unexpected_keys[0]}); it does not fit the base.")
    peft_model.base_model.set_adapter(names)  # every adapter active: their deltas add up, as a merge adds them
    if scale != 1.0:
        for module in peft_model.modules():
            if isinstance(module, LoraLayer):
                for name in names:
                    if name in module.scaling:
                        module.set_scale(name, scale)  # scaling = scale * alpha / r
    peft_model.eval()
    return peft_model


def merge(peft_model):
    """The base model with every active adapter merged into its weights (peft's merge), LoRA layers gone."""
    names = list(peft_model.peft_config)
    return peft_model.merge_and_unload(adapter_names=names)


# -- adapters at run time: the decoder with LoRA slots left open ----------------------------------------------------
# `medc build MODEL --adapter-slot DIR…` builds the base once, with a LoRA branch beside each targeted projection of
# the decoder: y = x W + (x A) B, where A [in, rank] and B [rank, out] are graph inputs whose defaults are zeros (ONNX
# Runtime's overridable initializers), so the base runs unchanged. An adapter is a small file in ONNX Runtime's LoRA
# adapter format holding those A and B (scale folded into B, a smaller rank zero-padded); the runtime activates one per
# call (`RunOptions.add_active_adapter`). The branches are added to the decoder as built (after every optimisation and
# the weight-only quantisation: the base keeps its int8/int4 weights, the adapter stays fp32, QLoRA-style), found by
# the output tensor of each projection, which the passes keep.
ADAPTERS_DIR = "adapters"
SLOT_TOLERANCE = 1e-4  # empty slots against the decoder as gated: fp32 summation order only (measured ~1e-6)
ADAPTER_SUFFIX = ".onnx_adapter"
_SLOT = "lora.{module}.{part}"


def slot_map(raw_onnx: Path, model, modules: set[str]) -> dict[str, dict]:
    """{HF module name: {"output": tensor, "in": in_features, "out": out_features}} for each targeted Linear of
    the decoder: its MatMul in the exported graph, found by its weight (the exporter stores W transposed)."""
    import onnx
    import torch
    from onnx import numpy_helper

    graph = onnx.load(str(raw_onnx)).graph
    by_digest = {}
    for init in graph.initializer:
        arr = numpy_helper.to_array(init)
        if arr.ndim == 2 and arr.dtype == np.float32:
            by_digest[hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()] = init.name
    producers = {n.input[1]: n for n in graph.node if n.op_type == "MatMul" and len(n.input) == 2}
    out = {}
    for name, module in model.named_modules():
        if name not in modules or not isinstance(module, torch.nn.Linear):
            continue
        w_t = module.weight.detach().float().numpy().T
        init = by_digest.get(hashlib.sha256(np.ascontiguousarray(w_t).tobytes()).hexdigest())
        node = producers.get(init) if init else None
        if node is None:
            continue  # not in this component (e.g. the vision tower's, beside the decoder's)
        out[name] = {"output": node.output[0], "in": module.in_features, "out": module.out_features}
    if not out:
        raise MedcError("none of the adapters' target modules is a projection of the decoder; run-time adapters "
                        "apply to the decoder (merge adapters of the vision tower or the encoders with --adapter).")
    return out


def targeted_modules(adapters: list[Adapter]) -> set[str]:
    return {p[0] for a in adapters for k in a.shapes if (p := _module_name(k)) is not None}


def add_slots(decoder: Path, slots: dict[str, dict], rank: int) -> None:
    """Add the LoRA branches to the built decoder graph (in place; its external data untouched)."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(decoder), load_external_data=False)
    g = model.graph
    producers = {o: n for n in g.node for o in n.output}
    order = {id(n): i for i, n in enumerate(g.node)}
    inserts = []
    for module, s in slots.items():
        node = producers.get(s["output"])
        if node is None:
            raise MedcError(f"the built decoder has no tensor {s['output']!r} for {module}; rebuild the bundle.")
        x, y = node.input[0], s["output"]
        a, b = _SLOT.format(module=module, part="A"), _SLOT.format(module=module, part="B")
        for name, shape in ((a, [s["in"], rank]), (b, [rank, s["out"]])):
            g.initializer.append(helper.make_tensor(name, TensorProto.FLOAT, shape, np.zeros(shape, np.float32)))
            g.input.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))
        base = f"{y}.base"
        node.output[0] = base
        inserts.append((order[id(node)], [
            helper.make_node("MatMul", [x, a], [f"{y}.lora_a"], name=f"{module}.lora_a"),
            helper.make_node("MatMul", [f"{y}.lora_a", b], [f"{y}.lora_b"], name=f"{module}.lora_b"),
            helper.make_node("Add", [base, f"{y}.lora_b"], [y], name=f"{module}.lora_add")]))
    nodes = list(g.node)
    for index, extra in sorted(inserts, key=lambda t: -t[0]):
        nodes[index + 1:index + 1] = extra
    del g.node[:]
    g.node.extend(nodes)
    onnx.save(model, str(decoder))


def export_adapter(adapter: Adapter, slots: dict[str, dict], rank: int, scale: float, out: Path) -> dict:
    """The adapter in ONNX Runtime's LoRA adapter format for a bundle with these slots: A and B of every slot (zeros
    where the adapter does not reach), scale folded into B. Refuses an adapter that does not fit the slots."""
    import onnxruntime as ort
    from safetensors.numpy import load_file

    if adapter.rank > rank:
        raise MedcError(f"adapter {adapter.path.name} has rank {adapter.rank}; this bundle's slots hold rank {rank} "
                        "at most. Rebuild the base with this adapter among --adapter-slot, or merge it (--adapter).")
    tensors = load_file(str(adapter.path / WEIGHTS))
    factors: dict[str, dict[str, np.ndarray]] = {}
    for key, arr in tensors.items():
        parsed = _module_name(key)
        if parsed is None:
            continue
        module, part = parsed
        if part not in ("lora_A", "lora_B") or module not in slots:
            raise MedcError(f"adapter {adapter.path.name} adapts {module!r}, which this bundle has no run-time slot "
                            f"for (slots: {len(slots)} decoder projections). Merge it at build with --adapter, or "
                            "rebuild the base with it among --adapter-slot.")
        factors.setdefault(module, {})[part] = arr.astype(np.float32)
    strength = scale * adapter.alpha / adapter.rank
    params = {}
    for module, s in slots.items():
        a = np.zeros((s["in"], rank), np.float32)
        b = np.zeros((rank, s["out"]), np.float32)
        f = factors.get(module)
        if f is not None:
            if f["lora_A"].shape != (adapter.rank, s["in"]) or f["lora_B"].shape != (s["out"], adapter.rank):
                raise MedcError(f"adapter {adapter.path.name} does not fit this bundle: {module} has A "
                                f"{list(f['lora_A'].shape)} and B {list(f['lora_B'].shape)}, the slot takes "
                                f"[r, {s['in']}] and [{s['out']}, r].")
            a[:, :adapter.rank] = f["lora_A"].T
            b[:adapter.rank] = (f["lora_B"] * strength).T
        params[_SLOT.format(module=module, part="A")] = ort.OrtValue.ortvalue_from_numpy(a)
        params[_SLOT.format(module=module, part="B")] = ort.OrtValue.ortvalue_from_numpy(b)
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters(params)
    out.parent.mkdir(parents=True, exist_ok=True)
    fmt.export_adapter(str(out))
    return adapter.record(scale)


def build_slots(stage: Path, decoder_file: str, slots: dict[str, dict], found: list[Adapter], scale: float,
                cases: dict, work: Path, adapter_refs: dict, tolerance, allow_degraded: bool = False) -> dict:
    """The built decoder given its LoRA slots (checked to answer as before with none active), and each adapter
    written in ONNX Runtime's format and gated: the decoder with it active against HF + peft with it applied,
    on the decoder's golden inputs, at the decoder's own bar (a quantised base with an fp32 adapter, QLoRA-style,
    passes or not here). Returns the manifest's `generation.lora` record."""
    from medc.runtime.verify import evaluate
    import shutil

    import onnxruntime as ort

    decoder = stage / decoder_file
    before = work / "decoder.before-slots.onnx"
    shutil.copy2(decoder, before)
    rank = max(a.rank for a in found)
    add_slots(decoder, slots, rank)
    # Zeros in every slot: what the gate passed, on the gate's own inputs (ONNX Runtime fuses the graph a little
    # differently around the branches: float rounding, nothing more).
    so = ort.SessionOptions()
    so.log_severity_level = 3  # the slots are initializers that are graph inputs, by design: no warning per slot
    old = ort.InferenceSession(str(before), so, providers=["CPUExecutionProvider"])
    new = ort.InferenceSession(str(decoder), so, providers=["CPUExecutionProvider"])
    worst = 0.0
    for case in cases.values():
        feeds = {k: v for k, v in case["in"].items() if k in {i.name for i in old.get_inputs()}}
        # The logits: a slot decoder's KV outputs hold only the rows a step wrote (the rest is unset memory).
        a, b = old.run(["logits"], feeds)[0], new.run(["logits"], feeds)[0]
        worst = max(worst, float(np.abs(a.astype(np.float64) - b).max(initial=0.0)))
    if worst > SLOT_TOLERANCE:
        raise MedcError(f"the decoder with empty LoRA slots answers up to {worst:.2g} away from the decoder built "
                        f"(over {SLOT_TOLERANCE:g}); this is a medc bug: report it, and merge the adapters "
                        "(--adapter) meanwhile.")
    records = {}
    for a in found:
        rel = f"{ADAPTERS_DIR}/{a.path.name}{ADAPTER_SUFFIX}"
        records[a.path.name] = {"file": rel, **export_adapter(a, slots, rank, scale, stage / rel)}
        active = ort.LoraAdapter()
        active.Load(str(stage / rel))
        options = ort.RunOptions()
        options.add_active_adapter(active)
        names = {i.name for i in new.get_inputs()}

        def run(feeds, options=options):
            return {"logits": new.run(["logits"], {k: v for k, v in feeds.items() if k in names}, options)[0]}

        refs = {case: {"in": io["in"], "ref": {"logits": io["ref"]["logits"]}}
                for case, io in adapter_refs[a.path.name].items()}
        fidelity = evaluate(run, refs, tolerance)
        records[a.path.name]["fidelity"] = fidelity
        if not fidelity["passed"] and not allow_degraded:
            raise MedcError(f"adapter {a.path.name} at run time does not reach the decoder's bar against HF + peft "
                            f"(worst cosine {fidelity['worst']['cosine']:.6f}; {tolerance.describe()}). Merge it "
                            "(--adapter) or build the base at a higher precision; --allow-degraded keeps it, "
                            "recorded as failing.")
    return {"rank": rank, "slots": slots, "adapters": records, "empty_slots_max_abs": worst}


def add_to_bundle(bundle_dir: Path, adapter_dir: Path, name: str | None = None, scale: float = 1.0,
                  sign_key=None, trust=None) -> dict:
    """`medc adapter add`: another run-time adapter in a built bundle, without rebuilding the base. Written as a
    record of its own (records/adapter-NAME.json, its file's sha256), so the base manifest and its signature stay as
    they are; `sign_key` signs the record."""
    from datetime import datetime, timezone

    from medc.manifest import Record, read_json_file, sha256_file
    from medc.runtime.bundle import open_bundle
    from medc.signing import digest

    bundle_dir = Path(bundle_dir)
    manifest = open_bundle(bundle_dir, trust=trust).manifest  # verified: an adapter joins only an intact bundle
    lora = (manifest.generation or {}).get("lora")
    if not lora:
        raise MedcError(f"bundle {bundle_dir} has no LoRA slots: it was built without --adapter-slot. Rebuild it with "
                        "--adapter-slot DIR (any adapter whose target modules and rank cover this one's), or merge "
                        "the adapter at build with --adapter.")
    adapter = read(adapter_dir)
    name = name or adapter.path.name
    if not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise MedcError(f"adapter name {name!r}: use letters, digits, '-', '_' and '.' only.")
    if name in lora.get("adapters", {}):
        raise MedcError(f"bundle {bundle_dir} has an adapter named {name!r} already; choose another --name.")
    rel = f"{ADAPTERS_DIR}/{name}{ADAPTER_SUFFIX}"
    tmp = bundle_dir / ADAPTERS_DIR / f".{name}.tmp"
    try:
        record = {"file": rel, **export_adapter(adapter, lora["slots"], int(lora["rank"]), scale, tmp)}
        os.replace(tmp, bundle_dir / rel)
    finally:
        tmp.unlink(missing_ok=True)
    Record(name=f"adapter-{name}", kind="lora-adapter", base=digest(read_json_file(bundle_dir)),
           files={rel: sha256_file(bundle_dir / rel)}, data={"lora_adapter": {name: record}},
           created=datetime.now(timezone.utc).isoformat(timespec="seconds")).write(bundle_dir, sign_key)
    return record
