"""The Open Inference Protocol (KServe V2) on `medc serve`: a real server on the tiny bundles, driven by tritonclient's
HTTP client (not medc code) with binary tensors (its default) and with JSON; answers equal the bundle's own outputs and
/v1/embeddings; errors come back as tritonclient exceptions that name the problem. The codec (runtime/kserve.py)
alone: the datatypes no served model takes (BOOL, BYTES), read back by tritonclient's own response parser."""

from __future__ import annotations

import base64
import json
import struct

import httpx
import numpy as np
import pytest

pytest.importorskip("uvicorn", reason="medc serve needs the serve extra: pip install 'medc[serve]'")
http = pytest.importorskip("tritonclient.http", reason="the V2 tests drive the server with tritonclient: "
                                                       "pip install 'medc[triton]'")

from test_serve import KEY, ThreadServer  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from medc.errors import MedcError  # noqa: E402
from medc.runtime import kserve  # noqa: E402
from medc.specs import TensorSpec  # noqa: E402

# tritonclient writes Inference-Header-Content-Length into the headers dict it is given: a fresh one per call.
AUTH = {"Authorization": f"Bearer {KEY}"}


def auth() -> dict:
    return dict(AUTH)
IMAGE, TEXT, VISION = "medsiglip-tiny.image_encoder", "medsiglip-tiny.text_encoder", "medgemma-tiny.vision_encoder"


@pytest.fixture(scope="module")
def server(bundle_fp32, gemma_fp32):
    s = ThreadServer([bundle_fp32, gemma_fp32], api_key=KEY, max_batch=8, max_inputs=16, max_body_mb=8.0)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    c = http.InferenceServerClient(server.url.removeprefix("http://"), concurrency=8)
    yield c
    c.close()


def _input(name: str, array: np.ndarray, datatype: str, binary: bool = True):
    tensor = http.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array, binary_data=binary)
    return tensor


def _refused(call, status: str, *fragments: str) -> str:
    with pytest.raises(InferenceServerException) as e:
        call()
    message = e.value.message()
    assert e.value.status() == status, (e.value.status(), message)
    assert all(f in message for f in fragments) and "Traceback" not in message, message
    return message


def test_health_and_metadata(server, client):
    # The probes need no key (Kubernetes sends none); everything else does.
    assert client.is_server_live() and client.is_server_ready()
    for path in ("/v2/health/live", "/v2/health/ready"):
        r = httpx.get(server.url + path)
        assert r.status_code == 200 and r.content == b""
    meta = client.get_server_metadata(headers=auth())
    assert meta["name"] == "medc" and meta["extensions"] == ["binary_tensor_data"] and meta["version"]
    assert client.get_model_metadata(IMAGE, headers=auth()) == {
        "name": IMAGE, "versions": ["1"], "platform": "onnxruntime_onnx",
        "inputs": [{"name": "pixel_values", "datatype": "FP32", "shape": [-1, 3, 224, 224]}],
        "outputs": [{"name": "image_embeds", "datatype": "FP32", "shape": [-1, 64]}]}
    text = client.get_model_metadata(TEXT, model_version="1", headers=auth())
    assert text["inputs"] == [{"name": "input_ids", "datatype": "INT64", "shape": [-1, 64]}]
    assert client.get_model_metadata(VISION, headers=auth())["outputs"] == [
        {"name": "image_features", "datatype": "FP32", "shape": [-1, 16, 64]}]
    assert client.is_model_ready(IMAGE, headers=auth()) and client.is_model_ready(TEXT, "1", headers=auth())
    assert not client.is_model_ready("medsiglip-tiny", headers=auth())  # a bundle is not a V2 model; its parts are
    assert not client.is_model_ready(IMAGE, "2", headers=auth())
    assert not client.is_model_ready("medgemma-tiny.decoder", headers=auth())  # only the encoders are served
    _refused(lambda: client.get_model_metadata("nope", headers=auth()), "404", "'nope' is not served", IMAGE, VISION)


