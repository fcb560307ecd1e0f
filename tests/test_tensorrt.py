"""The TensorRT stage on CPU: profiles, graph rewrites, trtexec text, compatibility rules, error messages, and the
engine-build / runtime bookkeeping driven through a *fake* TensorRT and CUDA (they run the ONNX graph with ONNX
Runtime on host memory). The fakes check medc's use of the documented API, not TensorRT itself; the tests marked
`tensorrt`/`gpu` build and run real engines and skip on machines without them."""

from __future__ import annotations

import ctypes
import importlib.machinery
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from medc.compile import tensorrt as trt_stage
from medc.compile.lint import lint_model
from medc.errors import MedcError
from medc.manifest import ComponentEntry, Manifest
from medc.specs import TensorSpec
from medc.targets import TARGETS, get_target

TRT_TARGETS = sorted(n for n, t in TARGETS.items() if t.engine == "tensorrt")


# -- manifests from the real component specs (no weights) --------------------------------------------------------------
def _spec_manifest(model: str) -> Manifest:
    """A manifest with the registry model's real component I/O specs and KV layout, without building anything."""
    from medc.compile.hf import hf_config
    from medc.compile.models import gemma3
    from medc.compile.registry import MODELS

    spec = MODELS[model]
    cfg = hf_config(spec.family, spec.config)
    comps = {c.name: ComponentEntry(f"{c.name}.onnx", "fp32", list(c.inputs), list(c.outputs),
                                    fidelity={"tolerance": {"min_cosine": 0.99999, "max_abs": 1e-4}})
             for c in spec.family.components(cfg)}
    generation, preprocessing = {}, {}
    if spec.family.name == "gemma3":
        t = gemma3.text_config(cfg)
        generation = {"kv_layout": gemma3.kv_layout(t), "sliding_window": t.sliding_window,
                      "num_layers": t.num_hidden_layers, "num_kv_heads": t.num_key_value_heads, "head_dim": t.head_dim,
                      "max_positions": t.max_position_embeddings}
        preprocessing = {"mm_tokens_per_image": getattr(cfg, "mm_tokens_per_image", 0)}
    return Manifest(model={"name": model, "family": spec.family.name}, target="t4", components=comps,
                    generation=generation, preprocessing=preprocessing)


@pytest.fixture(scope="module")
def gemma4b() -> Manifest:
    return _spec_manifest("medgemma-4b-it")


@pytest.fixture(scope="module")
def siglip448() -> Manifest:
    return _spec_manifest("medsiglip-448")


def _dims_ok(shapes: dict) -> bool:
    return all(lo <= o <= hi for s in shapes.values() for lo, o, hi in zip(s["min"], s["opt"], s["max"]))


@pytest.mark.parametrize("target", TRT_TARGETS)
def test_profiles_for_every_tensorrt_target(target, gemma4b, siglip448):
    t = get_target(target)
    gp = trt_stage.derive_profiles(gemma4b, t, context=4096, max_batch=2)
    dec = gp["decoder"]
    assert _dims_ok(dec) and _dims_ok(gp["vision_encoder"]) and _dims_ok(gp["embed_tokens"])
    layout = gemma4b.generation["kv_layout"]
    sliding = next(i for i, layer in enumerate(layout) if layer["keep"] is not None)
    full = next(i for i, layer in enumerate(layout) if layer["keep"] is None)
    assert dec[f"past_key.{sliding}"]["max"] == [2, 4, 1023, 256]  # sliding layers keep window - 1 = 1023 tokens
    assert dec[f"past_key.{full}"]["max"] == [2, 4, 4095, 256]  # global layers: the last step sees context - 1
    # a step carries one prefill chunk at most (the runtime's 512): the engine's activation memory is a chunk's
    assert dec["inputs_embeds"] == {"min": [1, 1, 2560], "opt": [1, 256, 2560], "max": [2, 512, 2560]}
    assert dec["logits_positions"] == {"min": [1], "opt": [1], "max": [512]}
    for which in ("min", "opt"):  # consistent sets: total = seq + past (TensorRT tunes at opt)
        assert dec["attention_mask"][which][1] == dec["inputs_embeds"][which][1] + dec[f"past_key.{full}"][which][2]
    assert gp["vision_encoder"]["pixel_values"] == {"min": [1, 3, 896, 896], "opt": [2, 3, 896, 896],
                                                    "max": [2, 3, 896, 896]}  # static image, batch opt = max
    sp = trt_stage.derive_profiles(siglip448, t, context=4096, max_batch=4)
    assert sp["text_encoder"]["input_ids"] == {"min": [1, 64], "opt": [4, 64], "max": [4, 64]}
    assert sp["image_encoder"]["pixel_values"]["max"] == [4, 3, 448, 448]


