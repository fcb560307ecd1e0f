"""runtime/openapi.json stays true: its operations are serve.py's route table, live answers of a real server validate
against it, and schemathesis fuzzes a live server (both tiny bundles, an API key) with it: no 5xx, every answer as
documented, every request the document calls invalid refused, the key enforced where the document says so."""

from __future__ import annotations

import base64
import collections
import copy
import hashlib
import importlib.util
import io
import json
from importlib import resources

import httpx
import numpy as np
import pytest

schemathesis = pytest.importorskip("schemathesis", reason="the fuzz needs the test extra: pip install 'medc[test]'")
pytest.importorskip("uvicorn", reason="medc serve needs the serve extra: pip install 'medc[serve]'")

from hypothesis import HealthCheck, settings  # noqa: E402 - schemathesis brings hypothesis
from jsonschema import Draft202012Validator, ValidationError  # noqa: E402
from referencing import Registry, Resource  # noqa: E402
from referencing.jsonschema import DRAFT202012  # noqa: E402
from test_serve import KEY, ThreadServer  # noqa: E402

from medc.runtime.serve import OPENAPI_LIMITS, ROUTES, ServeConfig  # noqa: E402

AUTH = {"Authorization": f"Bearer {KEY}"}
METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
HAS_INDEX = importlib.util.find_spec("usearch") is not None  # the retrieval extra: the fuzzed server gets an index
# The fuzzed server's limits: smaller than the defaults, so the served document must carry them.
LIMITS = dict(max_images=3, max_inputs=16, max_messages=7, max_content_parts=12, max_stops=3, max_stop_chars=32,
              max_tokens_cap=200, max_image_mb=1.0, max_body_mb=4.0, max_queue=64)


def packaged() -> dict:
    return json.loads(resources.files("medc.runtime").joinpath("openapi.json").read_text("utf-8"))


def _pointer(*parts: str) -> str:
    return "#/" + "/".join(str(p).replace("~", "~0").replace("/", "~1") for p in parts)


class Contract:
    """One OpenAPI document as validators: answers are checked against what it documents for their status."""

    def __init__(self, doc: dict):
        self.doc = doc
        self.registry = Registry().with_resource("urn:medc:openapi", Resource.from_contents(
            doc, default_specification=DRAFT202012))

    def validator(self, pointer: str) -> Draft202012Validator:
        return Draft202012Validator({"$ref": "urn:medc:openapi" + pointer}, registry=self.registry)

    def response(self, method: str, path: str, status: int) -> tuple[str, dict]:
        """(JSON pointer, response object) documented for this answer: its status, else `default`."""
        responses = self.doc["paths"][path][method.lower()]["responses"]
        key = str(status) if str(status) in responses else "default"
        where, response = _pointer("paths", path, method.lower(), "responses", key), responses[key]
        if "$ref" in response:
            where = response["$ref"]
            response = self.doc["components"]["responses"][where.rsplit("/", 1)[1]]
        return where, response

    def check(self, method: str, path: str, r: httpx.Response):
        """Validates status, headers and body of `r`; returns the parsed body (events for a stream)."""
        where, documented = self.response(method, path, r.status_code)
        if r.status_code != 200:
            assert str(r.status_code) in self.doc["paths"][path][method.lower()]["responses"], (path, r.status_code)
        if "content" not in documented:  # the V2 probes: 200 with an empty body, as Triton answers them
            assert r.content == b"" and "content-type" not in r.headers, (path, r.headers)
            return None
        for name, header in documented.get("headers", {}).items():
            header = self.doc["components"]["headers"][header["$ref"].rsplit("/", 1)[1]]
            assert name in r.headers or not header.get("required"), (path, name)
            if name in r.headers:
                Draft202012Validator(header["schema"]).validate(r.headers[name])
        media = r.headers["content-type"].split(";")[0].strip()
        assert media in documented["content"], (path, r.status_code, media)
        schema = self.validator(f"{where}/content/{media.replace('/', '~1')}/schema")
        if media == "application/json":
            body = r.json()
            schema.validate(body)
            return body
        if media == "text/plain":
            schema.validate(r.text)
            return r.text
        if media == "application/octet-stream":  # V2 binary outputs: a JSON header of the documented length first
            n = int(r.headers["inference-header-content-length"])
            self.validator(f"{where}/content/application~1json/schema").validate(json.loads(r.content[:n]))
            return r.content
        assert media == "text/event-stream"
        return self.events(r.content, schema)

    def events(self, content: bytes, schema: Draft202012Validator) -> list:
        """Each event against the event schema, and its JSON `data` against the schema's `contentSchema` (which
        JSON Schema leaves an annotation)."""
        data = self.validator(_pointer("components", "schemas", "ChatCompletionEvent", "properties", "data", "anyOf",
                                       "1", "contentSchema"))
        out = []
        for block in content.decode().split("\n\n"):
            if not block:
                continue
            assert block.startswith("data: ") and "\n" not in block, block[:200]
            schema.validate({"data": block[6:], "event": "message"})
            if block != "data: [DONE]":
                out.append(json.loads(block[6:]))
                data.validate(out[-1])
        return out