def test_image_encoder_binary_and_json(server, client, pipelines, real_images):
    """tritonclient's defaults (binary tensors both ways), then JSON both ways, then mixed; the bundle's own outputs
    and the OpenAI route's embedding of the same PNG."""
    siglip, _ = pipelines
    pixels = siglip.preprocess([real_images[1], real_images[2]])  # two real PNGs, preprocessed by the bundle
    want = siglip.embed_pixel_values(pixels)

    got = client.infer(IMAGE, [_input("pixel_values", pixels, "FP32")], headers=auth())
    out = got.get_response()["outputs"][0]
    assert out["parameters"]["binary_data_size"] == want.nbytes and out["shape"] == [2, 64]
    np.testing.assert_allclose(got.as_numpy("image_embeds"), want, atol=1e-5)

    got = client.infer(IMAGE, [_input("pixel_values", pixels, "FP32", binary=False)], model_version="1",
                       outputs=[http.InferRequestedOutput("image_embeds", binary_data=False)], request_id="r-1",
                       headers=auth())
    body = got.get_response()
    assert body["id"] == "r-1" and body["model_name"] == IMAGE and body["model_version"] == "1"
    assert "parameters" not in body["outputs"][0] and len(body["outputs"][0]["data"]) == want.size
    np.testing.assert_allclose(got.as_numpy("image_embeds"), want, atol=1e-5)

    got = client.infer(IMAGE, [_input("pixel_values", pixels[:1], "FP32", binary=False)], headers=auth())
    np.testing.assert_allclose(got.as_numpy("image_embeds"), want[:1], atol=1e-5)  # JSON in, binary out

    # The same PNG through /v1/embeddings (decoded and preprocessed by the server) gives the same embedding.
    url = "data:image/png;base64," + base64.b64encode(real_images[1].read_bytes()).decode()
    r = httpx.post(server.url + "/v1/embeddings", json={"model": "medsiglip-tiny", "images": [url]}, headers=auth())
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(np.array(r.json()["data"][0]["embedding"], np.float32), want[0], atol=1e-5)


def test_text_encoder(server, client, pipelines):
    siglip, _ = pipelines
    texts = ["pleural effusion", "a normal chest radiograph", "pneumothorax on the left"]
    ids = siglip.tokenizer(texts)
    want = siglip.embed_texts(texts)
    got = client.infer(TEXT, [_input("input_ids", ids, "INT64")], headers=auth())
    np.testing.assert_allclose(got.as_numpy("text_embeds"), want, atol=1e-5)
    r = httpx.post(server.url + "/v1/embeddings", json={"model": "medsiglip-tiny", "input": texts}, headers=auth())
    np.testing.assert_allclose(np.array([d["embedding"] for d in r.json()["data"]], np.float32),
                               got.as_numpy("text_embeds"), atol=1e-5)

    # JSON data nested as the shape (Triton's clients send it flat; the protocol allows both), version route.
    r = httpx.post(server.url + f"/v2/models/{TEXT}/versions/1/infer", headers=auth(), json={
        "inputs": [{"name": "input_ids", "shape": list(ids.shape), "datatype": "INT64", "data": ids.tolist()}]})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json", r.text
    out = r.json()["outputs"][0]
    assert out["shape"] == [3, 64] and out["datatype"] == "FP32"
    np.testing.assert_allclose(np.array(out["data"], np.float32).reshape(3, 64), want, atol=1e-5)


def test_concurrent_requests_batch_and_each_gets_its_rows(server, client, pipelines):
    """Rows of concurrent requests run together (the micro-batcher) and each request gets exactly its own back."""
    siglip, _ = pipelines
    batcher = server.state.v2[TEXT].batcher
    calls, items = batcher.batches, batcher.items
    texts = [[f"finding number {i}"] * (1 + i % 3) for i in range(16)]

    # tritonclient.http is gevent's: concurrent requests are its async_infer (up to `concurrency` connections).
    pending = [client.async_infer(TEXT, [_input("input_ids", siglip.tokenizer(batch), "INT64")], headers=auth())
               for batch in texts]
    for batch, request in zip(texts, pending):
        got = request.get_result()
        np.testing.assert_allclose(got.as_numpy("text_embeds"), siglip.embed_texts(batch), atol=1e-5)
    assert batcher.items - items == sum(map(len, texts)) and batcher.batches - calls <= len(texts)
    metrics = httpx.get(server.url + "/metrics", headers=auth()).text
    assert 'medc_queue_depth{model="medsiglip-tiny",queue="v2:text_encoder"}' in metrics


def test_gemma_vision_encoder(client, pipelines):
    _, gemma = pipelines
    pixels = np.random.default_rng(3).standard_normal((2, 3, 64, 64)).astype(np.float32)
    got = client.infer(VISION, [_input("pixel_values", pixels, "FP32")], headers=auth())
    np.testing.assert_allclose(got.as_numpy("image_features"), gemma.encode_images(pixels), atol=1e-5)