def test_profile_limits(gemma4b):
    t4 = get_target("t4")
    small = trt_stage.derive_profiles(gemma4b, t4, context=512, max_batch=1)["decoder"]
    assert small["past_key.0"]["max"][2] == 511  # context below the window caps the sliding cache too
    assert small["inputs_embeds"]["opt"][1] == 256
    with pytest.raises(MedcError, match="exceeds this model's 131072 positions"):
        trt_stage.derive_profiles(gemma4b, t4, context=200_000, max_batch=1)
    with pytest.raises(MedcError, match="max batch"):
        trt_stage.derive_profiles(gemma4b, t4, context=512, max_batch=0)
    odd = Manifest(model={}, target="t4", components={"x": ComponentEntry("x.onnx", "fp32", [
        TensorSpec("a", "float32", ("batch", "frames"))], [])})
    with pytest.raises(MedcError, match="no TensorRT profile rule for dynamic axis 'frames'"):
        trt_stage.derive_profiles(odd, t4, context=512, max_batch=1)


def test_workspace_from_target_memory(gemma4b):
    nano, h200 = get_target("jetson-orin-nano-8gb"), get_target("h200")
    m = _spec_manifest("medgemma-tiny")
    m.build = {"memory_plan": {"total_bytes": int(5.5 * 2**30)}}
    assert trt_stage.workspace_bytes(nano, m) == (nano.usable_bytes() - int(5.5 * 2**30)) // 2  # half of what is left
    assert trt_stage.workspace_bytes(h200, m) == 4 * 2**30  # capped
    m.build = {"memory_plan": {"total_bytes": 7 * 2**30}}
    assert trt_stage.workspace_bytes(nano, m) == 256 * 2**20  # floor


# -- trtexec ----------------------------------------------------------------------------------------------------------
def test_trtexec_flags_per_version(gemma4b):
    shapes = trt_stage.derive_profiles(gemma4b, get_target("t4"), 1024, 1)["decoder"]
    v10 = trt_stage.trtexec_command("decoder", "decoder.onnx", shapes, trt_stage.rules_for("10.3"), 3 << 30)
    v11 = trt_stage.trtexec_command("decoder", "decoder.onnx", shapes, trt_stage.rules_for("11.4.1"), 3 << 30)
    for cmd in (v10, v11):
        assert cmd[:3] == ["trtexec", "--onnx=decoder.onnx", "--saveEngine=tensorrt/decoder.plan"]
        assert "--memPoolSize=workspace:3072" in cmd and "--timingCacheFile=tensorrt/timing.cache" in cmd
        assert not any(f in cmd for f in ("--fp16", "--int8", "--bf16", "--best", "--calib"))  # typed graphs only
        assert any(a.startswith("--minShapes=inputs_embeds:1x1x2560,attention_mask:1x1,") for a in cmd)
        assert "past_key.5:1x4x1023x256" in next(a for a in cmd if a.startswith("--maxShapes="))
    assert "--stronglyTyped" in v10 and "--stronglyTyped" not in v11  # 11: always strongly typed
    static = trt_stage.trtexec_command("vision_encoder", "v.onnx", {"pixel_values": {
        "min": [1, 3, 8, 8], "opt": [1, 3, 8, 8], "max": [1, 3, 8, 8]}}, trt_stage.rules_for("10.13"), 1 << 30)
    assert not any("Shapes=" in a for a in static)
    with pytest.raises(MedcError, match="too old"):
        trt_stage.rules_for("8.6.2")
    nano = get_target("jetson-orin-nano-8gb")  # JetPack 6 (TensorRT 10.3) or JetPack 7.2 (11.4): one block each
    script = trt_stage.trtexec_script(gemma4b, nano.name, trt_stage.derive_profiles(gemma4b, nano, 1024, 1),
                                      list(nano.tensorrt), 1 << 30)
    blocks = script.split("\n  11)\n")
    assert len(blocks) == 2 and "\n  10)\n" in blocks[0] and blocks[0].count("--stronglyTyped") == 3
    assert "--stronglyTyped" not in blocks[1] and blocks[1].count("trtexec \\") == 3
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    assert trt_stage.rules_for("10.13.3.9").strongly_typed_flag and not trt_stage.rules_for("11.0").strongly_typed_flag


# -- compatibility and missing TensorRT --------------------------------------------------------------------------------
def _built(manifest: Manifest, version="10.3.0.30", cc="8.7") -> Manifest:
    manifest.tensorrt = {"engines": {"decoder": {"file": "tensorrt/decoder.plan"}},
                         "built_with": {"tensorrt_version": version, "compute_capability": cc, "gpu": "Orin"}}
    manifest.target = "jetson-orin-nano-8gb"
    return manifest


def test_engine_compat_refusals():
    from medc.runtime.trt_session import check_engine_compat

    m = _built(_spec_manifest("medgemma-tiny"))
    check_engine_compat(m, "10.3.0", "8.7")  # build number may differ; major.minor.patch must not
    with pytest.raises(MedcError, match=r"TensorRT 10\.3\.0\.30 \(this device has TensorRT 10\.3\.1\).*"
                                        r"rebuild the engines here: `medc engines BUNDLE --target jetson-orin-nano-8gb`"):
        check_engine_compat(m, "10.3.1", "8.7")
    with pytest.raises(MedcError, match=r"compute capability 8\.7 .*this GPU is 9\.0.*--target T` \(T: h100, h200\)"):
        check_engine_compat(m, "10.3.0", "9.0")
    with pytest.raises(MedcError, match=r"--target t4`"):
        check_engine_compat(m, "10.3.0", "7.5")
    m.tensorrt = {"engines": {}}
    with pytest.raises(MedcError, match="no TensorRT engines yet.*`medc engines BUNDLE"):
        check_engine_compat(m, "10.3.0", "8.7")