def _index(bundle, images, folder) -> str | None:
    """An embedding index of `images` for `bundle` (the fuzz then reaches /v1/search and /v1/index with one); None
    without the retrieval extra (those routes answer 501, as documented)."""
    if not HAS_INDEX:
        return None
    from medc.runtime import load
    from medc.runtime.retrieval import add_paths, bundle_record, embedding_dim
    from medc.runtime.vectorindex import VectorIndex

    with load(bundle) as pipe, VectorIndex.create(folder, embedding_dim(pipe), bundle_record(pipe)) as idx:
        add_paths(idx, pipe, images)
    return str(folder)


@pytest.fixture(scope="module")
def server(bundle_fp32, gemma_fp32, real_images, tmp_path_factory):
    # No salt: POST /v1/index refuses DICOM that names a patient (400 salt_required), which the live answers check.
    index = _index(bundle_fp32, real_images, tmp_path_factory.mktemp("index") / "index")
    s = ThreadServer([bundle_fp32, gemma_fp32], api_key=KEY, dicom_store=str(tmp_path_factory.mktemp("dicom")),
                     index=index, **LIMITS)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def served(server) -> dict:
    r = httpx.get(server.url + "/openapi.json")  # no key needed
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    return r.json()


# -- the document and the route table -----------------------------------------------------------------------------
def test_document_matches_route_table(server, served):
    from openapi_spec_validator import validate

    doc = packaged()
    validate(doc)  # OpenAPI 3.1, every $ref resolves
    operations = {(m.upper(), p) for p, item in doc["paths"].items() for m in item if m in METHODS}
    assert operations == {(m, p) for m, p, _, _ in ROUTES}
    for method, path, _, needs_key in ROUTES:
        op = doc["paths"][path][method.lower()]
        assert (op.get("security", doc["security"]) == [{"bearerAuth": []}]) == needs_key, path
        assert "200" in op["responses"] and "default" in op["responses"], path
        assert ("401" in op["responses"]) == needs_key, path
        for response in op["responses"].values():  # inline, or one of the shared responses checked below
            assert response.get("$ref", "").startswith("#/components/responses/") or response["headers"][
                "x-request-id"] == {"$ref": "#/components/headers/RequestId"}, path
    for name, response in doc["components"]["responses"].items():
        assert response["headers"]["x-request-id"] == {"$ref": "#/components/headers/RequestId"}, name

    # The packaged document states the default limits; a server answers it with its own filled in, nothing else.
    served = copy.deepcopy(served)  # the module's fixture stays as served
    schemas, defaults, cfg = served["components"]["schemas"], ServeConfig(), server.state.cfg
    for name, keyword, field in OPENAPI_LIMITS:
        assert doc["components"]["schemas"][name][keyword] == getattr(defaults, field), name
        assert schemas[name][keyword] == getattr(cfg, field), name
        schemas[name][keyword] = doc["components"]["schemas"][name][keyword]
    assert doc["components"]["schemas"]["MaxTokens"]["maximum"] == defaults.max_tokens_cap
    context = server.state.by_id["medgemma-tiny"].pipeline.assets.max_positions
    assert schemas["MaxTokens"]["maximum"] == min(cfg.max_tokens_cap, context) == 200
    schemas["MaxTokens"]["maximum"] = defaults.max_tokens_cap
    assert "enum" not in doc["components"]["schemas"]["V2ModelName"]
    assert schemas["V2ModelName"].pop("enum") == list(server.state.v2) == [
        "medsiglip-tiny.image_encoder", "medsiglip-tiny.text_encoder", "medgemma-tiny.vision_encoder"]
    assert served == doc


