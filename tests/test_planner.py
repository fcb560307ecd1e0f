"""Targets and the memory-fit planner: every profile, the arithmetic, and the numbers against real bundles on disk."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner

from medc.cli import main
from medc.compile import planner
from medc.compile.build import BuildOptions, build
from medc.compile.models.gemma3_family import FORMS
from medc.compile.plan import plan_for, resolve
from medc.compile.registry import MODELS
from medc.errors import MedcError
from medc.manifest import Manifest
from medc.targets import TARGETS, get_target

from conftest import prefill

# Issue 4's list, with the compute capabilities it names.
EXPECTED_SM = {"jetson-orin-nano-8gb": "8.7", "jetson-orin-nx-16gb": "8.7", "jetson-agx-orin-32gb": "8.7",
               "jetson-agx-orin-64gb": "8.7", "jetson-thor": "11.0", "t4": "7.5", "a10g": "8.6", "l4": "8.9",
               "a100-80gb": "8.0", "h100": "9.0", "h200": "9.0"}
MIB = 2**20


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_every_target_profile(name):
    t = get_target(name)
    assert t.kind in ("cpu", "gpu") and t.platform in ("host", "jetson", "datacenter")
    assert t.default_precision in t.precisions and "fp32" in t.precisions
    assert t.sources, "every profile cites where its numbers come from"
    if name in EXPECTED_SM:
        assert t.compute_capability == EXPECTED_SM[name]
        assert t.engine == "tensorrt" and t.graph_flavour == "portable" and t.int8_method == "static-qdq"
        assert t.tensorrt and t.memory_gib and t.bandwidth_gbs and t.peak_tflops["fp16"] > 0
        assert 0 < t.usable_memory_gib < t.memory_gib
        # hardware rules (TensorRT support matrix): bf16 from sm80, fp8 from sm89 and never on Orin
        assert ("bf16" in t.precisions) == (t.sm >= 80)
        assert ("fp8" in t.precisions) == (t.sm >= 89 and t.sm != 87)
        assert "int8" in t.precisions and "int4" in t.precisions
    if t.platform == "jetson" and t.sm == 87:
        # JetPack 6.0's TensorRT 8.6 lacks int4 weight-only: the profile starts at JetPack 6.1 / TensorRT 10.3
        assert min(t.tensorrt, key=lambda v: tuple(map(int, v.split(".")))) == "10.3"
        assert "6.1" in t.software["jetpack"]


def test_every_issue_target_exists():
    assert set(EXPECTED_SM) | {"cpu"} <= set(TARGETS)


@pytest.mark.parametrize("target, precision, match", [
    ("jetson-orin-nano-8gb", "fp8", "not available on Jetson Orin"),
    ("t4", "bf16", "compute capability 8.0 or newer"),
    ("cpu", "fp16", "does not offer fp16"),
])
def test_precision_the_target_lacks(target, precision, match):
    with pytest.raises(MedcError, match=match):
        planner.plan_build(plan_for(BuildOptions(model="medgemma-4b-it", out=Path("x"), precision=precision,
                                                 target=target)))


def test_unknown_target_lists_them():
    with pytest.raises(MedcError, match="jetson-orin-nano-8gb"):
        get_target("orin")


def test_bf16_is_planned_but_not_built(tmp_path):
    plan = planner.plan_build(plan_for(BuildOptions(model="medgemma-4b-it", out=Path("x"), precision="bf16",
                                                    target="h100")))
    assert plan.recipe["decoder"] == "bf16" and plan.fits
    with pytest.raises(MedcError, match="not supported by this medc version"):
        build(BuildOptions(model="medgemma-tiny", out=tmp_path / "b", precision="bf16", target="h100"))
    assert not (tmp_path / "b").exists()
    _, presets = planner.recommend(resolve("medgemma-4b-it"), BuildOptions(model="medgemma-4b-it", out=Path("x"),
                                                                            target="h100"))
    assert "bf16" not in {planner.preset_of(p) for p in presets}  # never recommended where it cannot be built


def test_bf16_on_the_cpu_target_is_openvino_encoders_and_a_fp32_decoder():
    """CPU targets build bf16 as OpenVINO IR (compile/openvino.py); Gemma 3's decoder has no bf16 form and steps down
    to fp32, which the plan says; the encoder's weights are planned at 2 bytes."""
    plan = plan_for(BuildOptions(model="medgemma-4b-it", out=Path("x"), precision="bf16"))
    by = {c.name: c for c in plan.components}
    assert by["vision_encoder"].methods == ["ov-bf16"] and by["vision_encoder"].precision == "bf16"
    assert by["decoder"].precision == "fp32" and by["decoder"].methods == []
    assert any("decoder has no bf16 form on target cpu; built in fp32" in n for n in plan.notes)
    mem = planner.plan_build(plan)
    vision = next(c for c in mem.components if c.name == "vision_encoder")
    assert vision.weight_bytes == pytest.approx(2 * vision.params, rel=0.01)