def test_missing_tensorrt_says_how_to_install(monkeypatch):
    from medc.runtime import trt_session

    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    monkeypatch.setattr(trt_session, "_on_jetson", lambda target=None: target is not None and target.platform == "jetson")
    with pytest.raises(MedcError, match=r"sudo apt install nvidia-jetpack.*python3-libnvinfer") as jetson:
        trt_session.import_tensorrt(get_target("jetson-orin-nano-8gb"))
    assert "10.3 or 11.4" in str(jetson.value)
    with pytest.raises(MedcError, match=r"pip install tensorrt-cu12.*version 10\.13"):
        trt_session.import_tensorrt(get_target("t4"))
    with pytest.raises(MedcError, match="tensorrt-cu12"):
        trt_session.TrtSession(Path("x.plan")).open()


# -- graph rewrites -----------------------------------------------------------------------------------------------------
def _tiny_graph(path: Path, contrib: bool = False):
    import onnx
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Equal", ["ids", "one"], ["is_one"]),
             helper.make_node("Pad", ["is_one", "pads", "false"], ["padded"], mode="constant", name="pad"),
             helper.make_node("Cast", ["padded"], ["as_int"], to=TensorProto.INT64),
             helper.make_node("CumSum", ["as_int", "axis"], ["count"], name="cumsum")]
    if contrib:
        nodes.append(helper.make_node("FastGelu", ["x"], ["y"], domain="com.microsoft"))
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"])],
        [helper.make_tensor_value_info("count", TensorProto.INT64, ["b", "t"]),
         helper.make_tensor_value_info("padded", TensorProto.BOOL, ["b", "t"])],
        [helper.make_tensor("one", TensorProto.INT64, [], [1]), helper.make_tensor("pads", TensorProto.INT64, [4],
                                                                                   [0, 2, 0, 0]),
         helper.make_tensor("false", TensorProto.BOOL, [], [False]), helper.make_tensor("axis", TensorProto.INT64, [],
                                                                                       [1])])
    opsets = [helper.make_opsetid("", 20)] + ([helper.make_opsetid("com.microsoft", 1)] if contrib else [])
    model = helper.make_model(graph, opset_imports=opsets)
    if not contrib:
        model = onnx.shape_inference.infer_shapes(model)
    onnx.save(model, str(path))


def test_graph_rewrites_are_exact(tmp_path):
    import onnx
    import onnxruntime as ort

    path, t4 = tmp_path / "g.onnx", get_target("t4")
    _tiny_graph(path)
    ids = np.array([[1, 0, 1, 1], [0, 0, 1, 0]], np.int64)
    before = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"ids": ids})
    fixes = trt_stage.make_trt_ready_file(path, t4)
    assert fixes == {"Pad:BOOL->INT32": 1, "CumSum:INT64->FLOAT": 1}
    after = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"ids": ids})
    assert all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(before, after))
    assert _islands_in_place(onnx.load(str(path)).graph)
    assert trt_stage.make_trt_ready_file(path, t4) == {}  # idempotent
    assert lint_model(onnx.load(str(path)), t4).ok
    bad = tmp_path / "c.onnx"
    _tiny_graph(bad, contrib=True)
    found = lint_model(onnx.load(str(bad)), t4).errors  # the TensorRT stage blocks what its lint finds
    assert [f.name for f in found if f.rule == "op-contrib"] and any("FastGelu" in f.message for f in found)


def _islands_in_place(graph) -> bool:
    """Every CumSum reads a Cast to float, and no Pad reads a bool tensor (TensorRT's parser types)."""
    producer = {o: n for n in graph.node for o in n.output}
    types = {v.name: v.type.tensor_type.elem_type for v in (*graph.value_info, *graph.input, *graph.output)}

    def cast_to(name):
        n = producer.get(name)
        return n.attribute[0].i if n is not None and n.op_type == "Cast" else None

    return (all(cast_to(n.input[0]) == 1 for n in graph.node if n.op_type == "CumSum")
            and not any(types.get(n.input[0]) == 9 for n in graph.node if n.op_type == "Pad"))


# -- a TRT-ready bundle from the lead's build (MedGemma tiny, target t4, fp16) ------------------------------------------
@pytest.fixture(scope="module")
def gemma_t4(tmp_path_factory) -> Path:
    from medc.compile.build import BuildOptions, build

    out = tmp_path_factory.mktemp("trt") / "gemma-t4"
    build(BuildOptions(model="medgemma-tiny", target="t4", precision="fp16", optimizer="none", out=out))
    return out