def test_errors(server, client):
    px = np.zeros((1, 3, 224, 224), np.float32)
    _refused(lambda: client.infer(IMAGE, [_input("pixel_values", px.astype(np.float64), "FP64")], headers=auth()),
             "400", "input pixel_values is FP32, not FP64", "send FP32")
    _refused(lambda: client.infer(IMAGE, [_input("pixel_values", np.zeros((1, 3, 64, 64), np.float32), "FP32")],
                                  headers=auth()), "400", "shape [1, 3, 64, 64]", "[-1, 3, 224, 224]")
    _refused(lambda: client.infer("medsiglip-448.image_encoder", [_input("pixel_values", px, "FP32")], headers=auth()),
             "404", "'medsiglip-448.image_encoder' is not served here", IMAGE)
    _refused(lambda: client.infer(IMAGE, [], headers=auth()), "400", "needs input pixel_values", "gave none")
    _refused(lambda: client.infer(IMAGE, [_input("input_ids", np.zeros((1, 64), np.int64), "INT64")], headers=auth()),
             "400", "has no input 'input_ids'", "pixel_values (FP32 [-1, 3, 224, 224])")
    _refused(lambda: client.infer(IMAGE, [_input("pixel_values", px, "FP32")], headers=auth(),
                                  outputs=[http.InferRequestedOutput("embeds")]),
             "400", "has no output 'embeds'", "image_embeds")
    # A binary size that does not match the shape: the data of one image declared as two.
    tensor = _input("pixel_values", px, "FP32")
    tensor.set_shape([2, 3, 224, 224])
    _refused(lambda: client.infer(IMAGE, [tensor], headers=auth()), "400", "binary_data_size is 602112 bytes",
             "is 1204224 bytes")
    too_many = np.zeros((17, 64), np.int64)
    _refused(lambda: client.infer(TEXT, [_input("input_ids", too_many, "INT64")], headers=auth()), "400",
             "17 rows", "1 to 16 per request")
    _refused(lambda: client.infer(TEXT, [_input("input_ids", np.zeros((1, 64), np.int64), "INT64", False)],
                                  model_version="2", headers=auth()), "404", "no version '2'")
    # The key: V2 answers a missing one in its own shape.
    _refused(lambda: client.infer(IMAGE, [_input("pixel_values", px, "FP32")]), "401", "missing or wrong API key")
    _refused(lambda: client.get_server_metadata(), "401", "Authorization: Bearer")

    u = server.url + f"/v2/models/{TEXT}/infer"
    ids = {"name": "input_ids", "shape": [1, 64], "datatype": "INT64"}
    cases = [  # (body, headers, status, fragment of the message)
        (json.dumps({"inputs": [{**ids, "data": [0] * 63}]}), {}, 400, "holds 63 elements; shape [1, 64] needs 64"),
        (json.dumps({"inputs": [{**ids, "data": [0.5] * 64}]}), {}, 400, "INT64 data must hold integers only"),
        (json.dumps({"inputs": [{**ids, "data": [[0] * 64, [0]]}]}), {}, 400, "nested unevenly"),
        (json.dumps({"inputs": [{**ids, "data": [0] * 64}], "sequence_id": 3}), {}, 400, "unsupported key"),
        (json.dumps({"inputs": [{**ids, "data": [0] * 64, "parameters": {"shared_memory_region": "r"}}]}), {}, 400,
         "shared-memory extension is not supported"),
        (json.dumps({"inputs": [{**ids, "parameters": {"binary_data_size": 512}}]}).encode() + b"\0" * 512, {}, 400,
         "needs the Inference-Header-Content-Length header"),
        (b'{"inputs": []}', {"Inference-Header-Content-Length": "99"}, 400, "Inference-Header-Content-Length is '99'"),
        (json.dumps({"inputs": [{**ids, "data": [0] * 64}]}), {"Inference-Header-Content-Length": "10"}, 400,
         "first 10 bytes (Inference-Header-Content-Length) are not a JSON object"),
        (json.dumps({"inputs": [{**ids, "parameters": {"binary_data_size": 512}}]}).encode() + b"\0" * 520,
         "header", 400, "520 bytes after its JSON header"),
        (json.dumps({"inputs": [{**ids, "data": [0] * 64}]}), {"Content-Type": "text/plain"}, 415,
         "application/octet-stream"),
    ]
    with httpx.Client(headers=auth()) as c:
        for body, headers, status, fragment in cases:
            body = body.encode() if isinstance(body, str) else body
            if headers == "header":
                headers = {"Inference-Header-Content-Length": str(body.index(b"}]}") + 3),
                           "Content-Type": "application/octet-stream"}
            r = c.post(u, content=body, headers=headers)
            assert r.status_code == status and list(r.json()) == ["error"], (fragment, r.status_code, r.text)
            assert fragment in r.json()["error"], (fragment, r.text)
        r = c.get(server.url + "/v2/models/x/nothing")  # refused before routing: V2's shape too under /v2
        assert r.status_code == 404 and list(r.json()) == ["error"]
        r = c.post(u, content=b"x" * (9 << 20))
        assert r.status_code == 413 and "over the 8 MiB limit" in r.json()["error"]