def test_kv_cache_is_window_aware():
    """MedGemma 4B, fp16 KV: 136 KiB per token over 34 layers; the 29 sliding layers stop at 1023 past tokens."""
    cfg = MODELS["medgemma-4b-it"].config
    kv4k, per_token = planner._kv(cfg, 4096, 1, 2, FORMS["explicit"])
    kv32k, _ = planner._kv(cfg, 32768, 1, 2, FORMS["explicit"])
    assert per_token == 136 * 1024
    assert kv4k == (29 * 1023 + 5 * 4096) * 4096 and round(kv4k / MIB) == 196
    assert round(kv32k / MIB) == 756
    assert planner._kv(cfg, 4096, 4, 2, FORMS["explicit"])[0] == 4 * kv4k  # linear in batch


def test_floors_arithmetic():
    t = get_target("jetson-orin-nano-8gb")
    plan = planner.plan_build(plan_for(BuildOptions(model="medgemma-4b-it", out=Path("x"), precision="int4",
                                                    target=t.name)))
    decoder = next(c for c in plan.components if c.name == "decoder")
    assert plan.decode_tokens_per_s == pytest.approx(t.bandwidth_gbs * 1e9 / (decoder.weight_bytes + plan.kv_bytes))
    flops = planner._vision_flops(MODELS["medgemma-4b-it"].config, "gemma3")
    assert flops == pytest.approx(5.5e12, rel=0.03)  # shared/FACTS.md: ~5.5 TFLOP per 896 px image
    assert plan.vision_ms == pytest.approx(flops / (t.peak_tflops["int8"] * 1e12) * 1e3)
    # int4 reads fewer bytes per token than int8 than fp16: the ceilings are ordered
    ceilings = [planner.plan_build(plan_for(BuildOptions(model="medgemma-4b-it", out=Path("x"), precision=p,
                                                         target=t.name))).decode_tokens_per_s
                for p in ("fp16", "int8", "int4")]
    assert ceilings == sorted(ceilings)


def test_recommends_int4_for_medgemma_on_orin_nano_and_refuses_what_cannot_fit():
    opts = BuildOptions(model="medgemma-4b-it", out=Path("x"), target="jetson-orin-nano-8gb", context=1024)
    best, plans = planner.recommend(resolve(opts.model), opts)
    assert planner.preset_of(best) == "int4"
    # int8 fits too (the tied lm_head's int8 rows are the token embeddings, stored once); int4 is the faster
    assert {planner.preset_of(p): p.fits for p in plans} == {"fp32": False, "fp16": False, "int8": True, "int4": True}
    with pytest.raises(MedcError, match="--precision int4 fits"):
        planner.check_fits(resolve("medgemma-4b-it"), BuildOptions(model="medgemma-4b-it", out=Path("x"),
                                                                   target="jetson-orin-nano-8gb", precision="fp16",
                                                                   context=1024))
    # the 27B does not fit an 8 GB Jetson in any form; the error says what would
    with pytest.raises(MedcError, match="no preset fits"):
        planner.check_fits(resolve("medgemma-27b-text-it"), BuildOptions(
            model="medgemma-27b-text-it", out=Path("x"), target="jetson-orin-nano-8gb", precision="int4"))