def test_prepare_bundle_writes_a_trt_ready_bundle(gemma_t4):
    from medc.runtime.bundle import open_bundle

    m = open_bundle(gemma_t4).manifest  # hashes verified: prepare_bundle ran before the bundle was hashed
    rec = m.tensorrt
    assert rec["status"] == "trt-ready" and rec["blocked"] == {} and rec["engines"] == {}
    assert rec["lint"]["ok"] and rec["lint"]["errors"] == 0  # the stage's last step
    assert rec["target"] == "t4" and rec["compute_capability"] == "7.5" and rec["tensorrt_versions"] == ["10.13"]
    assert rec["profiles"] == trt_stage.derive_profiles(m, get_target("t4"), rec["context"], rec["max_batch"])
    assert rec["context"] == 512 and rec["max_batch"] == 1
    # batch up to 3: the golden decode case, so `medc verify` can run the engines on it; opt stays the request
    assert rec["profiles"]["decoder"]["past_key.0"]["max"] == [3, 2, 7, 16]
    assert rec["profiles"]["vision_encoder"]["pixel_values"]["opt"] == [1, 3, 64, 64]
    assert {"tensorrt/profiles.json", "tensorrt/trtexec.sh"} <= set(m.files)
    assert json.loads((gemma_t4 / "tensorrt/profiles.json").read_text())["profiles"] == rec["profiles"]
    import onnx

    assert _islands_in_place(onnx.load(str(gemma_t4 / "decoder.onnx"), load_external_data=False).graph)
    assert set(rec["graph_rewrites"]) <= {"decoder"}  # empty when the build already made the graph TensorRT-ready
    again = Manifest.from_json(json.loads(json.dumps(m.to_json())))  # the new field survives a round trip
    assert again.tensorrt == rec
    old = m.to_json()
    del old["tensorrt"]  # a manifest written before the field existed still loads
    assert Manifest.from_json(old).tensorrt == {}


def test_trtexec_script_runs_with_a_fake_trtexec(gemma_t4, tmp_path):
    fake = tmp_path / "bin" / "trtexec"
    fake.parent.mkdir()
    fake.write_text('#!/usr/bin/env bash\nif [ "$1" = --help ]; then echo "&&&& RUNNING TensorRT.trtexec '
                    '[TensorRT v101303] # trtexec --help"; exit 0; fi\necho "$@" >> "$TRTEXEC_LOG"\n')
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}", "TRTEXEC_LOG": str(tmp_path / "log")}
    subprocess.run(["bash", str(gemma_t4 / "tensorrt/trtexec.sh")], env=env, check=True, timeout=60)
    calls = (tmp_path / "log").read_text().splitlines()
    assert len(calls) == 3 and all("--stronglyTyped" in c and "--skipInference" in c for c in calls)
    env["MEDC_TRT_MAJOR"] = "11"
    bad = subprocess.run(["bash", str(gemma_t4 / "tensorrt/trtexec.sh")], env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "prepared for TensorRT 10.13" in bad.stderr


def test_finish_engines_refusals(gemma_t4, copy_bundle, monkeypatch):
    with pytest.raises(MedcError, match="built for target 't4', not 'l4'"):
        trt_stage.finish_engines(gemma_t4, "l4")
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(MedcError, match="pip install tensorrt-cu12"):
        trt_stage.finish_engines(gemma_t4, "t4")
    bundle = copy_bundle(gemma_t4)
    m = Manifest.read(bundle)
    m.tensorrt["blocked"] = {"vision_encoder": "fused ops"}
    m.write(bundle)
    with pytest.raises(MedcError, match="cannot build TensorRT engines: vision_encoder: fused ops"):
        trt_stage.finish_engines(bundle)


# -- fake TensorRT + CUDA: the build and runtime bookkeeping ------------------------------------------------------------
class _FakeCudart:
    """cuda.bindings.runtime look-alike over host memory: device pointers are host addresses, copies are memmoves."""

    cudaError_t = types.SimpleNamespace(cudaSuccess=0)
    cudaMemcpyKind = types.SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2)

    def __init__(self):
        self.mem, self.mallocs = {}, 0

    def cudaGetDeviceProperties(self, device):
        return 0, types.SimpleNamespace(name=b"Tesla T4\x00", major=7, minor=5)

    def cudaMalloc(self, nbytes):
        block = np.empty(nbytes, np.uint8)
        self.mem[block.ctypes.data] = block
        self.mallocs += 1
        return 0, block.ctypes.data

    def cudaFree(self, ptr):
        self.mem.pop(ptr)
        return (0,)

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream):
        ctypes.memmove(dst, src, nbytes)
        return (0,)

    def cudaStreamCreate(self):
        return 0, 7

    def cudaSetDevice(self, device):
        return (0,)

    cudaStreamSynchronize = cudaStreamDestroy = cudaSetDevice


