"""OpenVINO components for CPU targets (compile/openvino.py, runtime/ov_session.py): the same exported graphs as
OpenVINO IR, gated against PyTorch like the ONNX Runtime forms, chosen by measurement with --backend auto, run by the
torch-free runtime through the same session interface, and hash-checked like every other file."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import cosine_rows

import medc.runtime
from medc.compile.build import BuildOptions, build
from medc.errors import MedcError
from medc.manifest import Manifest
from medc.runtime.bundle import open_bundle
from medc.runtime.ov_session import cpu_has_bf16
from medc.runtime.verify import verify_bundle

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("openvino") is None or importlib.util.find_spec("nncf") is None,
    reason="OpenVINO and NNCF are not installed (pip install 'medc[openvino]')")
needs_bf16 = pytest.mark.skipif(importlib.util.find_spec("openvino") is None or not cpu_has_bf16(),
                                reason="this CPU has no AVX512_BF16 or AMX: bf16 cannot be gated here")


@pytest.fixture(scope="module")
def ov_fp32(tmp_path_factory):
    out = tmp_path_factory.mktemp("ov") / "fp32"
    build(BuildOptions(model="medsiglip-tiny", out=out, backend="openvino"))
    return out


def test_openvino_fp32_is_the_ort_bundle(ov_fp32, bundle_fp32, real_images):
    """IR files in place of ONNX, gated at fp32's tolerance, and the same embeddings as the ONNX Runtime bundle."""
    m = Manifest.read(ov_fp32)
    for name, comp in m.components.items():
        assert comp.backend == "openvino" and comp.file == f"{name}.xml" and (ov_fp32 / f"{name}.bin").is_file()
        assert comp.quantization["method"] == "ov-fp32" and comp.quantization["inference_precision"] == "f32"
        assert comp.fidelity["passed"] and comp.fidelity["worst"]["cosine"] > 0.99999
    assert "backend" not in json.loads((bundle_fp32 / "manifest.json").read_text())["components"]["image_encoder"]
    assert all(r["passed"] for r in verify_bundle(ov_fp32).values())
    with medc.runtime.load(ov_fp32) as ov, medc.runtime.load(bundle_fp32) as ort:
        assert ov.active_providers("image_encoder") == ["OpenVINO CPU (f32)"]
        a, b = ov.embed_images(real_images[:2]), ort.embed_images(real_images[:2])
        t, u = ov.embed_texts(["pleural effusion", "normal chest"]), ort.embed_texts(["pleural effusion", "normal chest"])
    assert np.abs(a - b).max() < 1e-5 and np.abs(t - u).max() < 1e-5


def test_auto_times_both_runtimes_and_keeps_the_fastest_passing(tmp_path):
    out = tmp_path / "auto"
    build(BuildOptions(model="medsiglip-tiny", out=out, precision="int8", backend="auto"))
    for name, comp in Manifest.read(out).components.items():
        q = comp.quantization
        cands = q["candidates"]
        assert set(cands) == {"int8-static-qdq", "int8-dynamic", "ov-int8", "ov-int8-sq"} and q["selected_by"]
        assert all(c["seconds_batch2"] > 0 for c in cands.values())
        passing = {k: c for k, c in cands.items() if c["passed"]}
        fastest = min(passing, key=lambda k: passing[k]["seconds_batch2"])
        assert q["method"] == fastest and comp.backend == ("openvino" if fastest.startswith("ov-") else "onnxruntime")
        assert any(cands[m]["passed"] for m in ("ov-int8", "ov-int8-sq"))  # random inputs in the calibration


