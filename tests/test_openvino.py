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

import medc.runtime
from medc.compile.build import BuildOptions, build
from medc.errors import MedcError
from medc.manifest import Manifest
from medc.runtime.bundle import open_bundle
from medc.runtime.verify import verify_bundle

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("openvino") is None or importlib.util.find_spec("nncf") is None,
    reason="OpenVINO and NNCF are not installed (pip install 'medc[openvino]')")


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


def test_bf16_inference_where_the_cpu_has_it(ov_fp32):
    from medc.runtime.ov_session import OvSession, cpu_has_bf16
    from medc.runtime.verify import golden_cases

    if not cpu_has_bf16():
        pytest.skip("this CPU has no AVX512_BF16 or AMX")
    with np.load(ov_fp32 / "golden.npz") as g:
        case = next(iter(golden_cases({k: g[k] for k in g.files}, "image_encoder").values()))
    with OvSession(ov_fp32 / "image_encoder.xml", inference_precision="bf16") as s:
        assert s.active_providers == ["OpenVINO CPU (bf16)"]
        out = s.run(case["in"])["image_embeds"]
    ref = case["ref"]["image_embeds"]
    cos = (out * ref).sum(-1) / np.linalg.norm(out, axis=-1) / np.linalg.norm(ref, axis=-1)
    assert cos.min() > 0.999


def test_backend_errors_are_clear(tmp_path):
    with pytest.raises(MedcError, match="--backend openvino is for CPU targets"):
        build(BuildOptions(model="medsiglip-tiny", out=tmp_path / "x", target="h100", backend="openvino"))
    with pytest.raises(MedcError, match="unknown backend"):
        build(BuildOptions(model="medsiglip-tiny", out=tmp_path / "y", backend="tensorflow"))


def test_medgemma_vision_encoder_on_openvino(gemma_fp32, tmp_path):
    """MedGemma's vision encoder as OpenVINO IR beside the ONNX Runtime decoder: the same greedy tokens for an image
    prompt as the all-ONNX Runtime bundle (decoders stay on ONNX Runtime; their OpenVINO form is measured separately)."""
    from PIL import Image

    out = tmp_path / "mg-ov"
    build(BuildOptions(model="medgemma-tiny", out=out, backend="openvino"))
    m = Manifest.read(out)
    assert {n: c.backend for n, c in m.components.items()} == {
        "vision_encoder": "openvino", "embed_tokens": "onnxruntime", "decoder": "onnxruntime"}
    image = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype("uint8"))
    tokens = {}
    for b in (out, gemma_fp32):
        with medc.runtime.load(b) as p:
            tokens[b] = p.generate_ids(["Describe the image."], images=[image], max_new_tokens=12, ignore_eos=True)
    assert tokens[out] == tokens[gemma_fp32]