class _FakeContext:
    """IExecutionContext: shapes and addresses as TensorRT takes them; runs the graph when outputs are needed."""

    def __init__(self, engine, strategy=0):
        self.e, self.shapes, self.addr, self.outs = engine, {}, {}, None
        self.user_managed, self.memory = strategy == "user-managed", None  # [alloc-10]: memory given per run
        self.memory_log = []  # (pointer, size) handed over before each run

    def update_device_memory_size_for_shapes(self):
        assert self.user_managed, "only valid on a USER_MANAGED context"
        return 1 << 16  # the scratch this shape needs (the fake runs on the host and only checks the hand-over)

    def set_device_memory(self, ptr, size):
        self.memory = (ptr, size)
        self.memory_log.append(self.memory)

    def set_input_shape(self, name, shape):
        p = self.e.profile[name]
        self.shapes[name] = tuple(shape)
        return all(lo <= d <= hi for lo, d, hi in zip(p["min"], shape, p["max"]))

    def set_tensor_address(self, name, ptr):
        self.addr[name] = ptr
        if name in self.e.inputs:
            self.outs = None
        return True

    def get_tensor_shape(self, name):
        return self.shapes.get(name, (-1,)) if name in self.e.inputs else self._run()[name].shape

    def execute_async_v3(self, stream_handle):
        if self.user_managed:  # TensorRT needs the activation memory set before every run of such a context
            assert self.memory is not None, "USER_MANAGED context run without device memory"
        for name, arr in self._run().items():
            arr = np.ascontiguousarray(arr)
            ctypes.memmove(self.addr[name], arr.ctypes.data, arr.nbytes)
        self.outs = None
        return True

    def _run(self):
        if self.outs is None:
            feeds = {}
            for name in self.e.inputs:
                dtype, shape = self.e.dtypes[name], self.shapes[name]
                nbytes = int(np.prod(shape)) * dtype.itemsize
                raw = (ctypes.c_uint8 * nbytes).from_address(self.addr[name]) if nbytes else b""
                feeds[name] = np.frombuffer(raw, dtype).reshape(shape).copy()
            self.outs = dict(zip(self.e.outputs, self.e.sess.run(self.e.outputs, feeds)))
        return self.outs


class _FakeEngine:
    """ICudaEngine over ONNX Runtime; the "plan" is JSON naming the ONNX file and the profile it was built with."""

    def __init__(self, plan: dict):
        import onnxruntime as ort

        self.sess = ort.InferenceSession(plan["onnx"], providers=["CPUExecutionProvider"])
        self.profile = plan["profile"]
        types_ = {"tensor(float)": np.dtype(np.float32), "tensor(float16)": np.dtype(np.float16),  # fp16 KV cache
                  "tensor(int64)": np.dtype(np.int64)}
        io = (*self.sess.get_inputs(), *self.sess.get_outputs())
        self.inputs = [t.name for t in self.sess.get_inputs()]
        self.outputs = [t.name for t in self.sess.get_outputs()]
        self.dtypes = {t.name: types_[t.type] for t in io}
        self.names = self.inputs + self.outputs
        self.num_io_tensors = len(self.names)

    def get_tensor_name(self, i):
        return self.names[i]

    def get_tensor_mode(self, name):
        return "in" if name in self.inputs else "out"

    def get_tensor_dtype(self, name):
        return self.dtypes[name]

    def create_execution_context(self, strategy=0):
        self.context = _FakeContext(self, strategy)
        return self.context


def _fake_tensorrt(version: str, calls: list):
    """The slice of the tensorrt module medc uses, recording the build calls in `calls`."""
    trt = types.ModuleType("tensorrt")
    trt.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)
    trt.__version__ = version
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, severity=2: None})
    trt.TensorIOMode = types.SimpleNamespace(INPUT="in", OUTPUT="out")
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=0)
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")
    trt.BuilderFlag = types.SimpleNamespace(TF32="tf32")
    trt.ExecutionContextAllocationStrategy = types.SimpleNamespace(STATIC=0, USER_MANAGED="user-managed")
    trt.nptype = lambda dtype: dtype
    cache = types.SimpleNamespace(serialize=lambda: b"timing cache")

    class Profile(dict):
        def set_shape(self, name, lo, opt, hi):
            self[name] = {"min": list(lo), "opt": list(opt), "max": list(hi)}

    class Config:
        def __init__(self):
            self.profiles = []

        def set_memory_pool_limit(self, pool, size):
            calls.append(("pool", pool, size))

        def clear_flag(self, flag):
            calls.append(("clear", flag))

        def add_optimization_profile(self, profile):
            self.profiles.append(profile)

        def create_timing_cache(self, data):
            calls.append(("cache in", data))
            return cache

        def set_timing_cache(self, timing, ignore_mismatch):
            return True

        def get_timing_cache(self):
            return cache

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            calls.append(("flags", flags))
            return types.SimpleNamespace()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            return json.dumps({"onnx": network.path, "profile": config.profiles[0]}).encode()

    class OnnxParser:
        num_errors = 0

        def __init__(self, network, logger):
            self.network = network

        def parse_from_file(self, path):
            self.network.path = path
            return True

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            return _FakeEngine(json.loads(bytes(data)))

    trt.Builder, trt.OnnxParser, trt.Runtime = Builder, OnnxParser, Runtime
    return trt


@pytest.fixture
def fake_gpu(monkeypatch):
    """Install the fake tensorrt (10.13.3.9) and cuda-python; returns (calls, cudart)."""
    from medc.runtime import trt_session

    calls, cudart = [], _FakeCudart()
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt("10.13.3.9", calls))
    cuda_pkg = types.ModuleType("cuda")
    cuda_pkg.__spec__ = importlib.machinery.ModuleSpec("cuda", None)
    monkeypatch.setitem(sys.modules, "cuda", cuda_pkg)
    monkeypatch.setattr(trt_session, "cuda_runtime", lambda: trt_session.CudaRuntime(cudart))
    return calls, cudart


@pytest.fixture
def finished(gemma_t4, copy_bundle, fake_gpu):
    """The t4 bundle with its (fake) engines built by finish_engines."""
    bundle = copy_bundle(gemma_t4)
    manifest = trt_stage.finish_engines(bundle, "t4", log=lambda m: None)
    return bundle, manifest, fake_gpu[0]