def test_every_error_code_is_documented():
    """Each (status, code) an `ApiError(...)` in serve.py can carry is documented: for a route, in the codes of the
    response for that status (5xx: `default`, named in its description); refused before routing, in the API's
    description. A new error in serve.py fails here until the document names it."""
    import ast
    import inspect

    from medc.runtime import serve

    doc = packaged()
    raised = set()
    for node in ast.walk(ast.parse(inspect.getsource(serve))):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "ApiError":
            code = node.args[2] if len(node.args) > 2 else {k.arg: k.value for k in node.keywords}["code"]
            assert isinstance(node.args[0], ast.Constant) and isinstance(code, ast.Constant), ast.unparse(node)
            raised.add((node.args[0].value, code.value))
    assert len(raised) > 20

    documented = collections.defaultdict(set)  # status -> codes, over all operations
    for item in doc["paths"].values():
        for method, op in item.items():
            for status, response in (op["responses"].items() if method in METHODS else ()):
                if status not in ("200", "default"):
                    name = response["$ref"].rsplit("/", 1)[1]
                    schema = doc["components"]["responses"][name]["content"]["application/json"]["schema"]
                    if "allOf" not in schema:  # not an error: STOW-RS answers 202 and 409 with its results
                        continue
                    error = schema["allOf"][1]
                    code = error["properties"]["error"]["properties"]["code"]
                    documented[int(status)] |= set(code.get("enum", [code.get("const")]))
    before_routing = {(404, "not_found"), (405, "method_not_allowed"), (400, "invalid_http"), (431, "headers_too_large")}
    for status, code in sorted(raised):
        if (status, code) in before_routing:
            assert f"({status} `{code}`" in doc["info"]["description"], code
        elif status >= 500 and status not in documented:
            assert f"`{code}`" in doc["components"]["responses"]["ServerError"]["description"], code
        else:
            assert code in documented[status], (status, code)


# -- real answers -------------------------------------------------------------------------------------------------
def _png(size=(32, 24)) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, (90, 120, 30)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _dicom_url() -> str:
    """A pydicom test file (it names a patient) as a data URL."""
    from pydicom.data import get_testdata_file

    with open(get_testdata_file("CT_small.dcm"), "rb") as f:
        return "data:application/dicom;base64," + base64.b64encode(f.read()).decode()


