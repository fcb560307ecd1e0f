"""`medc export triton`: the repository of the tiny bundles checked with Triton's own config schema, broken configs
refused by name, every ONNX model run with inputs built from its config against the bundle's own outputs, and the
Python-backend models' `execute` run against the bundles (tests/pb_utils_standin.py stands in for Triton's data
types; no Triton server here)."""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="needs the triton extra: pip install 'medc[triton]'")

from google.protobuf import json_format, text_format  # noqa: E402
from tritonclient.grpc import model_config_pb2 as mc  # noqa: E402

import pb_utils_standin as pb  # noqa: E402
from medc.compile.triton import (TritonOptions, check_repository, component_config, export_repository,  # noqa: E402
                                 first_release)
from medc.errors import MedcError  # noqa: E402
from medc.manifest import Manifest, sha256_file  # noqa: E402
from medc.runtime import load  # noqa: E402


@pytest.fixture(scope="module")
def repo(tmp_path_factory, bundle_fp32, gemma_fp32) -> Path:
    out = tmp_path_factory.mktemp("triton") / "repo"
    export_repository([str(bundle_fp32), str(gemma_fp32)], out, TritonOptions(max_batch=8))
    return out


def config(path: Path) -> mc.ModelConfig:
    return text_format.Parse(path.read_text(), mc.ModelConfig())


def test_repository_layout_and_check(repo, bundle_fp32):
    index = json.loads((repo / "medc-repository.json").read_text())
    names = {m["name"]: m for m in index["models"]}
    assert set(names) == {"medsiglip-tiny.image_encoder", "medsiglip-tiny.text_encoder", "medsiglip-tiny",
                          "medgemma-tiny.vision_encoder", "medgemma-tiny"}
    assert index["kind"] == "cpu" and names["medsiglip-tiny"]["platform"] == "python"
    # opset 20 and the Attention contrib op: ONNX Runtime 1.17, first in Triton 24.03
    assert names["medsiglip-tiny.image_encoder"]["min_onnxruntime"] == "1.17" and first_release("1.17") == "24.03"
    assert first_release("1.32") is None  # medc's CPU decoder form: no Triton yet, hence the Python backend

    cfg = config(repo / "medsiglip-tiny.image_encoder" / "config.pbtxt")
    assert cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 8
    assert [(t.name, mc.DataType.Name(t.data_type), list(t.dims)) for t in cfg.input] == [
        ("pixel_values", "TYPE_FP32", [3, 224, 224])]
    assert [(t.name, list(t.dims)) for t in cfg.output] == [("image_embeds", [64])]
    assert list(cfg.dynamic_batching.preferred_batch_size) == [4, 8]
    assert cfg.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
    assert (repo / "medsiglip-tiny.image_encoder" / "manifest.json").read_bytes() == \
        (bundle_fp32 / "manifest.json").read_bytes()

    gemma = config(repo / "medgemma-tiny" / "config.pbtxt")
    assert gemma.backend == "python" and gemma.model_transaction_policy.decoupled
    assert {t.name for t in gemma.input} >= {"text_input", "image", "max_tokens", "stream"}
    assert "GemmaModel as TritonPythonModel" in (repo / "medgemma-tiny" / "1" / "model.py").read_text()
    assert (repo / "Dockerfile").read_text().splitlines()[3].startswith("FROM nvcr.io/nvidia/tritonserver:26.08-py3")
    assert check_repository(repo) == []