def test_finish_engines_records_and_rehashes(finished):
    from medc.runtime.bundle import open_bundle

    bundle, m, calls = finished
    rec = m.tensorrt
    assert rec["status"] == "engines-built" and set(rec["engines"]) == set(m.components)
    assert rec["built_with"] == {"tensorrt_version": "10.13.3.9", "compute_capability": "7.5", "gpu": "Tesla T4",
                                 "strongly_typed": True, "workspace_bytes": rec["workspace_bytes"]}
    assert open_bundle(bundle).manifest.tensorrt == rec  # plans and timing cache hashed in a record of their own
    record = json.loads((bundle / "records/tensorrt.json").read_text())
    assert {"tensorrt/decoder.plan", "tensorrt/timing.cache"} <= set(record["files"])
    assert not {"tensorrt/decoder.plan", "tensorrt/timing.cache"} & set(m.files)  # the build's manifest is as built
    assert ("flags", 1) in calls  # STRONGLY_TYPED on 10.x; no precision flags, no calibrator
    assert ("pool", "workspace", rec["workspace_bytes"]) in calls
    assert ("clear", "tf32") not in calls  # fp16 components are gated on cosine; fp32 ones would clear TF32
    plan = json.loads((bundle / "tensorrt/decoder.plan").read_bytes())
    assert plan["profile"] == rec["profiles"]["decoder"]
    calls.clear()
    again = trt_stage.finish_engines(bundle, log=lambda m: None)  # rebuilding on the same TensorRT + GPU
    assert ("cache in", b"timing cache") in calls and again.tensorrt["engines"].keys() == rec["engines"].keys()


def test_engines_added_after_signing_are_a_record_signed_by_the_device(gemma_t4, copy_bundle, fake_gpu, tmp_path):
    """The build's signature survives `medc engines`: the engines are a record of their own, signed by the device's
    key; a site that trusts the build key and that device key accepts it, one that trusts only the build key not."""
    from click.testing import CliRunner

    from medc.cli import main
    from medc.runtime.bundle import open_bundle, sign_bundle
    from medc.signing import Trust, generate, load_private

    (site, site_pub), (device, device_pub) = generate(tmp_path / "site"), generate(tmp_path / "jetson")
    bundle = copy_bundle(gemma_t4)
    sign_bundle(bundle, load_private(site))
    manifest_bytes = (bundle / "manifest.json").read_bytes()
    trt_stage.finish_engines(bundle, "t4", log=lambda m: None, sign_key=load_private(device),
                             trust=Trust.load([site_pub]))
    assert (bundle / "manifest.json").read_bytes() == manifest_bytes  # the signed manifest is untouched
    opened = open_bundle(bundle, trust=Trust.load([site_pub, device_pub]))
    assert opened.manifest.tensorrt["status"] == "engines-built"
    assert opened.check.chain == [
        f"manifest: signed by site.pub (key {load_private(site).key_id}), trusted",
        f"record tensorrt (tensorrt-engines): signed by jetson.pub (key {load_private(device).key_id}), trusted"]
    with pytest.raises(MedcError, match="tensorrt-engines record 'tensorrt'.*not among the trusted keys"):
        open_bundle(bundle, trust=Trust.load([site_pub]))
    res = CliRunner().invoke(main, ["verify", str(bundle), "--trust", str(site_pub), "--trust", str(device_pub)])
    assert res.exit_code == 0 and "record tensorrt (tensorrt-engines): signed by jetson.pub" in res.output
    # An engine swapped afterwards is named; a record without a signature is refused where trust is configured.
    plan = bundle / "tensorrt" / "decoder.plan"
    plan.write_bytes(plan.read_bytes() + b" ")
    with pytest.raises(MedcError, match="tensorrt/decoder.plan changed since the build"):
        open_bundle(bundle)
    (bundle / "records" / "tensorrt.json").unlink()
    trt_stage.finish_engines(bundle, "t4", log=lambda m: None)  # the unrecorded plans are rebuilt, unsigned
    assert open_bundle(bundle).manifest.tensorrt["status"] == "engines-built"
    with pytest.raises(MedcError, match="record 'tensorrt'.*is unsigned"):
        open_bundle(bundle, trust=Trust.load([site_pub, device_pub]))


def test_finish_engines_refuses_another_gpu(gemma_t4, copy_bundle, fake_gpu, monkeypatch):
    cudart = fake_gpu[1]
    monkeypatch.setattr(cudart, "cudaGetDeviceProperties",
                        lambda d: (0, types.SimpleNamespace(name=b"NVIDIA L4", major=8, minor=9)))
    with pytest.raises(MedcError, match=r"NVIDIA L4\) has compute capability 8\.9, but the bundle is for target t4 "
                                        r"\(compute capability 7\.5\)"):
        trt_stage.finish_engines(copy_bundle(gemma_t4))