def test_live_answers_match_document(server, served):
    c = Contract(served)
    u = server.url
    example = served["components"]["schemas"]["ImageDataURL"]["examples"][0]
    msgs = [{"role": "user", "content": "Is there a pneumothorax?"}]
    image_msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _png()}},
                                               {"type": "text", "text": "Describe the findings."}]}]
    calls = [
        ("GET", "/health", None, {}), ("GET", "/ready", None, AUTH), ("GET", "/metrics", None, AUTH),
        ("GET", "/v1/models", None, AUTH), ("GET", "/openapi.json", None, {}),
        ("POST", "/v1/chat/completions", {"messages": msgs, "max_tokens": 6}, AUTH),
        ("POST", "/v1/chat/completions", {"model": "medgemma-tiny", "messages": image_msgs, "max_completion_tokens": 4,
                                          "temperature": 0.7, "top_p": 0.9, "top_k": 20, "seed": 3, "stop": ["\n"],
                                          "n": 1, "user": "u", "ignore_eos": True}, AUTH),
        ("POST", "/v1/chat/completions", {"messages": msgs, "max_tokens": 5, "stream": True,
                                          "stream_options": {"include_usage": True}}, AUTH),
        ("POST", "/v1/embeddings", {"input": ["pleural effusion", "normal"]}, AUTH),
        ("POST", "/v1/embeddings", {"model": "medsiglip-tiny", "input": "x", "encoding_format": "base64",
                                    "dimensions": 64}, AUTH),
        ("POST", "/v1/embeddings", {"images": [example, _png()]}, AUTH),
        ("POST", "/v1/classify", {"images": [_png()], "labels": ["normal", "pneumothorax"]}, AUTH),
        ("POST", "/v1/classify", {"images": [example], "labels": "effusion"}, AUTH),
    ]
    if server.state.search is not None:  # similar-case search (an index of the real images)
        calls += [
            ("POST", "/v1/index", {"images": [example, _png(), example], "labels": ["fuzzed"]}, AUTH),
            ("POST", "/v1/index", {"model": "medsiglip-tiny", "images": [_png()], "labels": "x", "user": "u"}, AUTH),
            ("POST", "/v1/search", {"text": "a retinal photograph", "k": 3}, AUTH),
            ("POST", "/v1/search", {"image": example, "filters": {"label": "fuzzed"}, "model": None}, AUTH),
            ("POST", "/v1/search", {"sop_uid": "sha256:" + hashlib.sha256(base64.b64decode(example.split(",")[1]))
                                    .hexdigest(), "k": 100, "filters": None}, AUTH),
        ]
    with httpx.Client(timeout=60) as client:
        for method, path, body, headers in calls:
            r = client.request(method, u + path, json=body, headers={**headers, "x-request-id": "req-1.a_B"})
            assert r.status_code == 200, (path, r.text[:300])
            assert r.headers["x-request-id"] == "req-1.a_B"
            got = c.check(method, path, r)
            if path == "/v1/chat/completions" and body.get("stream"):
                assert 1 <= got[-1]["usage"]["completion_tokens"] <= 5 and got[0]["choices"][0]["delta"]["role"]

        # Errors: each as documented for its status, never the `default`.
        gif = "data:image/gif;base64,R0lGODlhAQABAAAAACw="
        errors = [
            ("GET", "/v1/models", None, {}, 401),
            *([("POST", "/v1/search", {"sop_uid": "1.2.3"}, AUTH, 404),
               ("POST", "/v1/search", {"text": "x", "model": "medgemma-tiny"}, AUTH, 404),
               ("POST", "/v1/search", {"text": "x", "filters": {"modality": ""}}, AUTH, 400),
               ("POST", "/v1/index", {"images": [_dicom_url()]}, AUTH, 400)] if server.state.search else
              [("POST", "/v1/search", {"text": "x"}, AUTH, 501), ("POST", "/v1/index", {"images": [example]}, AUTH, 501)]),
            ("POST", "/v1/embeddings", {"input": "x", "frobnicate": 1}, AUTH, 400),
            ("POST", "/v1/embeddings", {"input": "x", "model": "gpt-4"}, AUTH, 404),
            ("POST", "/v1/classify", {"images": [gif], "labels": ["a"]}, AUTH, 415),
            ("POST", "/v1/classify", {"images": [example] * 4, "labels": ["a"]}, AUTH, 400),
            ("POST", "/v1/chat/completions", {"messages": msgs, "max_tokens": 10**6}, AUTH, 400),
        ]
        for method, path, body, headers, status in errors:
            r = client.request(method, u + path, json=body, headers=headers)
            assert r.status_code == status, (path, r.text[:300])
            c.check(method, path, r)
        r = client.post(u + "/v1/embeddings", content=b"x" * (5 << 20), headers=AUTH)
        assert r.status_code == 413
        c.check("POST", "/v1/embeddings", r)

        # KServe V2: (method, documented path, requested path, JSON body or raw bytes, headers, status)
        text = "/v2/models/medsiglip-tiny.text_encoder"
        ids = {"name": "input_ids", "shape": [1, 64], "datatype": "INT64"}
        binary = json.dumps({"inputs": [{**ids, "parameters": {"binary_data_size": 512}}],
                             "outputs": [{"name": "text_embeds", "parameters": {"binary_data": True}}]}).encode()
        v2 = [
            ("GET", "/v2", "/v2", None, AUTH, 200), ("GET", "/v2/health/live", "/v2/health/live", None, {}, 200),
            ("GET", "/v2/health/ready", "/v2/health/ready", None, {}, 200),
            ("GET", "/v2/models/{name}", text, None, AUTH, 200),
            ("GET", "/v2/models/{name}/versions/{version}/ready", text + "/versions/1/ready", None, AUTH, 200),
            ("POST", "/v2/models/{name}/infer", text + "/infer", {"id": "7", "inputs": [{**ids, "data": [1] * 64}]},
             AUTH, 200),
            ("POST", "/v2/models/{name}/versions/{version}/infer", text + "/versions/1/infer",
             binary + np.arange(64, dtype="<i8").tobytes(),
             {**AUTH, "Inference-Header-Content-Length": str(len(binary))}, 200),
            ("GET", "/v2", "/v2", None, {}, 401),
            ("GET", "/v2/models/{name}", "/v2/models/medsiglip-tiny", None, AUTH, 404),
            ("GET", "/v2/models/{name}/versions/{version}", text + "/versions/2", None, AUTH, 404),
            ("POST", "/v2/models/{name}/infer", text + "/infer", {"inputs": [{**ids, "data": [1.5] * 64}]}, AUTH, 400),
            ("POST", "/v2/models/{name}/infer", text + "/infer", b"x" * (5 << 20), AUTH, 413),
        ]
        for method, documented, path, body, headers, status in v2:
            r = client.request(method, u + path, headers=headers,
                               **({"content": body} if isinstance(body, bytes) else {"json": body}))
            assert r.status_code == status, (path, r.text[:300])
            got = c.check(method, documented, r)
            if status >= 400:
                assert set(got) == {"error"}, got


