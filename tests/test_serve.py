"""`medc serve`: a real uvicorn server on a loopback port, the official openai client, streaming and disconnects,
continuous batching (greedy tokens independent of batch company), auth, metrics, overload and a fuzz table."""

from __future__ import annotations

import base64
import io
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from medc.runtime.batch import SamplingParams, Sequence
from medc.runtime.decoder import SlotDecoder
from medc.runtime.gemma import encode_messages
from medc.runtime.scheduler import GenerationScheduler
from medc.runtime.serve import ServeConfig, create_app, load_models, uvicorn_config

pytest.importorskip("uvicorn", reason="medc serve needs the serve extra: pip install 'medc[serve]'")

QUESTION = "Is there a pneumothorax?"
OTHERS = ["List three causes of pleural effusion in an adult patient.", "Describe the findings.", "Any fracture?"]
KEY = "test-key-0123456789abcdef"


class ThreadServer:
    """uvicorn in a background thread on a socket bound to a free loopback port (no port race)."""

    def __init__(self, bundles, **cfg):
        import uvicorn

        self.cfg = ServeConfig(**cfg)
        self.app = create_app(load_models([str(b) for b in bundles], self.cfg), self.cfg)
        # proto=IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP; without it
        # every keep-alive response waits ~40 ms for a delayed ACK (Nagle).
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn_config(self.app, self.cfg))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        assert self.server.started

    @property
    def state(self):
        return self.app.state.server

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def server(bundle_fp32, gemma_fp32):
    s = ThreadServer([bundle_fp32, gemma_fp32], max_queue=16, max_concurrency=4, max_batch=8, max_images=4,
                     max_image_mb=1.0, max_body_mb=4.0)
    yield s
    s.stop()


def _data_url(path: Path) -> str:
    mime = "image/png" if path.suffix == ".png" else "image/jpeg"
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode()


def _png(size=(32, 24), mode="RGB") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, size, 128).save(buf, format="PNG")
    return buf.getvalue()


def _chat(text, **kw):
    return {"model": "medgemma-tiny", "messages": [{"role": "user", "content": text}], **kw}