def _broken(repo: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "repo"
    shutil.copytree(repo, copy)
    return copy


@pytest.mark.parametrize("edit, message", [
    (lambda r: _sub(r / "medsiglip-tiny.image_encoder/config.pbtxt", "data_type: TYPE_FP32", "data_type: TYPE_INT64"),
     "medsiglip-tiny.image_encoder: input 'pixel_values' has data_type TYPE_INT64, but the ONNX graph "
     "image_encoder.onnx says TYPE_FP32."),
    (lambda r: _sub(r / "medsiglip-tiny.image_encoder/config.pbtxt", "dims: 224\n  dims: 224", "dims: 448\n  dims: 448"),
     "medsiglip-tiny.image_encoder: input 'pixel_values' has dims [3, 448, 448], but the ONNX graph "
     "image_encoder.onnx has [3, 224, 224] after the batch axis."),
    (lambda r: _sub(r / "medsiglip-tiny.text_encoder/config.pbtxt", 'name: "text_embeds"', 'name: "embeds"'),
     "medsiglip-tiny.text_encoder: output 'embeds' is not in the ONNX graph text_encoder.onnx"),
    (lambda r: (r / "medsiglip-tiny.text_encoder/1/text_encoder.onnx").unlink(),
     "medsiglip-tiny.text_encoder: the model file medsiglip-tiny.text_encoder/1/text_encoder.onnx is missing"),
    (lambda r: _sub(r / "medgemma-tiny/config.pbtxt", "decoupled: true", "decoupled: false"),
     "medgemma-tiny: GemmaModel streams its answers: model_transaction_policy { decoupled: true } is required."),
    (lambda r: _sub(r / "medgemma-tiny/config.pbtxt", 'name: "text_input"', 'name: "prompt"'),
     "medgemma-tiny: input 'text_input', which GemmaModel requires, is missing from the config."),
    (lambda r: _sub(r / "medsiglip-tiny/config.pbtxt", "backend:", "bakend:"),
     "medsiglip-tiny: config.pbtxt does not parse with Triton's schema"),
    (lambda r: _sub(r / "medsiglip-tiny.image_encoder/config.pbtxt", "max_batch_size: 8", "max_batch_size: 2"),
     "medsiglip-tiny.image_encoder: a preferred_batch_size is over max_batch_size 2."),
])
def test_check_rejects_broken_configs(repo, tmp_path, edit, message):
    broken = _broken(repo, tmp_path)
    edit(broken)
    problems = check_repository(broken)
    assert any(p.startswith(message) for p in problems), problems


def _sub(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, (old, text)
    path.write_text(text.replace(old, new, 1))


def test_check_catches_a_changed_model_file_and_a_changed_bundle(repo, tmp_path):
    broken = _broken(repo, tmp_path)
    onnx_file = broken / "medsiglip-tiny.image_encoder/1/image_encoder.onnx"
    data = bytearray(onnx_file.read_bytes())
    data[-1] ^= 1
    onnx_file.unlink()  # a hard link to the bundle's file: replace it, never write through it
    onnx_file.write_bytes(bytes(data))
    spm = broken / "medsiglip-tiny/1/bundle/tokenizer/spiece.model"
    raw = spm.read_bytes()
    spm.unlink()
    spm.write_bytes(raw + b"\0")
    problems = check_repository(broken)
    assert any(p.startswith("medsiglip-tiny.image_encoder: image_encoder.onnx differs from the bundle's") for p in problems)
    assert any(p.startswith("medsiglip-tiny: its bundle does not verify") for p in problems), problems


def test_cli_check_exit_status(repo, tmp_path):
    from click.testing import CliRunner

    from medc.cli import main

    ok = CliRunner().invoke(main, ["export", "triton", "--check", str(repo)])
    assert ok.exit_code == 0, ok.output
    broken = _broken(repo, tmp_path)
    _sub(broken / "medgemma-tiny.vision_encoder/config.pbtxt", "data_type: TYPE_FP32", "data_type: TYPE_FP16")
    bad = CliRunner().invoke(main, ["export", "triton", "--check", str(broken)])
    assert bad.exit_code == 1
    assert "error: medgemma-tiny.vision_encoder: input 'pixel_values' has data_type TYPE_FP16" in bad.output
    again = CliRunner().invoke(main, ["export", "triton", str(repo), "-o", str(repo)])
    assert again.exit_code != 0 and "exists; pass --force" in again.output


def test_refuses_what_it_cannot_export(bundle_fp32, tmp_path):
    with pytest.raises(MedcError, match="release '22.01' is not one medc knows"):
        export_repository([str(bundle_fp32)], tmp_path / "r", TritonOptions(release="22.01"))
    with pytest.raises(MedcError, match="same name; name them apart with ID=PATH"):
        export_repository([str(bundle_fp32), str(bundle_fp32)], tmp_path / "r")
    assert not (tmp_path / "r").exists() and not list(tmp_path.glob(".r.tmp*"))  # nothing half-written
    models = export_repository([f"a={bundle_fp32}", f"b={bundle_fp32}"], tmp_path / "r")
    assert {m.name for m in models} >= {"a", "b.image_encoder"}


def test_onnx_models_give_the_bundles_outputs(repo, bundle_fp32, gemma_fp32):
    """Inputs built from each config's declared shapes and types, run by ONNX Runtime from the repository's file,
    against the bundle's own session on the same inputs."""
    import onnxruntime as ort

    bundles = {"medsiglip-tiny": bundle_fp32, "medgemma-tiny": gemma_fp32}
    rng = np.random.default_rng(0)
    ran = 0
    for cfg_path in sorted(repo.glob("*.*/config.pbtxt")):
        cfg = config(cfg_path)
        model_id, _, component = cfg.name.rpartition(".")
        feeds = {}
        for t in cfg.input:
            shape = [3] + [d if d > 0 else 5 for d in t.dims]
            if t.data_type == mc.TYPE_FP32:
                feeds[t.name] = rng.standard_normal(shape).astype(np.float32)
            else:
                feeds[t.name] = rng.integers(0, 100, shape).astype(np.int64)
        sess = ort.InferenceSession(str(cfg_path.parent / "1" / cfg.default_model_filename),
                                    providers=["CPUExecutionProvider"])
        got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
        with load(bundles[model_id]) as pipe:
            want = pipe._sessions[component].run(feeds)
        for t in cfg.output:
            assert got[t.name].shape == (3, *t.dims)
            np.testing.assert_allclose(got[t.name], want[t.name], rtol=0, atol=1e-6)
        ran += 1
    assert ran == 3


# -- the Python-backend models, run without Triton ------------------------------------------------------------------
@pytest.fixture
def standin(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb)
    return pb


def _model(repo: Path, name: str, cls):
    cfg = config(repo / name / "config.pbtxt")
    model = cls()
    model.initialize({"model_config": json_format.MessageToJson(cfg), "model_repository": str(repo / name),
                      "model_version": "1", "model_instance_kind": "CPU", "model_instance_device_id": "0",
                      "model_name": name})
    return model


def _bytes(*items) -> np.ndarray:
    return np.array([x if isinstance(x, bytes) else x.encode() for x in items], dtype=object)


def test_siglip_python_model(repo, bundle_fp32, real_images, standin, tmp_path):
    from pydicom.data import get_testdata_file

    from medc.runtime.triton import SiglipModel

    png = real_images[0]
    dcm = Path(get_testdata_file("CT_small.dcm"))
    texts = ["a chest radiograph", "a retinal fundus photograph"]
    model = _model(repo, "medsiglip-tiny", SiglipModel)
    try:
        requests = [
            pb.InferenceRequest([pb.Tensor("image", _bytes(png.read_bytes(), dcm.read_bytes())),
                                 pb.Tensor("text", _bytes(*texts))]),
            pb.InferenceRequest([pb.Tensor("image", _bytes(b"\x89PNG\r\n\x1a\n broken"))]),
            pb.InferenceRequest([pb.Tensor("text", _bytes(texts[1]))]),
            pb.InferenceRequest([]),
        ]
        both, broken, text_only, empty = model.execute(requests)
    finally:
        model.finalize()
    with load(bundle_fp32) as pipe:
        want_images = pipe.embed_images([png, dcm])
        want_texts = pipe.embed_texts(texts)
        want_scores = pipe.zero_shot([png, dcm], texts)
    out = {t.name(): t.as_numpy() for t in both.output_tensors()}
    np.testing.assert_allclose(out["image_embeds"], want_images, atol=1e-5)
    np.testing.assert_allclose(out["text_embeds"], want_texts, atol=1e-5)
    np.testing.assert_allclose(out["scores"], want_scores, atol=1e-5)
    assert out["scores"].shape == (2, 2)
    assert broken.has_error() and "image[0] is not a readable PNG, JPEG or DICOM image" in broken.error().message()
    t = {t.name(): t.as_numpy() for t in text_only.output_tensors()}
    np.testing.assert_allclose(t["text_embeds"], want_texts[1:], atol=1e-5)
    assert t["image_embeds"].shape == (0, 64) and t["scores"].shape == (0, 1)
    assert empty.has_error() and "give `image`" in empty.error().message()


def _wait(*requests, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    for r in requests:
        assert r.get_response_sender().done.wait(max(0.0, deadline - time.monotonic())), "no final response"


def _texts(request) -> list[str]:
    return [pb.get_output_tensor_by_name(r, "text_output").as_numpy()[0].decode()
            for r in request.get_response_sender().responses]


def test_gemma_python_model_streams_the_runtimes_tokens(repo, gemma_fp32, real_images, standin):
    from medc.runtime.triton import GemmaModel

    question = "Is there a pneumothorax?"
    png = real_images[0]
    with load(gemma_fp32) as pipe:
        want = pipe.generate(question, max_new_tokens=12, ignore_eos=False)
        want_image = pipe.generate(question, images=[png], max_new_tokens=12)
    model = _model(repo, "medgemma-tiny", GemmaModel)
    try:
        plain = pb.InferenceRequest([pb.Tensor("text_input", _bytes(question)),
                                     pb.Tensor("max_tokens", np.array([12], np.int32))])
        streamed = pb.InferenceRequest([pb.Tensor("text_input", _bytes(question)),
                                        pb.Tensor("max_tokens", np.array([12], np.int32)),
                                        pb.Tensor("stream", np.array([True]))])
        with_image = pb.InferenceRequest([pb.Tensor("text_input", _bytes(question)),
                                          pb.Tensor("image", _bytes(png.read_bytes())),
                                          pb.Tensor("max_tokens", np.array([12], np.int32))])
        too_long = pb.InferenceRequest([pb.Tensor("text_input", _bytes(question)),
                                        pb.Tensor("max_tokens", np.array([4000], np.int32))])
        no_prompt = pb.InferenceRequest([pb.Tensor("max_tokens", np.array([3], np.int32))])
        assert model.execute([plain, streamed, with_image, too_long, no_prompt]) is None  # decoupled
        _wait(plain, streamed, with_image, too_long, no_prompt)
    finally:
        model.finalize()
    assert _texts(plain) == [want]
    pieces = _texts(streamed)
    assert len(pieces) > 1 and "".join(pieces) == want
    assert streamed.get_response_sender().flags[-1] == pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL
    assert _texts(with_image) == [want_image]
    for r, message in ((too_long, "exceed this build's context"), (no_prompt, "text_input is required")):
        (response,) = r.get_response_sender().responses
        assert response.has_error() and message in response.error().message()


def test_configs_for_gpu_targets(bundle_fp32, tmp_path):
    """On a TensorRT target, an ONNX model gets ONNX Runtime's TensorRT accelerator at the gated precision; with an
    engine built on the device, the model is the engine (tensorrt_plan), checked against the graph it came from
    and the engine's recorded sha256."""
    m = Manifest.read(bundle_fp32)
    m = dataclasses.replace(m, target="jetson-orin-nano-8gb")
    m.components["image_encoder"] = dataclasses.replace(m.components["image_encoder"], precision="int8")
    cfg = component_config("x.image_encoder", m, "image_encoder", TritonOptions(), "gpu")
    (acc,) = cfg.optimization.execution_accelerators.gpu_execution_accelerator
    assert acc.name == "tensorrt" and acc.parameters["precision_mode"] == "INT8"
    assert cfg.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
    cuda = dataclasses.replace(m, target="cuda")  # gated on ONNX Runtime's CUDA provider: run it there as gated
    assert not component_config("x.image_encoder", cuda, "image_encoder", TritonOptions(), "gpu").HasField("optimization")

    plan = b"not a real engine: TensorRT is not installable here"
    m.tensorrt = {"engines": {"image_encoder": {"file": "tensorrt/image_encoder.plan", "sha256": ""}}}
    model_dir = tmp_path / "repo" / "x.image_encoder"
    (model_dir / "1").mkdir(parents=True)
    (model_dir / "1" / "image_encoder.plan").write_bytes(plan)
    m.tensorrt["engines"]["image_encoder"]["sha256"] = sha256_file(model_dir / "1" / "image_encoder.plan")
    m.write(model_dir)
    cfg = component_config("x.image_encoder", m, "image_encoder", TritonOptions(), "gpu")
    assert cfg.platform == "tensorrt_plan" and cfg.default_model_filename == "image_encoder.plan"
    (model_dir / "config.pbtxt").write_text(text_format.MessageToString(cfg))
    assert check_repository(tmp_path / "repo") == []
    cfg.input[0].dims[1] = 448
    (model_dir / "config.pbtxt").write_text(text_format.MessageToString(cfg))
    (model_dir / "1" / "image_encoder.plan").write_bytes(plan + b"!")
    problems = check_repository(tmp_path / "repo")
    assert any("input 'pixel_values' has dims [3, 448, 224], but the manifest's image_encoder has" in p for p in problems)
    assert any("image_encoder.plan differs from the engine the bundle recorded" in p for p in problems)


# -- a real Triton Inference Server -------------------------------------------------------------------------------
def test_real_triton_server_runs_the_python_models(bundle_fp32, gemma_fp32, real_images, tmp_path):
    """tritonserver itself (tests/tritonserver.py: PyTriton's build, Python backend only) loads the exported
    Python-backend models from their configs, with medc in an EXECUTION_ENV_PATH environment; tritonclient.http
    (binary tensors and JSON) and Triton's generate / generate_stream endpoints get the runtime's own answers."""
    import httpx

    import tritonserver

    if (why := tritonserver.missing()) is not None:
        pytest.skip(why)
    import tritonclient.http as http

    repo = tmp_path / "repo"
    export_repository([str(bundle_fp32), str(gemma_fp32)], repo,
                      TritonOptions(execution_env=str(tritonserver.ENV)))
    png = real_images[0]
    texts = ["a chest radiograph", "a retinal fundus photograph"]
    question = "Is there a pneumothorax?"
    with load(bundle_fp32) as pipe:
        want_images, want_texts = pipe.embed_images([png]), pipe.embed_texts(texts)
        want_scores = pipe.zero_shot([png], texts)
    with load(gemma_fp32) as pipe:
        want_answer = pipe.generate(question, max_new_tokens=10)
    with tritonserver.running(repo, ["medsiglip-tiny", "medgemma-tiny"], tmp_path / "triton.log") as url:
        client = http.InferenceServerClient(url)
        assert client.is_server_ready() and client.is_model_ready("medgemma-tiny")
        meta = client.get_model_metadata("medsiglip-tiny")
        assert {t["name"] for t in meta["inputs"]} == {"image", "text"}
        for binary in (True, False):
            image = http.InferInput("image", [1], "BYTES")
            image.set_data_from_numpy(_bytes(png.read_bytes()), binary_data=True)  # raw bytes need binary
            text = http.InferInput("text", [2], "BYTES")
            text.set_data_from_numpy(_bytes(*texts), binary_data=binary)
            outputs = [http.InferRequestedOutput(n, binary_data=binary) for n in ("image_embeds", "text_embeds", "scores")]
            result = client.infer("medsiglip-tiny", [image, text], outputs=outputs)
            np.testing.assert_allclose(result.as_numpy("image_embeds"), want_images, atol=1e-5)
            np.testing.assert_allclose(result.as_numpy("text_embeds"), want_texts, atol=1e-5)
            np.testing.assert_allclose(result.as_numpy("scores"), want_scores, atol=1e-5)
        bad = http.InferInput("image", [1], "BYTES")
        bad.set_data_from_numpy(_bytes(b"not an image"))
        with pytest.raises(Exception, match="image\\[0\\] is not a readable PNG, JPEG or DICOM image"):
            client.infer("medsiglip-tiny", [bad])

        body = {"text_input": question, "max_tokens": 10}
        whole = httpx.post(f"http://{url}/v2/models/medgemma-tiny/generate", json=body, timeout=120)
        assert whole.status_code == 200 and whole.json()["text_output"] == want_answer
        streamed = httpx.post(f"http://{url}/v2/models/medgemma-tiny/generate_stream",
                              json={**body, "stream": True}, timeout=120)
        events = [json.loads(line[5:]) for line in streamed.text.splitlines() if line.startswith("data:")]
        pieces = [e["text_output"] for e in events if "text_output" in e]
        assert len(pieces) > 1 and "".join(pieces) == want_answer
        too_long = httpx.post(f"http://{url}/v2/models/medgemma-tiny/generate",
                              json={**body, "max_tokens": 4000}, timeout=60)
        assert too_long.status_code == 400 and "exceed this build's context" in too_long.json()["error"]