def test_documented_bounds_are_the_servers(server, served):
    """At each bound the document states the server accepts; one step past it, it refuses. (The fuzz's invalid
    cases come from the document: a bound written tighter than the server's would go unnoticed there.)"""
    s = served["components"]["schemas"]
    chat, png = s["ChatCompletionRequest"]["properties"], _png()
    text, texts, images = s["Text"]["maxLength"], s["TextList"]["maxItems"], s["Images"]["maxItems"]
    labels, messages, parts = s["LabelList"]["maxItems"], s["Messages"]["maxItems"], s["ContentParts"]["maxItems"]
    stops, stop_chars, tokens = s["StopList"]["maxItems"], s["StopString"]["maxLength"], s["MaxTokens"]["maximum"]
    assert s["Label"]["maxLength"] == text
    turns = [{"role": ("user", "assistant")[i % 2], "content": "hi"} for i in range(messages + 1)]

    def ask(**kw):
        return ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, **kw})

    bounds = [  # (at the bound, one step past it)
        (("/v1/embeddings", {"input": "x" * text}), ("/v1/embeddings", {"input": "x" * (text + 1)})),
        (("/v1/embeddings", {"input": ["x"] * texts}), ("/v1/embeddings", {"input": ["x"] * (texts + 1)})),
        (("/v1/embeddings", {"images": [png] * images}), ("/v1/embeddings", {"images": [png] * (images + 1)})),
        (("/v1/classify", {"images": [png], "labels": ["y" * text] + ["x"] * (labels - 1)}),
         ("/v1/classify", {"images": [png], "labels": ["x"] * (labels + 1)})),
        (ask(temperature=chat["temperature"]["maximum"]), ask(temperature=chat["temperature"]["maximum"] + 0.01)),
        (ask(top_p=1e-9), ask(top_p=chat["top_p"]["exclusiveMinimum"])),
        (ask(top_p=chat["top_p"]["maximum"]), ask(top_p=chat["top_p"]["maximum"] + 0.01)),
        (ask(top_k=chat["top_k"]["maximum"]), ask(top_k=chat["top_k"]["maximum"] + 1)),
        (ask(seed=chat["seed"]["maximum"]), ask(seed=chat["seed"]["maximum"] + 1)),
        (ask(stop=["x"] * stops), ask(stop=["x"] * (stops + 1))),
        (ask(stop="x" * stop_chars), ask(stop="x" * (stop_chars + 1))),
        (ask(messages=turns[:messages]), ask(messages=turns)),
        (ask(messages=[{"role": "user", "content": [{"type": "text", "text": "a"}] * parts}]),
         ask(messages=[{"role": "user", "content": [{"type": "text", "text": "a"}] * (parts + 1)}])),
        (ask(max_tokens=tokens), ask(max_tokens=tokens + 1)),
    ]
    assert messages % 2 == 1  # the last message at the bound is the user's
    with httpx.Client(timeout=60, headers=AUTH) as c:
        for at, past in bounds:
            r = c.post(server.url + at[0], json=at[1])
            assert r.status_code == 200, (str(at)[:120], r.text[:300])
            r = c.post(server.url + past[0], json=past[1])
            assert r.status_code == 400, (str(past)[:120], r.status_code)