def _is_error(r: httpx.Response, status: int | None = None) -> dict:
    assert 400 <= r.status_code < 500 and (status is None or r.status_code == status), (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and "Traceback" not in r.text
    return err


# -- the API, through the official client ---------------------------------------------------------------------------
def test_openai_client(server, pipelines, real_images):
    from openai import OpenAI

    siglip, gemma = pipelines
    client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    assert {m.id for m in client.models.list()} == {"medsiglip-tiny", "medgemma-tiny"}

    content = [{"type": "image_url", "image_url": {"url": _data_url(real_images[1])}},
               {"type": "text", "text": "Describe the findings."}]
    msgs = [{"role": "user", "content": content}]
    whole = client.chat.completions.create(model="medgemma-tiny", messages=msgs, max_tokens=12)
    ref = gemma.assets.tokenizer.decode(
        _solo_ids(gemma, encode_messages(gemma.assets, [{"role": "user", "content": [{"type": "image"}, {
            "type": "text", "text": "Describe the findings."}]}]), 12, gemma.preprocess([real_images[1]])),
        skip_special_tokens=True)
    assert whole.choices[0].message.content == ref and whole.usage.completion_tokens >= 1
    assert whole.usage.prompt_tokens > gemma.assets.mm_tokens_per_image

    chunks = list(client.chat.completions.create(model="medgemma-tiny", messages=msgs, max_tokens=12, stream=True,
                                                 stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason

    texts = ["pleural effusion", "normal chest x-ray"]
    emb = client.embeddings.create(model="medsiglip-tiny", input=texts)  # the client asks for base64 by default
    got = np.array([d.embedding for d in emb.data], np.float32)
    np.testing.assert_allclose(got, siglip.embed_texts(texts), atol=1e-6)
    emb = client.embeddings.create(model="medsiglip-tiny", input=texts[0], encoding_format="float")
    np.testing.assert_allclose(emb.data[0].embedding, siglip.embed_texts(texts[:1])[0], atol=1e-6)


def _solo_ids(gemma, ids, n, pixel_values=None):
    """Greedy tokens of one prompt decoded alone (the reference for the server)."""
    out = []
    done = threading.Event()
    sched = GenerationScheduler(gemma, "ref", max_concurrency=1)
    sched.submit(Sequence(ids, pixel_values, SamplingParams(max_new_tokens=n),
                          lambda k, v: out.append(v) if k == "token" else done.set()))
    done.wait(60)
    sched.close()
    return out


def test_images_embeddings_and_classify(server, pipelines, real_images):
    siglip, _ = pipelines
    urls = [_data_url(p) for p in real_images[:2]]
    r = httpx.post(server.url + "/v1/embeddings", json={"images": urls})  # model left out: one siglip served
    assert r.status_code == 200, r.text
    got = np.array([d["embedding"] for d in r.json()["data"]], np.float32)
    np.testing.assert_allclose(got, siglip.embed_images(real_images[:2]), atol=1e-5)

    labels = ["normal", "diabetic retinopathy", "metastasis"]
    r = httpx.post(server.url + "/v1/classify", json={"model": "medsiglip-tiny", "images": urls, "labels": labels})
    assert r.status_code == 200, r.text
    ref = siglip.zero_shot(real_images[:2], labels)
    for row, d in zip(ref, r.json()["data"]):
        scores = [x["score"] for x in d["labels"]]
        assert scores == sorted(scores, reverse=True)
        assert {x["label"]: x["score"] for x in d["labels"]} == pytest.approx(dict(zip(labels, row)), abs=1e-5)


def test_embeddings_are_batched(server, pipelines):
    siglip, _ = pipelines
    texts = [f"finding number {i}" for i in range(24)]
    batcher = server.state.by_id["medsiglip-tiny"].texts
    batcher.limit = batcher.max_batch  # what the startup measurement chose is tested in test_gather_limit
    before = (batcher.batches, batcher.items)
    with httpx.Client() as c, ThreadPoolExecutor(12) as pool:
        rs = list(pool.map(lambda t: c.post(server.url + "/v1/embeddings", json={"input": t}), texts))
    assert all(r.status_code == 200 for r in rs)
    got = np.array([r.json()["data"][0]["embedding"] for r in rs], np.float32)
    np.testing.assert_allclose(got, siglip.embed_texts(texts), atol=1e-5)  # batch company does not change vectors
    # usage is counted in the batch, as the texts are tokenized: each request gets its own count back
    assert [r.json()["usage"]["prompt_tokens"] for r in rs] == [len(siglip.tokenizer.encode(t)) for t in texts]
    batches, items = batcher.batches - before[0], batcher.items - before[1]
    assert items == 24 and batches < 24


def test_gather_limit():
    """The batch an encoder is given is measured: a fixed cost per call is worth sharing, a cost per item that grows
    with the batch (activations out of cache) is not, and a slow encoder is not timed past the budget."""
    import time

    from medc.runtime.scheduler import gather_limit

    def per_call(items):  # 5 ms per call, 0.1 ms per item: batching divides the cost
        time.sleep(0.005 + 1e-4 * len(items))
        return np.zeros((len(items), 1))

    def growing(items):  # 10 ms per item at batch 1, 20 ms per item at batch 4 (10 ms: sleep jitter on a busy
        time.sleep(1e-2 * len(items) * (1 + (len(items) - 1) / 3))  # machine stays far below the 33% step to 2)
        return np.zeros((len(items), 1))

    def slow(items):
        time.sleep(0.25 * len(items))
        return np.zeros((len(items), 1))

    assert gather_limit(per_call, "x", 16)[0] == 16
    assert gather_limit(per_call, "x", 12)[1].keys() == {1, 2, 4, 8, 12}
    assert gather_limit(growing, "x", 4)[0] == 1
    limit, per_item = gather_limit(slow, "x", 16, budget_s=1.5)
    assert limit in (1, 2) and per_item.keys() <= {1, 2}  # two calls at 1 (0.5 s); at 2 (1 s) fits; at 4 would not


def test_gather_window():
    """A batch waits for announced requests only as long as running the first alone would cost extra: up to the cap
    where a call's fixed cost dominates (a GPU), next to nothing for a compute-bound CPU encoder, never at limit 1."""
    from medc.runtime.scheduler import gather_window

    gpu = {1: 5e-3, 2: 2.6e-3, 4: 1.4e-3, 8: 0.8e-3, 16: 0.5e-3}
    assert gather_window(gpu, 16, 3e-3) == 3e-3
    cpu = {1: 1.57e-3, 2: 1.41e-3, 4: 1.32e-3, 8: 1.34e-3}  # the tiny MedSigLIP's images, 2-core Xeon
    assert abs(gather_window(cpu, 4, 3e-3) - 0.25e-3) < 1e-9
    assert gather_window(cpu, 1, 3e-3) == 0.0 and gather_window({1: 1e-3, 2: 1.2e-3}, 2, 3e-3) == 0.0


# -- continuous batching --------------------------------------------------------------------------------------------
def test_greedy_tokens_do_not_depend_on_batch_company(pipelines, real_images, monkeypatch):
    """A request's greedy tokens are identical alone and with others joining mid-way and leaving early, through
    the sliding-window and global KV layers, with an image prompt among them. Prompts ride in the decode steps in
    chunks of 7 tokens (7 per step in all), so B's and C's take several steps, one after the other."""
    _, gemma = pipelines
    monkeypatch.setattr(SlotDecoder, "prefill_chunk", 7)
    user = lambda text: [{"role": "user", "content": text}]  # noqa: E731
    prompts = [encode_messages(gemma.assets, user(t)) for t in [QUESTION, *OTHERS]]
    image_prompt = encode_messages(gemma.assets, [{"role": "user", "content": [{"type": "image"},
                                                                               {"type": "text", "text": "Findings?"}]}])
    pixels = gemma.preprocess([real_images[0]])
    lengths = [40, 7, 25, 40]  # B leaves early, C in the middle
    alone = [_solo_ids(gemma, p, n) for p, n in zip(prompts, lengths)]
    alone_image = _solo_ids(gemma, image_prompt, 30, pixels)
    ref = gemma.generate_ids([QUESTION], max_new_tokens=40)[0]  # the plain pipeline agrees (stream, fixed batch)
    assert alone[0] == ref

    sched = GenerationScheduler(gemma, "t", max_concurrency=8)
    outs = {i: [] for i in range(5)}
    done = threading.Event()
    finished = []

    def listener(i):
        def emit(kind, value):
            if kind == "token":
                outs[i].append(value)
                if i == 0 and len(outs[0]) == 3:  # B, C and the image request join after A's third token
                    for j in (1, 2):
                        sched.submit(Sequence(prompts[j], None, SamplingParams(max_new_tokens=lengths[j]), listener(j)))
                    sched.submit(Sequence(image_prompt, pixels, SamplingParams(max_new_tokens=30), listener(4)))
                if i == 0 and len(outs[0]) == 10:  # D joins later, when B has already left
                    sched.submit(Sequence(prompts[3], None, SamplingParams(max_new_tokens=lengths[3]), listener(3)))
            else:
                finished.append(i)
                if len(finished) == 5:
                    done.set()
        return emit

    sched.submit(Sequence(prompts[0], None, SamplingParams(max_new_tokens=40), listener(0)))
    assert done.wait(60)
    sched.close()
    assert [outs[i] for i in range(4)] == alone and outs[4] == alone_image
    assert sched.steps < sum(len(o) for o in outs.values())  # steps were shared
    assert sched.batch.decoder.packs and sched.mixed >= 1  # B's and C's prompts rode in A's decode steps


def test_concurrent_http_chat_matches_alone(server):
    url = server.url + "/v1/chat/completions"
    alone = httpx.post(url, json=_chat(QUESTION, max_tokens=30)).json()["choices"][0]["message"]["content"]
    with httpx.Client(timeout=60) as c, ThreadPoolExecutor(4) as pool:
        with c.stream("POST", url, json=_chat(QUESTION, max_tokens=30, stream=True)) as r:
            lines = r.iter_lines()
            first = [next(lines) for _ in range(3)]  # A is decoding; now others join
            others = [pool.submit(c.post, url, json=_chat(t, max_tokens=20)) for t in OTHERS]
            events = [json.loads(x[6:]) for x in first + list(lines) if x.startswith("data: {")]
        assert all(f.result().status_code == 200 for f in others)
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == alone


def test_sampling_seed_and_stop(server):
    url = server.url + "/v1/chat/completions"
    kw = dict(max_tokens=16, temperature=0.9, top_p=0.95, seed=7)
    a, b = (httpx.post(url, json=_chat(QUESTION, **kw)).json()["choices"][0]["message"]["content"] for _ in range(2))
    assert a == b
    whole = httpx.post(url, json=_chat(QUESTION, max_tokens=16)).json()["choices"][0]["message"]["content"]
    stop = whole.split()[2]
    r = httpx.post(url, json=_chat(QUESTION, max_tokens=16, stop=[stop])).json()["choices"][0]
    assert r["finish_reason"] == "stop" and r["message"]["content"] == whole[:whole.index(stop)]


def _metric(url: str, name: str, **labels) -> float:
    text = httpx.get(url + "/metrics").text
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") and want in line)


def test_client_disconnect_cancels_generation(server):
    url = server.url
    tokens0 = _metric(url, "medc_generated_tokens_total", model="medgemma-tiny")
    cancelled0 = _metric(url, "medc_generations_total", finish="cancelled")
    with httpx.Client(timeout=60) as c:
        with c.stream("POST", url + "/v1/chat/completions", json=_chat(QUESTION, max_tokens=480, stream=True)) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")  # the role chunk: the request is decoding
            next(lines)
        # leaving the block closes the connection mid-stream
    deadline = time.monotonic() + 20
    while _metric(url, "medc_generations_total", finish="cancelled") == cancelled0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _metric(url, "medc_generations_total", finish="cancelled") == cancelled0 + 1
    assert _metric(url, "medc_active_generations") == 0
    assert _metric(url, "medc_generated_tokens_total", model="medgemma-tiny") - tokens0 < 480


def test_overload_answers_429_not_timeouts(server):
    """4 decode, 16 wait, the rest are told to come back: 429 + Retry-After, never a 5xx or a hang."""
    url = server.url + "/v1/chat/completions"
    with httpx.Client(timeout=120, limits=httpx.Limits(max_connections=64)) as c, ThreadPoolExecutor(40) as pool:
        rs = list(pool.map(lambda i: c.post(url, json=_chat(OTHERS[i % 3], max_tokens=200)), range(40)))
    codes = [r.status_code for r in rs]
    assert set(codes) <= {200, 429} and codes.count(429) >= 1 and codes.count(200) >= 20, codes
    for r in rs:
        if r.status_code == 429:
            assert int(r.headers["retry-after"]) >= 1 and _is_error(r, 429)["code"] == "queue_full"
    assert httpx.post(url, json=_chat(QUESTION, max_tokens=4)).status_code == 200  # and it recovers


# -- bad input --------------------------------------------------------------------------------------------------------
def test_bad_images_and_limits(server):
    e, c = server.url + "/v1/embeddings", server.url + "/v1/chat/completions"
    png = _png()
    cases = [
        ({"images": ["data:image/png;base64," + base64.b64encode(b"not an image").decode()]}, 400, "invalid_image"),
        ({"images": ["data:image/png;base64," + base64.b64encode(png[:len(png) // 2]).decode()]}, 400, "invalid_image"),
        ({"images": ["data:application/dicom;base64," + base64.b64encode(b"DICM" * 40).decode()]}, 400,
         "invalid_image"),  # DICOM is read (tests/test_dicom.py); this is no dataset
        ({"images": ["data:image/gif;base64,R0lGODlhAQABAAAAACw="]}, 415, "unsupported_media_type"),
        ({"images": ["https://example.org/cxr.png"]}, 400, "unsupported_image_url"),
        ({"images": ["data:image/png;base64,@@@"]}, 400, "invalid_image"),
        ({"images": ["data:image/png;base64," + "A" * (2 << 20)]}, 413, "image_too_large"),  # over 1 MiB
        ({"images": ["data:image/png;base64," + base64.b64encode(png).decode()] * 5}, 400, "too_many_images"),
        ({"images": []}, 400, "invalid_type"),
    ]
    for body, status, code in cases:
        assert _is_error(httpx.post(e, json=body), status)["code"] == code, body.__repr__()[:80]
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (8000, 7000)).save(buf, format="PNG")  # 56 MP of zeros: a small file, a decompression bomb
    bomb = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    assert _is_error(httpx.post(e, json={"images": [bomb]}), 413)["code"] == "image_too_large"
    assert _is_error(httpx.post(e, content=b"x" * (5 << 20)), 413)["code"] == "body_too_large"
    long = " ".join(["effusion"] * 600)
    assert _is_error(httpx.post(c, json=_chat(long)), 400)["code"] == "context_length_exceeded"
    assert _is_error(httpx.post(c, json=_chat("y " * 20000)), 400)["code"] == "context_length_exceeded"  # untokenized
    assert _is_error(httpx.post(e, json={"input": ["x" * 20001]}), 400)["code"] == "input_too_long"
    assert _is_error(httpx.post(c, json=_chat(QUESTION, max_tokens=500)), 400)["code"] == "context_length_exceeded"


def _fuzz_cases() -> list[tuple[str, bytes | dict]]:
    """Hundreds of malformed requests: each valid body with every field dropped, retyped or pushed out of range,
    plus broken JSON, wrong roles, wrong parts and unknown parameters."""
    png = "data:image/png;base64," + base64.b64encode(_png()).decode()
    valid = {
        "/v1/chat/completions": _chat(QUESTION, max_tokens=2, temperature=0.5, top_p=0.9, seed=1, stop=["x"],
                                      stream=False, n=1),
        "/v1/embeddings": {"model": "medsiglip-tiny", "input": ["a", "b"], "encoding_format": "float"},
        "/v1/classify": {"model": "medsiglip-tiny", "images": [png], "labels": ["a", "b"]},
    }
    weird = [None, True, False, 0, -1, 1.5, 10**30, -10**30, float("nan"), "", "x" * 300, [], [None], [1, 2], {},
             {"a": 1}, [[[]]], "\u0000\ud7ff", 2**64, "\ud800", ["\udfff x"]]
    cases = []
    for route, body in valid.items():
        for key in body:
            cases.append((route, {k: v for k, v in body.items() if k != key}))
            cases += [(route, {**body, key: w}) for w in weird]
        cases += [(route, {**body, "frobnicate": 1}), (route, {**body, "n": 1000}), (route, {**body, "model": "gpt-4"})]
        cases += [(route, raw) for raw in (b"", b"{", b"[]", b"null", b'"x"', b"{}", b"\xff\xfe", b"[" * 100000,
                                           b'{"model": 1e999}', b"1" * 5000, json.dumps(body).encode()[:-3])]
    rng = random.Random(0)
    chat = valid["/v1/chat/completions"]
    messages = [None, [], "hi", [{}], [{"role": "tool", "content": "x"}], [{"role": "user"}],
                [{"role": "user", "content": None}], [{"role": "user", "content": [{"type": "audio"}]}],
                [{"role": "user", "content": [{"type": "image_url"}]}],
                [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": 5}}]}],
                [{"role": "user", "content": [{"type": "text", "text": 5}]}],
                [{"role": "system", "content": [{"type": "image_url", "image_url": {"url": png}}]},
                 {"role": "user", "content": "x"}],
                [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
                [{"role": "assistant", "content": "a"}],
                [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": png}}] * 5}]]
    cases += [("/v1/chat/completions", {**chat, "messages": m}) for m in messages]
    for _ in range(60):  # random byte flips of a valid body
        raw = bytearray(json.dumps(rng.choice(list(valid.values()))).encode())
        for _ in range(rng.randint(1, 4)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
        cases.append((rng.choice(list(valid)), bytes(raw)))
    return cases


def test_fuzz_no_5xx_and_still_serving(server, pipelines):
    siglip, _ = pipelines
    cases = _fuzz_cases()
    assert len(cases) > 300
    with httpx.Client(timeout=60) as c:
        for route, body in cases:
            r = c.post(server.url + route, **({"content": body} if isinstance(body, bytes) else {
                "content": json.dumps(body, allow_nan=True)}), headers={"content-type": "application/json"})
            assert r.status_code < 500, (route, str(body)[:200], r.status_code, r.text[:300])
            if r.status_code >= 400:
                _is_error(r)
        r = c.post(server.url + "/v1/embeddings", json={"input": ["pleural effusion"]})
        np.testing.assert_allclose(r.json()["data"][0]["embedding"], siglip.embed_texts(["pleural effusion"])[0],
                                   atol=1e-6)
        assert not [line for line in c.get(server.url + "/metrics").text.splitlines()
                    if line.startswith("medc_requests_total") and 'code="5' in line]


def test_misc_routes_and_metrics(server):
    u = server.url
    assert httpx.get(u + "/health").json() == {"status": "ok"}
    assert httpx.get(u + "/ready").json()["models"] == ["medsiglip-tiny", "medgemma-tiny"]
    assert _is_error(httpx.get(u + "/nope"), 404)["code"] == "not_found"
    r = httpx.delete(u + "/v1/models")
    assert _is_error(r, 405)["code"] == "method_not_allowed" and r.headers["allow"] == "GET, HEAD"
    assert httpx.get(u + "/v1/models/").json()["data"][0]["id"] == "medsiglip-tiny"  # a trailing slash: same route
    r = httpx.head(u + "/health")
    assert r.status_code == 200 and r.content == b"" and r.headers["content-type"] == "application/json"
    rids = {httpx.get(u + "/health").headers["x-request-id"] for _ in range(3)}
    assert len(rids) == 3 and all(re.fullmatch(r"[0-9a-f]{16}", rid) for rid in rids)
    r = httpx.options(u + "/v1/embeddings", headers={"Origin": "https://evil.example",
                                                     "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in r.headers  # CORS off
    assert httpx.get(u + "/health", headers={"x-request-id": "abc-123"}).headers["x-request-id"] == "abc-123"
    text = httpx.get(u + "/metrics").text
    for needle in ('medc_requests_total{route="/v1/chat/completions",code="200"}',
                   'medc_request_errors_total{route="/v1/embeddings",code="400"}',
                   'medc_request_duration_seconds_bucket{route="/v1/embeddings",le="+Inf"}',
                   'medc_time_to_first_token_seconds_count{model="medgemma-tiny"}',
                   'medc_generated_tokens_total{model="medgemma-tiny"}', 'medc_images_encoded_total{model=',
                   'medc_queue_depth{model="medgemma-tiny",queue="chat"} 0', "medc_active_generations",
                   'medc_decoder_steps_total{model="medgemma-tiny"}', "medc_mixed_decoder_steps_total"):
        assert needle in text, needle

    def encoder_counts():  # (calls, items) of the text encoder
        text = httpx.get(u + "/metrics").text
        return tuple(int(re.search(rf'{name}{{model="medsiglip-tiny",queue="text"}} (\d+)', text).group(1))
                     for name in ("medc_encoder_calls_total", "medc_encoder_items_total"))

    before = encoder_counts()
    assert httpx.post(u + "/v1/embeddings", json={"input": ["a", "b", "c", "d", "e"]}).status_code == 200
    after = encoder_counts()
    assert (after[0] - before[0], after[1] - before[1]) == (1, 5)  # five texts of one request: one encoder call


def test_no_content_in_logs(server, real_images, caplog):
    import logging

    secret = "Patient John Q Example, MRN 998877"
    with caplog.at_level(logging.DEBUG):
        httpx.post(server.url + "/v1/chat/completions", json=_chat(secret, max_tokens=3))
        httpx.post(server.url + "/v1/embeddings", json={"input": [secret]})
        httpx.post(server.url + "/v1/embeddings", json={"images": [_data_url(real_images[0])]})
        httpx.post(server.url + "/v1/chat/completions", json=_chat(secret, max_tokens="many"))
    assert caplog.records and all(secret not in r.getMessage() and "base64" not in r.getMessage()
                                  for r in caplog.records)


# -- auth, degraded bundles, the CLI, graceful shutdown ----------------------------------------------------------------
def test_api_key(bundle_fp32):
    s = ThreadServer([bundle_fp32], api_key=KEY)
    try:
        for path in ("/v1/models", "/metrics", "/ready"):
            assert _is_error(httpx.get(s.url + path), 401)["code"] == "invalid_api_key"
            assert httpx.get(s.url + path, headers={"Authorization": "Bearer wrong"}).status_code == 401
            assert httpx.get(s.url + path, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        assert _is_error(httpx.post(s.url + "/v1/embeddings", json={"input": "x"}), 401)
        assert httpx.get(s.url + "/health").status_code == 200  # liveness stays open
        from openai import AuthenticationError, OpenAI

        assert [m.id for m in OpenAI(base_url=s.url + "/v1", api_key=KEY).models.list()] == ["medsiglip-tiny"]
        with pytest.raises(AuthenticationError):
            OpenAI(base_url=s.url + "/v1", api_key="nope", max_retries=0).models.list()
    finally:
        s.stop()


def wait_ready(port: int, seconds: float = 60) -> str:
    """The URL of a `medc serve` subprocess on `port`, once /ready answers 200."""
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/ready").status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.1)
    return url


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_cli_refuses_degraded_and_shuts_down_gracefully(bundle_fp32, gemma_fp32, tmp_path):
    import shutil

    degraded = tmp_path / "degraded"
    shutil.copytree(bundle_fp32, degraded)
    manifest = json.loads((degraded / "manifest.json").read_text())
    manifest["components"]["image_encoder"]["fidelity"]["passed"] = False
    (degraded / "manifest.json").write_text(json.dumps(manifest))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "medc.cli", "serve"]
    res = subprocess.run(cmd + [str(degraded)], capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 2 and "--allow-degraded" in res.stderr and "Traceback" not in res.stderr

    port = _free_port()
    proc = subprocess.Popen(cmd + [f"gemma={gemma_fp32}", f"ms={degraded}", "--allow-degraded", "--port", str(port)],
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = wait_ready(port)
        assert [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]] == ["gemma", "ms"]
        with httpx.stream("POST", url + "/v1/chat/completions", timeout=60,
                          json=_chat(QUESTION, model="gemma", max_tokens=200, stream=True)) as r:
            lines = r.iter_lines()
            next(lines)
            proc.send_signal(signal.SIGTERM)  # mid-stream: the stream must still finish
            rest = [x for x in lines if x.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][6:])["choices"][0]["finish_reason"] in ("length", "stop")
        assert proc.wait(30) == 0 and "stopped: in-flight requests finished" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_serving_imports_no_torch(bundle_fp32):
    code = ("import sys; from medc.runtime.serve import ServeConfig, create_app, load_models; "
            f"create_app(load_models([{str(bundle_fp32)!r}], ServeConfig()), ServeConfig()).state.server.close(); "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "[]", res.stderr[-2000:]