def _weight_bytes_on_disk(path: Path) -> int:
    """Initializer bytes as stored (packed int4 included), inline or in external data files."""
    model = onnx.load(str(path), load_external_data=False)
    total = 0
    for init in model.graph.initializer:
        ext = {e.key: e.value for e in init.external_data}
        if ext:
            total += int(ext["length"]) if "length" in ext else (path.parent / ext["location"]).stat().st_size
        else:
            total += len(init.raw_data) if init.raw_data else onnx.numpy_helper.to_array(init).nbytes
    return total


def check_plan_against_bundle(bundle: Path, model: str, rel: float = 0.02) -> dict[str, tuple[int, int]]:
    """The planner's weight bytes per component against the bundle's stored initializers (within `rel`).
    `model`: the registry name or checkpoint (directory or GGUF file) the bundle was built from."""
    m = Manifest.read(bundle)
    recipe = m.build["recipe"]
    config = resolve(str(model)).spec.config
    context = m.build["memory_plan"]["context"]  # the GroupQueryAttention decoder's rotary tables are sized by it
    plan = planner.plan_memory(m.model["name"], m.model["family"], config, recipe["precisions"],
                               get_target(m.target), context, 1, recipe.get("flavour"), recipe.get("options"))
    seen = {}
    for c in plan.components:
        entry = m.components[c.name]
        disk = _weight_bytes_on_disk(bundle / entry.file)
        seen[c.name] = (c.weight_bytes, disk)
        if entry.quantization.get("method") == "int8-dynamic":
            # the plan sizes the static per-channel form; dynamic int8 (the CPU's other candidate) keeps the patch
            # Conv float, a large share of a tiny model only (0.2% of MedSigLIP-448): between int8 and fp32 sizes
            assert c.weight_bytes * (1 - rel) <= disk < 4 * c.params, (c.name, c.weight_bytes, disk)
        else:
            assert disk == pytest.approx(c.weight_bytes, rel=rel), (c.name, c.weight_bytes, disk)
    return seen


def test_weights_match_the_tiny_bundles_on_disk(gemma_fp32, gemma_int8, bundle_fp32, bundle_int8):
    for bundle in (gemma_fp32, gemma_int8):
        check_plan_against_bundle(bundle, "medgemma-tiny")
    for bundle in (bundle_fp32, bundle_int8):
        check_plan_against_bundle(bundle, "medsiglip-tiny")


def test_kv_matches_the_runtime(gemma_fp32, gemma_portable):
    """The runtime's KV buffers are the bytes the planner says: the ORT flavour's slots (sized for the context), and
    the explicit decoder's present tensors after a prompt longer than the sliding window."""
    import medc.runtime

    cfg = MODELS["medgemma-tiny"].config
    ids = [2] + [20 + i % 50 for i in range(39)]
    with medc.runtime.load(gemma_fp32) as model:
        assert model.attention == "gqa"
        dec = model.decoder(2)
        prefill(model, dec, 1, ids)
        context = model.gen["kv_cache"]["context"]
        assert sum(b.nbytes for b in dec.cache.buffers.values()) == planner._kv(cfg, context, 2, 4, FORMS["gqa"])[0]
    with medc.runtime.load(gemma_portable) as model:
        dec = model.decoder(1)
        prefill(model, dec, 0, ids)
        runtime_bytes = sum(v.nbytes for v in dec.cache(0).values())
    s = len(ids)
    assert s > cfg["text_config"]["sliding_window"]
    assert planner._kv(cfg, s, 1, 4, FORMS["explicit"])[0] == runtime_bytes