# -- the fuzz -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def api_schema(server, served):
    config = schemathesis.Config.from_dict({
        "base-url": server.url,
        "seed": 20260601,  # the same cases every run; change it locally to explore further
        "generation": {"mode": "all"},
        "phases": {"stateful": {"enabled": False}},
        "output": {"sanitization": {"enabled": False}},  # the key is a test key; *_tokens fields are not secrets
    })
    # from_dict, not from_url: schemathesis leaves out the operation its document was loaded from.
    return schemathesis.openapi.from_dict(served, config=config)


@schemathesis.serializer("multipart/related")
def _multipart(ctx, value):  # STOW-RS: whatever was generated, sent as the body (the request has no boundary)
    return value if isinstance(value, bytes) else str(value).encode()


@schemathesis.deserializer("text/plain")
def _text(ctx, response):  # /metrics: without it schemathesis leaves text bodies unchecked
    return response.content.decode(response.encoding or "utf-8")


def sse_data_conformance(ctx, response, case):
    """The JSON in each event of a streamed chat answer against the document (schemathesis checks the event's
    shape; JSON Schema leaves `contentSchema` an annotation)."""
    if (response.headers.get("content-type") or [""])[0].startswith("text/event-stream"):
        contract = Contract(case.operation.schema.raw_schema)
        end = response.content.rfind(b"\n\n")  # a stream read in part (max-stream-events): its whole events
        whole = response.content[:end + 2] if end >= 0 else b""
        try:
            contract.events(whole, contract.validator(_pointer("components", "schemas", "ChatCompletionEvent")))
        except ValidationError as e:
            raise AssertionError(f"a stream's event is not as documented: {e.message[:300]}") from None


CHECKS = [schemathesis.checks.not_a_server_error, schemathesis.checks.status_code_conformance,
          schemathesis.checks.content_type_conformance, schemathesis.checks.response_headers_conformance,
          schemathesis.checks.response_schema_conformance, schemathesis.checks.negative_data_rejection,
          schemathesis.checks.ignored_auth, sse_data_conformance]
SEEN: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
fuzzed = schemathesis.pytest.from_fixture("api_schema")


@fuzzed.parametrize()
@settings(max_examples=25, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
def test_fuzz(case, server):
    r = case.call_and_validate(base_url=server.url, headers=AUTH, checks=CHECKS, timeout=30)
    SEEN[case.operation.label][r.status_code] += 1
    if (r.headers.get("content-type") or [""])[0].startswith("text/event-stream"):
        SEEN["streams"][r.status_code] += 1


def test_fuzz_reached_every_operation():
    """The fuzz was not stopped at the door: each operation was answered 200 as well as refused, and streamed
    answers were among them."""
    if not SEEN:
        pytest.skip("test_fuzz did not run")
    assert SEEN["streams"][200] >= 1
    for method, path, _, _ in ROUTES:
        codes = SEEN[f"{method} {path}"]
        # A fuzzer makes no DICOM file (nor the UIDs of an SR this server wrote), nor a tensor a V2 model takes:
        # tests/test_stow.py and tests/test_kserve.py (and test_live_answers_match_document) answer 200 there.
        # Without the retrieval extra the server has no index: /v1/search and /v1/index answer 501.
        assert codes[200] >= 1 or path.startswith("/dicomweb/") or path.endswith("/infer") or (
            path in ("/v1/search", "/v1/index") and not HAS_INDEX), (path, codes)
        if method == "POST":
            assert sum(n for code, n in codes.items() if 400 <= code < 500) >= 1, (path, codes)