# -- the codec alone: datatypes no served model has ------------------------------------------------------------------
def test_codec_bool_and_bytes_roundtrip():
    """BOOL and BYTES tensors, binary and JSON, in and out; the answers read back by tritonclient's own parser."""
    from tritonclient.utils import serialize_byte_tensor

    sig = kserve.Signature.from_specs("m.flags", "onnxruntime_onnx", [TensorSpec("flags", "bool", ("batch", 3))],
                                      [TensorSpec("out", "bool", ("batch", 3))])
    flags = np.array([[True, False, True], [False, False, True]])
    header = {"inputs": [{"name": "flags", "shape": [2, 3], "datatype": "BOOL", "parameters": {"binary_data_size": 6}}]}
    np.testing.assert_array_equal(kserve.decode_request(header, memoryview(flags.tobytes()), sig, 8).inputs[0], flags)
    with pytest.raises(kserve.TensorError, match="0 or 1"):
        kserve.decode_request(header, memoryview(b"\x00\x02\x01\x00\x00\x01"), sig, 8)
    req = kserve.decode_request({"inputs": [{"name": "flags", "shape": [2, 3], "datatype": "BOOL",
                                             "data": flags.tolist()}], "parameters": {"binary_data_output": True}},
                                memoryview(b""), sig, 8)
    body, n = kserve.encode_response(req, sig, {"out": flags})
    assert n is not None
    np.testing.assert_array_equal(http.InferResult.from_response_body(body, header_length=n).as_numpy("out"), flags)

    # BYTES: tritonclient's own serialisation in, both encodings out.
    words = np.array([b"effusion", b"", "n\u00e9gatif".encode()], dtype=object)
    raw = serialize_byte_tensor(words).item()
    sig = kserve.Signature("m.text", "onnxruntime_onnx", (kserve.Tensor("text", "BYTES", (-1,)),),
                           (kserve.Tensor("echo", "BYTES", (-1,)),))
    header = {"inputs": [{"name": "text", "shape": [3], "datatype": "BYTES",
                          "parameters": {"binary_data_size": len(raw)}}]}
    req = kserve.decode_request(header, memoryview(raw), sig, 8)
    assert req.inputs[0].tolist() == words.tolist()
    for binary in (True, False):
        req.outputs = [("echo", binary)]
        body, n = kserve.encode_response(req, sig, {"echo": req.inputs[0]})
        got = http.InferResult.from_response_body(body, header_length=n).as_numpy("echo").reshape(-1)
        assert [w if isinstance(w, bytes) else w.encode() for w in got.tolist()] == words.tolist()
    req = kserve.decode_request({"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": ["a", "b"]}]},
                                memoryview(b""), sig, 8)
    assert req.inputs[0].tolist() == [b"a", b"b"]
    header["inputs"][0]["parameters"]["binary_data_size"] = len(raw) + 4
    with pytest.raises(kserve.TensorError, match="past the end"):
        kserve.decode_request(header, memoryview(raw + struct.pack("<I", 9)), sig, 8)
    with pytest.raises(MedcError, match="BF16"):
        kserve.Signature.from_specs("m.x", "onnxruntime_onnx", [TensorSpec("x", "bfloat16", ("b", 2))], [])
    with pytest.raises(MedcError, match="only dynamic axis is the first"):
        kserve.Signature.from_specs("m.x", "onnxruntime_onnx", [TensorSpec("x", "int64", ("b", "seq"))], [])