def test_engines_pass_verify_and_run_in_the_pipeline(finished):
    from medc import runtime
    from medc.runtime.session import OrtSession
    from medc.runtime.trt_session import TrtSession
    from medc.runtime.verify import verify_bundle

    bundle, m, _ = finished
    report = verify_bundle(bundle)
    assert {"decoder (tensorrt)", "vision_encoder (tensorrt)", "embed_tokens (tensorrt)"} <= set(report)
    assert all(r["passed"] for r in report.values())
    with runtime.load(bundle) as model:
        kinds = {n: model.active_providers(n) for n in m.components}
        assert kinds == {"vision_encoder": ["TensorRT"], "embed_tokens": ["TensorRT"], "decoder": ["TensorRT"]}
        assert type(model.decoder(1)).__name__ == "TrtDecoder"  # the decoder drives the engine, cache on device
        assert isinstance(model.generate("Is there a pneumothorax?", max_new_tokens=3), str)
    # A batch above the profile's (3) is split; results match ONNX Runtime on the whole batch.
    pixels = np.random.default_rng(0).uniform(-1, 1, (5, 3, 64, 64)).astype(np.float32)
    with TrtSession(bundle / "tensorrt/vision_encoder.plan", m.tensorrt["profiles"]["vision_encoder"], manifest=m,
                    component="vision_encoder") as trt, OrtSession(bundle / "vision_encoder.onnx") as cpu:
        np.testing.assert_allclose(trt.run({"pixel_values": pixels})["image_features"],
                                   cpu.run({"pixel_values": pixels})["image_features"], rtol=1e-5, atol=1e-5)


def test_vision_engine_hands_its_activation_memory_back_after_each_run(finished):
    """The pipeline's vision encoder engine runs on a USER_MANAGED context given scratch memory per run and freed
    after it (runtime/trt_session.py), so the planner may count it apart from the decoder's; other engines keep
    TensorRT's default (static) allocation."""
    from medc import runtime

    bundle, m, _ = finished
    with runtime.load(bundle) as model:
        vision = model._sessions["vision_encoder"]
        assert vision.release_activations and not model._sessions["decoder"].release_activations
        pixels = np.random.default_rng(0).uniform(-1, 1, (2, 3, 64, 64)).astype(np.float32)
        for _ in range(2):
            held = set(vision.open().cuda.rt.mem)
            vision.run({"pixel_values": pixels})
            ctx = vision._engine.context
            scratch = ctx.memory_log[-1][0]
            assert ctx.user_managed and ctx.memory_log[-1][1] == 1 << 16
            assert scratch not in vision.cuda.rt.mem  # freed once the run is synchronised
            assert set(vision.cuda.rt.mem) - held <= set(b.ptr for b in vision._buffers.values())  # only I/O buffers
        assert not model._sessions["decoder"].open()._engine.context.user_managed


def test_trt_decoder_keeps_the_cache_on_device(finished):
    from medc.runtime.decoder import Chunk
    from medc.runtime.session import OrtSession
    from medc.runtime.trt_session import TrtDecoder, TrtSession
    from medc.runtime.verify import golden_cases

    bundle, m, _ = finished
    prefill = golden_cases(dict(np.load(bundle / "golden.npz")), "decoder")["prefill_b1"]["in"]
    step_feeds = {k: v for k, v in prefill.items() if not k.startswith("past_")}
    rng = np.random.default_rng(1)
    with TrtSession(bundle / "tensorrt/decoder.plan", m.tensorrt["profiles"]["decoder"], manifest=m,
                    component="decoder") as trt, OrtSession(bundle / "decoder.onnx") as cpu:
        dec = TrtDecoder(trt, m.generation, slots=1)
        past = {k: v for k, v in prefill.items() if k.startswith("past_")}
        feeds, mallocs = step_feeds, []
        chunk = Chunk(0, feeds["inputs_embeds"][0], feeds["logits_positions"], feeds["token_type_ids"][0] == 1)
        for step in range(6):  # a prefill, then decode steps past the sliding window (7 kept tokens)
            ref = cpu.run({**feeds, **past})
            np.testing.assert_array_equal(dec.step([chunk])[0], ref["logits"][0])
            past = {k.replace("present_", "past_"): v for k, v in ref.items() if k.startswith("present_")}
            mallocs.append(trt.cuda.rt.mallocs)
            s = feeds["attention_mask"].shape[1] + 1
            feeds = {"inputs_embeds": rng.standard_normal((1, 1, 64)).astype(np.float32),
                     "attention_mask": np.ones((1, s), np.int64), "position_ids": np.array([[s - 1]], np.int64),
                     "token_type_ids": np.zeros((1, 1), np.int64), "logits_positions": np.zeros(1, np.int64)}
            chunk = Chunk(0, feeds["inputs_embeds"][0], np.zeros(1, np.int64))
        for name, arr in dec.cache(0).items():
            np.testing.assert_array_equal(arr, past[name])
        assert mallocs[-1] - mallocs[1] <= 2 * len(dec.names)  # buffers reused and grown geometrically, not per step
        with pytest.raises(MedcError, match="outside the engine's optimisation profile"):
            trt.run({**step_feeds, "logits_positions": np.zeros(600, np.int64), **{k: v for k, v in prefill.items()
                                                                                  if k.startswith("past_")}})
        dec.close()