def test_tampered_ir_weights_are_refused(ov_fp32, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(ov_fp32, bad)
    data = bytearray((bad / "image_encoder.bin").read_bytes())
    data[len(data) // 2] ^= 0x01
    (bad / "image_encoder.bin").write_bytes(bytes(data))
    with pytest.raises(MedcError, match="image_encoder.bin"):
        open_bundle(bad)


def test_openvino_bundle_runs_without_torch(ov_fp32, real_images):
    code = textwrap.dedent(f"""
        import sys, builtins
        real_import = builtins.__import__
        def guarded(name, *a, **k):
            if name.split(".")[0] in ("torch", "transformers", "onnxscript", "nncf"):
                raise ImportError("blocked " + name)
            return real_import(name, *a, **k)
        builtins.__import__ = guarded
        import medc.runtime
        from medc.runtime.verify import verify_bundle
        with medc.runtime.load({str(ov_fp32)!r}) as m:
            p = m.zero_shot([{str(real_images[0])!r}], ["normal", "retinopathy"])
        assert all(r["passed"] for r in verify_bundle({str(ov_fp32)!r}).values())
        assert "torch" not in sys.modules
        print("ok", p.shape)
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "ok (1, 2)" in res.stdout


@pytest.fixture(scope="module")
def ov_bf16(tmp_path_factory):
    if not cpu_has_bf16():
        pytest.skip("this CPU has no AVX512_BF16 or AMX: bf16 cannot be gated here")
    out = tmp_path_factory.mktemp("ov") / "bf16"
    build(BuildOptions(model="medsiglip-tiny", out=out, precision="bf16"))
    return out


@needs_bf16
def test_bf16_preset_builds_openvino_encoders(ov_bf16, bundle_fp32, real_images):
    """--precision bf16 on the CPU target: OpenVINO IR without --backend, weights stored fp16, gated in bf16 against
    PyTorch fp32 at the bf16 bar, and close to the fp32 bundle on real images."""
    m = Manifest.read(ov_bf16)
    assert m.build["recipe"]["source"] == "preset:bf16"
    for name, comp in m.components.items():
        assert (comp.precision, comp.backend, comp.file) == ("bf16", "openvino", f"{name}.xml")
        q = comp.quantization
        assert (q["method"], q["inference_precision"], q["weights"]) == ("ov-bf16", "bf16", "fp16 (stored)")
        assert comp.fidelity["passed"] and 0.999 <= comp.fidelity["worst"]["cosine"] < 1.0  # bf16 is not f32
    # fp16 storage: the IR weights are half the fp32 bundle's
    assert (ov_bf16 / "image_encoder.bin").stat().st_size < 0.6 * (bundle_fp32 / "image_encoder.onnx").stat().st_size
    assert all(r["passed"] for r in verify_bundle(ov_bf16).values())
    with medc.runtime.load(ov_bf16) as ov, medc.runtime.load(bundle_fp32) as ref:
        assert ov.active_providers("image_encoder") == ["OpenVINO CPU (bf16)"]
        a, b = ov.embed_images(real_images[:3]), ref.embed_images(real_images[:3])
    assert cosine_rows(a, b).min() > 0.999


def test_a_bf16_bundle_falls_back_to_f32_on_a_cpu_without_bf16(ov_fp32, tmp_path, monkeypatch, caplog):
    """Built where bf16 runs, opened where it does not: a warning and f32 (what bf16 approximates), not a crash."""
    import shutil

    from medc.runtime import ov_session

    bundle = tmp_path / "b"
    shutil.copytree(ov_fp32, bundle)
    monkeypatch.setattr(ov_session, "cpu_has_bf16", lambda: False)  # this CPU's capability, as another CPU reports it
    s = ov_session.OvSession(bundle / "image_encoder.xml", inference_precision="bf16")
    with caplog.at_level("WARNING"), s:
        assert s.active_providers == ["OpenVINO CPU (f32)"]
    assert "built to run in bf16, which this CPU lacks" in caplog.text


def test_bf16_errors_are_clear(tmp_path, monkeypatch):
    from medc.compile import build as build_module

    with pytest.raises(MedcError, match="bf16 on a CPU target is built as OpenVINO IR"):
        build(BuildOptions(model="medsiglip-tiny", out=tmp_path / "x", precision="bf16", backend="ort"))
    monkeypatch.setattr(build_module, "cpu_has_bf16", lambda: False)
    with pytest.raises(MedcError, match="no AVX512_BF16 or AMX"):
        build(BuildOptions(model="medsiglip-tiny", out=tmp_path / "y", precision="bf16"))
    assert not (tmp_path / "y").exists()


def test_backend_errors_are_clear(tmp_path):
    with pytest.raises(MedcError, match="--backend openvino is for CPU targets"):
        build(BuildOptions(model="medsiglip-tiny", out=tmp_path / "x", target="h100", backend="openvino"))
    with pytest.raises(MedcError, match="unknown backend"):
        build(BuildOptions(model="medsiglip-tiny", out=tmp_path / "y", backend="tensorflow"))


@pytest.mark.parametrize("precision", ["fp32", "int8", "bf16"])
def test_medgemma_vision_encoder_on_openvino(precision, gemma_fp32, tmp_path):
    """MedGemma's vision encoder as OpenVINO IR beside the ONNX Runtime decoder (decoders stay on ONNX Runtime; their
    OpenVINO form is measured in benchmarks/results/openvino-gemma3-270m.md), gated against PyTorch like the ORT
    forms. fp32 gives the fp32 bundle's greedy tokens for an image prompt, bf16 (whose decoder steps down to fp32)
    its first 8: a random tiny model's logits are near ties, and bf16's 1e-5 cosine gap flips a late one. int8 vision
    features differ from the ORT int8 bundle's by design (another quantiser), so int8 is held to its gate and to
    generating the full length."""
    from PIL import Image

    if precision == "bf16" and not cpu_has_bf16():
        pytest.skip("this CPU has no AVX512_BF16 or AMX: bf16 cannot be gated here")
    out = tmp_path / f"mg-ov-{precision}"
    build(BuildOptions(model="medgemma-tiny", out=out, precision=precision, backend="openvino"))
    m = Manifest.read(out)
    assert {n: c.backend for n, c in m.components.items()} == {
        "vision_encoder": "openvino", "embed_tokens": "onnxruntime", "decoder": "onnxruntime"}
    vision = m.components["vision_encoder"]
    assert vision.precision == precision and vision.fidelity["passed"]
    assert vision.quantization["method"] in {"fp32": ("ov-fp32",), "int8": ("ov-int8", "ov-int8-sq"),
                                             "bf16": ("ov-bf16",)}[precision]
    assert m.components["decoder"].precision == ("int8" if precision == "int8" else "fp32")
    assert all(r["passed"] for r in verify_bundle(out).values())
    image = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype("uint8"))
    tokens = {}
    for b in (out, gemma_fp32):
        with medc.runtime.load(b) as p:
            tokens[b] = p.generate_ids(["Describe the image."], images=[image], max_new_tokens=12, ignore_eos=True)
    ours, ref = tokens.values()
    assert len(ours[0]) == 12
    same = {"fp32": 12, "bf16": 8, "int8": 0}[precision]
    assert ours[0][:same] == ref[0][:same]


def test_openvino_bundle_served_with_batching(ov_fp32, real_images):
    """`medc serve` on OpenVINO components: a request's images run as one batch, concurrent text requests share
    batches, and batch company does not change a vector."""
    import base64
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    pytest.importorskip("uvicorn", reason="medc serve needs the serve extra: pip install 'medc[serve]'")
    from test_serve import ThreadServer

    s = ThreadServer([ov_fp32], max_queue=32, max_concurrency=4, max_batch=8, max_images=4, max_image_mb=1.0,
                     max_body_mb=4.0)
    paths = real_images[:4]
    texts = [f"finding number {i}" for i in range(24)]
    try:
        model = s.state.by_id["medsiglip-tiny"]
        model.texts.limit = model.texts.max_batch  # what the startup measurement chose is tested in test_serve
        urls = [f"data:image/{'png' if p.suffix == '.png' else 'jpeg'};base64," + base64.b64encode(p.read_bytes()).decode()
                for p in paths]
        before = (model.images.batches, model.texts.batches)
        r = httpx.post(s.url + "/v1/embeddings", json={"images": urls}, timeout=60)
        assert r.status_code == 200, r.text
        images = np.array([d["embedding"] for d in r.json()["data"]], np.float32)
        with httpx.Client(timeout=60) as c, ThreadPoolExecutor(12) as pool:
            rs = list(pool.map(lambda t: c.post(s.url + "/v1/embeddings", json={"input": t}), texts))
        assert all(r.status_code == 200 for r in rs), rs[0].text
        got = np.array([r.json()["data"][0]["embedding"] for r in rs], np.float32)
        assert model.images.batches - before[0] < len(paths) and model.texts.batches - before[1] < len(texts)
    finally:
        s.stop()
    with medc.runtime.load(ov_fp32) as m:
        np.testing.assert_allclose(images, m.embed_images(paths), atol=1e-5)
        np.testing.assert_allclose(got, m.embed_texts(texts), atol=1e-5)