def test_cli_plan_exit_status_and_json():
    runner = CliRunner()
    ok = runner.invoke(main, ["plan", "medsiglip-448", "--target", "jetson-orin-nano-8gb"])
    assert ok.exit_code == 0, ok.output
    assert "fits" in ok.output and "recommended: --precision int8" in ok.output
    no = runner.invoke(main, ["plan", "medgemma-27b-text-it", "--target", "t4", "--precision", "fp16"])
    assert no.exit_code == 1 and "DOES NOT FIT" in no.output
    js = runner.invoke(main, ["plan", "medgemma-4b-it", "--target", "h100", "--json", "--context", "32768"])
    data = json.loads(js.output)
    assert data["plan"]["context"] == 32768 and data["plan"]["fits"] and set(data["presets"]) >= {"fp16", "int8"}


def test_build_refuses_what_does_not_fit_before_loading(tmp_path):
    runner = CliRunner()
    r = runner.invoke(main, ["build", "medgemma-4b-it", "--random-weights", "--target", "jetson-orin-nano-8gb",
                             "--precision", "fp16", "-o", str(tmp_path / "b")])
    assert r.exit_code != 0 and "jetson-orin-nano-8gb has 6.2 GiB usable" in r.output and "int4" in r.output
    assert not (tmp_path / "b").exists()
    dry = runner.invoke(main, ["build", "medgemma-4b-it", "--random-weights", "--target", "jetson-agx-orin-32gb",
                               "--dry-run", "-o", str(tmp_path / "c")])
    assert dry.exit_code == 0 and "fits" in dry.output and "decode ceiling" in dry.output


def test_cli_targets_lists_every_profile():
    r = CliRunner().invoke(main, ["targets"])
    assert r.exit_code == 0 and all(name in r.output for name in TARGETS)


def test_cpu_floors_from_a_host_probe():
    """The cpu profile has no peaks (any CPU); `medc plan --probe` measures this host's and the plan gets a vision
    floor per precision (bf16 at the bf16 GEMM peak) and a decode ceiling, by the same arithmetic as datasheet peaks."""
    cpu = get_target("cpu")
    host = planner.with_host_peaks(cpu, {"fp32": 300e9, "int8": 1200e9, "bf16": 600e9}, 25e9)
    plan = plan_for(BuildOptions(model="medgemma-4b-it", out=Path("x"), precision="int8"))
    assert planner.plan_build(plan).vision_ms is None and planner.plan_build(plan).decode_tokens_per_s is None
    mem = planner.plan_build(plan, target=host)
    flops = planner._vision_flops(MODELS["medgemma-4b-it"].config, "gemma3")
    assert mem.vision_ms == pytest.approx(flops / 1200e9 * 1e3)
    double = planner.with_host_peaks(cpu, {"fp32": 300e9}, 50e9)  # the ceiling is bandwidth over bytes per token
    assert planner.plan_build(plan, target=double).decode_tokens_per_s == pytest.approx(2 * mem.decode_tokens_per_s)
    bf16 = planner.plan_build(plan_for(BuildOptions(model="medgemma-4b-it", out=Path("x"), precision="bf16")),
                              target=host)
    assert bf16.vision_ms == pytest.approx(flops / 600e9 * 1e3)
    with pytest.raises(MedcError, match="a host probe is for CPU targets"):
        planner.with_host_peaks(get_target("h100"), {"fp32": 1e12}, None)

    res = CliRunner().invoke(main, ["plan", "medsiglip-tiny", "--probe"])
    assert res.exit_code == 0, res.output
    assert "vision floor" in res.output and "floors from this host's probe: fp32" in res.output
    res = CliRunner().invoke(main, ["plan", "medsiglip-tiny", "--probe", "--target", "h100"])
    assert res.exit_code != 0 and "peaks come from its datasheet" in res.output