def test_engine_from_another_tensorrt_is_refused_at_load(finished, monkeypatch):
    from medc.runtime.trt_session import TrtSession

    bundle, m, _ = finished
    monkeypatch.setattr(sys.modules["tensorrt"], "__version__", "10.14.1")
    with pytest.raises(MedcError, match=r"TensorRT 10\.13\.3\.9 \(this device has TensorRT 10\.14\.1\)"):
        TrtSession(bundle / "tensorrt/decoder.plan", manifest=m, component="decoder").open()


# -- ONNX Runtime's GPU providers and the session registry --------------------------------------------------------------
def _fake_bundle(tensorrt: dict, family="siglip", precision="fp16", quantization=None):
    comp = ComponentEntry("image_encoder.onnx", precision, [TensorSpec("pixel_values", "float32", ("batch", 3, 8, 8))],
                          [], quantization=quantization or {"method": "fp16"})
    manifest = Manifest(model={"name": "m", "family": family}, target="t4", components={"image_encoder": comp},
                        tensorrt=tensorrt, files={"image_encoder.onnx": "ab"})
    return types.SimpleNamespace(manifest=manifest, path=Path("/b"), providers=["CPUExecutionProvider"],
                                 file=lambda rel: Path("/b") / rel), comp


def test_provider_options_and_cpu_unchanged(monkeypatch):
    from medc.runtime import session

    bundle, comp = _fake_bundle({"workspace_bytes": 1 << 30})
    assert session.provider_options(["CPUExecutionProvider"], bundle, comp) is None
    trt, cuda, cpu = session.provider_options(
        ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"], bundle, comp)
    cache = str(Path.home() / ".cache" / "medc" / "trt-ep")
    assert trt["trt_engine_cache_enable"] and trt["trt_engine_cache_path"].startswith(cache)
    assert trt["trt_timing_cache_enable"] and trt["trt_fp16_enable"] and trt["trt_max_workspace_size"] == 1 << 30
    assert cuda == {"device_id": 0, "use_tf32": 0} and cpu == {}  # TF32 off: fp32 stays fp32 (H200 run, 2.5e-4 -> gate)
    _, islands = _fake_bundle({}, quantization={"method": "fp16", "fp32_islands": {}})
    assert "trt_fp16_enable" not in session.provider_options(["TensorrtExecutionProvider"], bundle, islands)[0]
    seen = {}

    class Recorder:
        def __init__(self, path, so, **kwargs):
            seen.update(kwargs)

    import onnxruntime

    monkeypatch.setattr(onnxruntime, "InferenceSession", Recorder)
    session._ort(bundle, "image_encoder", comp, None).open()
    assert seen == {"providers": ["CPUExecutionProvider"]}  # no provider_options on CPU: as before


def test_session_registry(monkeypatch):
    from medc.runtime import session

    bundle, _ = _fake_bundle({"engines": {"image_encoder": {"file": "tensorrt/image_encoder.plan"}}})
    assert session.session_kind(bundle, "image_encoder") == "onnxruntime"  # no tensorrt/cuda-python here
    monkeypatch.setattr(session.importlib.util, "find_spec", lambda name: object())
    assert session.session_kind(bundle, "image_encoder") == "tensorrt"
    gemma, _ = _fake_bundle({"engines": {"decoder": {}}}, family="gemma3")
    assert session.session_kind(gemma, "decoder") == "tensorrt"  # driven by TrtDecoder, its cache on the device
    plain, _ = _fake_bundle({})
    assert session.session_kind(plain, "image_encoder") == "onnxruntime"


# -- real TensorRT (skipped without it) ---------------------------------------------------------------------------------
@pytest.mark.tensorrt
@pytest.mark.gpu
def test_real_engines_build_verify_and_decode(gemma_t4, copy_bundle):
    """On a machine with TensorRT and a GPU of the target's compute capability: build, verify, decode on device."""
    from medc.runtime.decoder import Chunk
    from medc.runtime.trt_session import TrtDecoder, TrtSession, gpu_info
    from medc.runtime.verify import golden_cases, verify_bundle

    gpu = gpu_info()
    if gpu is None or gpu[1] != "7.5":
        target = next((n for n in TRT_TARGETS if gpu and TARGETS[n].compute_capability == gpu[1]), None)
        if target is None:
            pytest.skip(f"no medc target for this GPU ({gpu})")
        from medc.compile.build import BuildOptions, build

        bundle = gemma_t4.parent / f"gemma-{target}"
        if not bundle.exists():
            build(BuildOptions(model="medgemma-tiny", target=target, precision="fp16", optimizer="none", out=bundle))
    else:
        bundle = copy_bundle(gemma_t4)
    m = trt_stage.finish_engines(bundle)
    assert all(r["passed"] for r in verify_bundle(bundle).values())
    prefill = golden_cases(dict(np.load(bundle / "golden.npz")), "decoder")["prefill_b1"]["in"]
    with TrtSession(bundle / "tensorrt/decoder.plan", m.tensorrt["profiles"]["decoder"], manifest=m,
                    component="decoder") as trt:
        dec = TrtDecoder(trt, m.generation, slots=1)
        logits = dec.step([Chunk(0, prefill["inputs_embeds"][0], prefill["logits_positions"],
                                 prefill["token_type_ids"][0] == 1)])[0]
        assert np.isfinite(logits).all()
        dec.close()
