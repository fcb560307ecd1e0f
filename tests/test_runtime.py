"""The torch-free runtime: preprocessing and tokenizer parity with HF, zero-shot parity with SiglipModel."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

import medc.runtime
from medc.runtime.preprocess import ImagePreprocessing
from medc.runtime.tokenizer import SiglipTokenizer

TEXTS = ["A chest X-ray showing Pneumothorax!", "no   acute   findings.", "Cardiomegaly; pleural effusion (left)",
         "", "ÉDEMA pulmonar", "x" * 300, "▁marker  and\ttabs", "ß 肺 🧪?"]


def _hf_processor(config: dict):
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    return SiglipImageProcessorPil(**{k: v for k, v in config.items() if not k.endswith("_type") and k != "processor_class"})


@pytest.mark.parametrize("size", [224, 448])
def test_preprocessing_matches_hf(tiny, real_images, size):
    cfg = {**tiny.preprocessor_config, "size": {"height": size, "width": size}}
    ours = ImagePreprocessing.from_hf_config(cfg)
    hf = _hf_processor(cfg)
    grey = Image.open(real_images[0]).convert("L")
    rgba = Image.open(real_images[1]).convert("RGBA")
    for image in [Image.open(p) for p in real_images] + [grey, rgba]:
        expected = hf(images=image, return_tensors="np")["pixel_values"][0]
        got = ours([image])[0]
        assert got.shape == (3, size, size)
        assert np.abs(got - expected).max() <= 1e-6


def test_pad_to_square_and_16_bit(tiny):
    pre = ImagePreprocessing.from_hf_config(tiny.preprocessor_config, pad_to_square=True)
    wide = np.full((50, 100, 3), 255, np.uint8)
    x = pre([wide])[0]
    assert x[:, 0, :].max() == pytest.approx(-1.0) and x[:, x.shape[1] // 2, :].min() == pytest.approx(1.0)
    deep = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)  # a 16-bit radiograph-like ramp
    y = ImagePreprocessing.from_hf_config(tiny.preprocessor_config)([deep])[0]
    assert y.min() == pytest.approx(-1, abs=0.02) and y.max() == pytest.approx(1, abs=0.02)
    assert len(np.unique(y[0])) > 256  # not squashed to 8 bits


def test_tokenizer_matches_hf(tiny):
    from transformers import SiglipTokenizer as HFSiglipTokenizer

    hf = HFSiglipTokenizer(str(tiny.tokenizer_file))
    ours = SiglipTokenizer(tiny.tokenizer_file, max_length=64)
    expected = hf(TEXTS, padding="max_length", max_length=64, truncation=True, return_tensors="np")["input_ids"]
    np.testing.assert_array_equal(ours(TEXTS), expected)


def test_zero_shot_matches_siglip_model(bundle_fp32, tiny, real_images):
    """Runtime zero-shot == sigmoid(SiglipModel(...).logits_per_image), images and labels through the same inputs."""
    labels = ["pneumothorax", "normal chest x-ray", "diabetic retinopathy"]
    with medc.runtime.load(bundle_fp32) as model:
        probs = model.zero_shot(real_images, labels)
        pixel_values = model.preprocess(real_images)
        input_ids = model.tokenizer(labels)
    with torch.no_grad():
        out = tiny.hf_model(input_ids=torch.from_numpy(input_ids), pixel_values=torch.from_numpy(pixel_values))
    expected = torch.sigmoid(out.logits_per_image).numpy()
    assert probs.shape == (3, 3)
    assert np.abs(probs - expected).max() < 1e-5
    assert np.ptp(probs) > 1e-3  # scores differ between images/labels: not a constant


def test_embeddings_match(bundle_int8, tiny, real_images):
    with medc.runtime.load(bundle_int8) as model:
        img = model.embed_images(real_images)
        txt = model.embed_texts(["pleural effusion", "normal"])
        ids = model.tokenizer(["pleural effusion", "normal"])
        px = model.preprocess(real_images)
    with torch.no_grad():
        ref_img = tiny.hf_model.get_image_features(pixel_values=torch.from_numpy(px)).pooler_output
        ref_txt = tiny.hf_model.get_text_features(input_ids=torch.from_numpy(ids)).pooler_output
    ref_img = torch.nn.functional.normalize(ref_img, dim=-1).numpy()
    ref_txt = torch.nn.functional.normalize(ref_txt, dim=-1).numpy()
    assert np.allclose(np.linalg.norm(img, axis=1), 1, atol=1e-4)
    assert ((img * ref_img).sum(1) >= 0.99).all() and ((txt * ref_txt).sum(1) >= 0.99).all()


def test_runtime_runs_without_torch(bundle_fp32, real_images):
    """A Jetson or scanner PC has no torch/transformers: importing either must not be needed."""
    code = textwrap.dedent(f"""
        import sys, builtins
        real_import = builtins.__import__
        def guarded(name, *a, **k):
            if name.split(".")[0] in ("torch", "transformers", "onnxscript"):
                raise ImportError("blocked " + name)
            return real_import(name, *a, **k)
        builtins.__import__ = guarded
        import medc.runtime
        from medc.runtime.verify import verify_bundle
        with medc.runtime.load({str(bundle_fp32)!r}) as m:
            p = m.zero_shot([{str(real_images[0])!r}], ["normal", "retinopathy"])
        report = verify_bundle({str(bundle_fp32)!r})
        assert all(r["passed"] for r in report.values())
        assert "torch" not in sys.modules and "transformers" not in sys.modules
        print("ok", p.shape)
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "ok (1, 2)" in res.stdout


def test_session_is_context_manager(bundle_fp32):
    from medc.runtime.session import OrtSession

    with OrtSession(bundle_fp32 / "text_encoder.onnx") as s:
        assert s._sess is not None
    assert s._sess is None


def test_sessions_satisfy_the_protocol():
    """OrtSession and TrtSession both have every member of the Session protocol, with its parameters: a pipeline
    runs a component without knowing which one it has."""
    import inspect

    from medc.runtime.session import OrtSession, Session
    from medc.runtime.trt_session import TrtSession

    members = {n: v for n, v in vars(Session).items()
               if (callable(v) or isinstance(v, property)) and (not n.startswith("_") or n in ("__enter__", "__exit__"))}
    assert {"open", "close", "run", "active_providers", "input_names", "__enter__", "__exit__"} <= set(members)
    for cls in (OrtSession, TrtSession):
        for name, proto in members.items():
            ours = inspect.getattr_static(cls, name, None)
            assert ours is not None, f"{cls.__name__} lacks {name}"
            if isinstance(proto, property):
                assert isinstance(ours, property), f"{cls.__name__}.{name} is not a property"
            else:
                assert list(inspect.signature(ours).parameters) == list(inspect.signature(proto).parameters), name
