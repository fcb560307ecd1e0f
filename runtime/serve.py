"""`medc serve`: built bundles behind an OpenAI-compatible HTTP API (Starlette on uvicorn).

The HTTP layer (this file: one route table, parsing and validation, errors, auth, metrics, server-sent events) is
kept apart from inference (runtime/scheduler.py: micro-batching, continuous batching), which runs in worker threads,
never on the event loop. Starlette rather than FastAPI: every bad input must come back as an OpenAI-shaped 4xx, which
is simpler to validate by hand on seven routes than to bend pydantic's 422s into; Starlette is FastAPI's own core.
Beside the OpenAI routes, the Open Inference Protocol's (KServe V2: what Triton clients and KServe speak) serve the
encoder components as models of their own, with the same auth, limits and batching (their tensors: runtime/kserve.py).

The event loop's CPU time per request bounds what the server answers per second on a small CPU (it holds the GIL the
encoder threads need too), so the per-request path is kept lean: orjson for JSON (it writes float32 arrays directly;
the standard library's encoder took far more of the loop's time: benchmarks/results/design-measurements.md), request ids from a counter, and
the route table dispatched by one dict lookup (`App`) instead of Starlette's router and middleware stack.

Hostile input is bounded per request and per connection (tests/test_serve_limits.py): connections that send no
complete request in time, or that sit idle when a new one needs the room, are closed in the protocol layer
(runtime/connections.py); a body must arrive within --body-timeout (408); large bodies are parsed and validated in a
worker thread; stop strings, messages, content parts, max_tokens and a request's wall time are capped; images are
checked by their header before decoding, decoded reduced where they are large (runtime/preprocess.py), and decoded at
most one per core at a time; POST bodies must be JSON (no CORS-simple content types, which a web page may send
blind) and the Host header must name this server (DNS rebinding).

Privacy: prompts, images and DICOM content are never logged; log lines carry a request id, sizes and timings only.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import io
import itertools
import json
import logging
import math
import os
import re
import secrets
import time
import types
from bisect import bisect_left
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medc.errors import MedcError
from medc.manifest import Manifest
from medc.system import give_back_large_frees
from medc.runtime import kserve, load
from medc.runtime.batch import SamplingParams, Sequence
from medc.runtime.gemma import encode_messages
from medc.runtime import stow
from medc.runtime.imagelimits import ImageTooLarge, check_size
from medc.runtime.preprocess import open_image
from medc.runtime.scheduler import Closed, GenerationScheduler, MicroBatcher, QueueFull, gather_limit, gather_window
from medc.runtime.session import session_kind
from medc.runtime.textstream import TextStream

log = logging.getLogger("medc.serve")

_DATA_URL = re.compile(r"data:([\w.+/-]+)((?:;[\w=.+-]+)*),", re.ASCII)
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
# Request ids: a random prefix per process and a counter. uuid4 per request reads the OS's random source each time;
# ids only need to be unique in one server's log.
_ID_PREFIX = secrets.token_hex(4)
_ID_COUNTER = itertools.count(1)


def new_id() -> str:
    return f"{_ID_PREFIX}{next(_ID_COUNTER):08x}"


def json_response(content, status: int = 200, headers: dict | None = None):
    """A JSON response written by orjson; numpy arrays (embeddings) serialise as they are, float32 in its shortest
    round-trip form."""
    import orjson
    from starlette.responses import Response

    return Response(orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY), status, headers,
                    media_type="application/json")


def _sse(content) -> bytes:
    import orjson

    return b"data: " + orjson.dumps(content) + b"\n\n"


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_queue: int = 64  # requests waiting per chat model and per encoder
    max_batch: int = 16  # items per encoder call
    batch_window_ms: float = 3.0  # the most a batch waits for announced requests (gather_window lowers it)
    max_concurrency: int = 8  # sequences decoding together per chat model
    max_inflight: int = 128  # requests being read and prepared at once: bounds the memory held by bodies
    max_body_mb: float = 32.0
    max_image_mb: float = 16.0
    max_images: int = 8  # per request
    max_inputs: int = 256  # texts or labels per request
    default_max_tokens: int = 256
    max_tokens_cap: int = 4096  # new tokens one chat request may ask for, whatever the context leaves
    request_timeout: float = 600.0  # seconds a chat request may take, queue included; then it ends (finish "length")
    max_stops: int = 4
    max_stop_chars: int = 256  # per stop string: the stop matcher's work per token grows with it
    max_messages: int = 256
    max_content_parts: int = 512  # text and image parts, all messages together
    max_connections: int = 256  # open at once; at the cap a new one closes the longest-idle one
    header_timeout: float = 10.0  # seconds from connecting (or a kept-alive request's first byte) to full headers
    body_timeout: float = 30.0  # seconds from full headers to the whole body (else 408)
    allowed_hosts: tuple[str, ...] | None = None  # Host header names; None: loopback names when bound to loopback
    decode_concurrency: int | None = None  # images decoded at once; None: the CPU cores this process may use
    allow_degraded: bool = False
    trust: object = None  # medc.signing.Trust: bundles must be signed by one of its keys; None: MEDC_TRUSTED_KEYS
    threads: int | None = None
    shutdown_timeout: float = 60.0
    dicom_store: str | None = None  # folder of POST /dicomweb/studies (STOW-RS); None: the route answers 501
    max_stow_instances: int = 64  # application/dicom parts per STOW-RS request
    dicom: object = None  # runtime.dicom.DicomConfig for DICOM images (--dicom-config); None: the built-in recipes
    index: str | None = None  # embedding index folder of POST /v1/search and /v1/index (--index); None: they answer 501
    index_salt_file: str | None = None  # the site's salt for Patient ID hashes; None: MEDC_INDEX_SALT_FILE, if set


class ApiError(Exception):
    """An answer other than 200, in OpenAI's error shape, or under /v2 in the Open Inference Protocol's."""

    TYPES = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error", 503: "server_error"}
    CLOSE = {"Connection": "close"}  # the rest of a half-read body must not be read as the next request

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.headers = status, message, code, param, headers or {}

    def response(self, v2: bool = False):
        if v2:  # KServe V2: {"error": message}, which tritonclient raises as InferenceServerException(message)
            return json_response({"error": self.message}, self.status, self.headers)
        kind = self.TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")
        return json_response({"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}},
                             self.status, self.headers)


# -- models ---------------------------------------------------------------------------------------------------------
@dataclass
class ServedModel:
    id: str
    kind: str  # "chat" | "embeddings"
    pipeline: object
    created: int
    scheduler: GenerationScheduler | None = None
    texts: MicroBatcher | None = None
    images: MicroBatcher | None = None
    v2: dict[str, "V2Model"] = field(default_factory=dict)  # by V2 model name, "{id}.{component}"

    def encoders(self) -> list[tuple[str, MicroBatcher]]:
        """(queue label, batcher) of every encoder queue: the OpenAI routes' text and image, one per V2 model."""
        return [(what, b) for what, b in (("text", self.texts), ("image", self.images)) if b is not None] + [
            (f"v2:{v.component}", v.batcher) for v in self.v2.values()]

    def close(self, timeout: float | None = None) -> None:
        for worker in (self.scheduler, *(b for _, b in self.encoders())):
            if worker is not None:
                worker.close(timeout)
        self.pipeline.close()


@dataclass
class V2Model:
    """One bundle component served over the Open Inference Protocol: its graph's inputs and outputs, and the
    micro-batcher that runs it on the pipeline's own session (rows of concurrent requests in one call)."""

    signature: kserve.Signature
    component: str
    batcher: MicroBatcher


# The components served over V2: stateless encoders, one call per batch of rows. The decoder (its KV cache lives in
# the generation scheduler) and the token embeddings are parts of chat, not models of their own.
V2_COMPONENTS = ("image_encoder", "text_encoder", "vision_encoder")
PLATFORMS = {"onnxruntime": "onnxruntime_onnx", "tensorrt": "tensorrt_plan", "openvino": "openvino"}  # Triton's names


def _v2_runner(pipeline, component: str, sig: kserve.Signature):
    """A V2 model's micro-batcher function: the rows (one array per input each) stacked per input, the component
    run once, its outputs in the signature's order and dtypes (a tuple: one row per item each)."""
    names = [t.name for t in sig.inputs]
    outputs = [(t.name, kserve.DATATYPES[t.datatype]) for t in sig.outputs]

    def run(rows: list[tuple]) -> tuple:
        got = pipeline.run_component(component, {n: np.stack([r[i] for r in rows]) for i, n in enumerate(names)})
        return tuple(np.asarray(got[n]).astype(dtype, copy=False) for n, dtype in outputs)

    return run


def v2_models(m: ServedModel, cfg: ServeConfig) -> dict[str, V2Model]:
    """The V2 models of one served bundle, each with its micro-batcher."""
    out = {}
    bundle = m.pipeline.bundle
    for component in V2_COMPONENTS:
        entry = bundle.manifest.components.get(component)
        if entry is None:
            continue
        name = f"{m.id}.{component}"
        try:
            sig = kserve.Signature.from_specs(name, PLATFORMS[session_kind(bundle, component)], entry.inputs,
                                              entry.outputs)
        except MedcError as e:
            log.warning("%s is not served over V2: %s", name, e)
            continue
        batcher = MicroBatcher(_v2_runner(m.pipeline, component, sig), name, cfg.max_batch,
                               cfg.batch_window_ms / 1000, cfg.max_queue)
        twin = {"image_encoder": m.images, "text_encoder": m.texts}.get(component)
        if twin is not None:  # the same session as the OpenAI route's, measured at load: the same batch limit
            batcher.limit, batcher.window_s = twin.limit, twin.window_s
        else:
            # MedGemma's vision encoder is not measured at load (chat's warm-up runs no image): batches of at most
            # a chat request's images keep its activations within what chat already needs.
            batcher.limit = min(cfg.max_batch, cfg.max_images)
        out[name] = V2Model(sig, component, batcher)
    return out


def degraded(manifest) -> list[str]:
    """What failed its fidelity gate in this bundle (built with --allow-degraded); empty when all passed."""
    # Anything but an explicit pass is a failure: a manifest without "passed" was not written by a passing build.
    bad = [name for name, c in manifest.components.items() if c.fidelity.get("passed") is not True]
    gate = manifest.build.get("generation_gate")
    if gate is not None and gate.get("passed") is not True:
        bad.append("whole-model generation gate")
    return bad


def load_models(specs: list[str], cfg: ServeConfig) -> list[ServedModel]:
    """Bundles given as PATH or ID=PATH (the id defaults to the model name in the manifest), loaded and warmed up."""
    models: dict[str, ServedModel] = {}
    for spec in specs:
        name, _, path = spec.partition("=") if "=" in spec and not Path(spec).exists() else ("", "", spec)
        manifest = Manifest.read(Path(path))
        bad = degraded(manifest)
        if bad and not cfg.allow_degraded:
            raise MedcError(f"bundle {path} failed its fidelity gate ({', '.join(bad)}; built with --allow-degraded). "
                            "Serve it only knowingly: pass --allow-degraded.")
        model_id = name or manifest.model["name"]
        if bad:
            log.warning("serving %s although its fidelity gate failed (%s): --allow-degraded", model_id, ", ".join(bad))
        if model_id in models:
            raise MedcError(f"two bundles are named {model_id!r}; name them apart with ID=PATH.")
        pipeline = load(path, threads=cfg.threads, trust=cfg.trust)
        m = ServedModel(model_id, "chat" if hasattr(pipeline, "generate") else "embeddings", pipeline, int(time.time()))
        if m.kind == "chat":
            pipeline.generate_ids(["warm-up"], max_new_tokens=1)  # opens the sessions before the first request
            m.scheduler = GenerationScheduler(pipeline, model_id, cfg.max_concurrency, cfg.max_queue)
        else:
            p = pipeline.preprocess
            window = cfg.batch_window_ms / 1000
            m.texts = MicroBatcher(pipeline.embed_texts_counted, f"{model_id} text", cfg.max_batch, window,
                                   cfg.max_queue)
            m.images = MicroBatcher(lambda px, pl=pipeline: pl.embed_pixel_values(np.stack(px)), f"{model_id} image",
                                    cfg.max_batch, window, cfg.max_queue)
            samples = ((m.texts, "a chest radiograph"), (m.images, np.zeros((3, p.height, p.width), np.float32)))
            for batcher, sample in samples:
                # Opens the sessions before the first request and measures what batching pays (gather_limit);
                # with --max-batch 1 only the warm-up call runs.
                batcher.limit, per_item = gather_limit(batcher.fn, sample, cfg.max_batch)
                batcher.window_s = gather_window(per_item, batcher.limit, window)
                log.info("%s: gathering up to %d per call, waiting up to %.2f ms for announced requests (ms per "
                         "item by batch: %s)", batcher.name, batcher.limit, batcher.window_s * 1e3,
                         ", ".join(f"{k}: {v * 1e3:.2f}" for k, v in per_item.items()))
        m.v2 = v2_models(m, cfg)
        models[model_id] = m
        log.info("loaded %s (%s) from %s; over V2: %s", model_id, m.kind, path, ", ".join(m.v2) or "nothing")
    return list(models.values())


# -- metrics (Prometheus text format) -------------------------------------------------------------------------------
class Metrics:
    BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

    def __init__(self):
        self.requests = defaultdict(int)  # (route, code)
        self.hist = {}  # name -> {route: [bucket counts..., sum, count]}
        self.counters = defaultdict(int)  # (name, model)

    def observe(self, name: str, labels: str, seconds: float) -> None:
        h = self.hist.setdefault(name, {}).setdefault(labels, [0] * (len(self.BUCKETS) + 3))
        h[bisect_left(self.BUCKETS, seconds)] += 1
        h[-2] += seconds
        h[-1] += 1

    def request(self, route: str, status: int, seconds: float) -> None:
        self.requests[(route, status)] += 1
        self.observe("medc_request_duration_seconds", f'route="{route}"', seconds)

    def render(self, models: list[ServedModel]) -> str:
        out = ["# TYPE medc_requests_total counter"]
        out += [f'medc_requests_total{{route="{r}",code="{c}"}} {n}' for (r, c), n in sorted(self.requests.items())]
        out.append("# TYPE medc_request_errors_total counter")
        out += [f'medc_request_errors_total{{route="{r}",code="{c}"}} {n}'
                for (r, c), n in sorted(self.requests.items()) if c >= 400]
        for name, routes in sorted(self.hist.items()):
            out.append(f"# TYPE {name} histogram")
            for labels, h in sorted(routes.items()):
                total = 0
                for le, n in zip([*self.BUCKETS, "+Inf"], h):
                    total += n
                    out.append(f'{name}_bucket{{{labels},le="{le}"}} {total}')
                out += [f"{name}_sum{{{labels}}} {h[-2]:.6f}", f"{name}_count{{{labels}}} {h[-1]}"]
        for name in sorted({n for n, _ in self.counters}):
            out.append(f"# TYPE {name} counter")
            out += [f'{name}{{model="{_esc(m)}"}} {v}' for (n, m), v in sorted(self.counters.items()) if n == name]
        out.append("# TYPE medc_queue_depth gauge")
        for m in models:
            for what, worker in (("chat", m.scheduler), *m.encoders()):
                if worker is not None:
                    out.append(f'medc_queue_depth{{model="{_esc(m.id)}",queue="{what}"}} {worker.depth}')
        # Items over calls is the mean batch an encoder ran: what micro-batching achieves under the present load.
        for name, attr in (("medc_encoder_calls_total", "batches"), ("medc_encoder_items_total", "items")):
            out.append(f"# TYPE {name} counter")
            out += [f'{name}{{model="{_esc(m.id)}",queue="{what}"}} {getattr(worker, attr)}'
                    for m in models for what, worker in m.encoders()]
        out.append("# TYPE medc_generated_tokens_total counter")
        out += [f'medc_generated_tokens_total{{model="{_esc(m.id)}"}} {m.scheduler.tokens}'
                for m in models if m.scheduler]
        # Steps over tokens is the mean batch the decoder ran; mixed steps carried a new prompt beside decoding.
        for name, attr in (("medc_decoder_steps_total", "steps"), ("medc_mixed_decoder_steps_total", "mixed")):
            out.append(f"# TYPE {name} counter")
            out += [f'{name}{{model="{_esc(m.id)}"}} {getattr(m.scheduler, attr)}' for m in models if m.scheduler]
        out.append("# TYPE medc_generations_total counter")
        out += [f'medc_generations_total{{model="{_esc(m.id)}",finish="{why}"}} {n}'
                for m in models if m.scheduler for why, n in sorted(m.scheduler.finished.items())]
        out.append("# TYPE medc_active_generations gauge")
        out += [f'medc_active_generations{{model="{_esc(m.id)}"}} {m.scheduler.active}' for m in models if m.scheduler]
        return "\n".join(out) + "\n"


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


# -- request parsing ------------------------------------------------------------------------------------------------
PARSE_IN_THREAD = 64 * 1024  # bytes: a larger body is parsed and checked in a worker thread, off the event loop
# '{' and '[' in a large body, an upper bound on the JSON objects and arrays in it. orjson holds the GIL while it
# parses, in a worker thread too, so a body of millions of empty arrays would stall every route for seconds; this cap
# bounds that stall to milliseconds (benchmarks/results/serve-hostile-input.md).
MAX_CONTAINERS = 100_000


async def read_body(request, limit: int, timeout: float | None = None) -> bytearray:
    """The body, refusing more than `limit` bytes before reading them all, and one not whole within `timeout`
    seconds (408: a slow body must not hold its in-flight place for long)."""
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limit):
        raise ApiError(413, f"request body over the {limit // 2**20} MiB limit.", "body_too_large",
                       headers=ApiError.CLOSE)
    body = bytearray()
    task, expired = asyncio.current_task(), []
    # A timer that cancels this task (as asyncio.timeout does, without a task or a future per request).
    timer = None if timeout is None else asyncio.get_running_loop().call_later(
        timeout, lambda: expired.append(True) or task.cancel())
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise ApiError(413, f"request body over the {limit // 2**20} MiB limit.", "body_too_large",
                               headers=ApiError.CLOSE)
    except asyncio.CancelledError:
        if not expired:
            raise
        if hasattr(task, "uncancel"):  # Python 3.11+: this cancellation is handled
            task.uncancel()
        raise ApiError(408, f"the request body did not arrive within {timeout:g} s (--body-timeout).", "body_timeout",
                       headers=ApiError.CLOSE) from None
    finally:
        if timer is not None:
            timer.cancel()
    return body


async def read_json(request, limit: int, timeout: float | None = None, check=None):
    """The body as a JSON object, then `check(data)` (validation) if given: what check returns. Large bodies are
    parsed and checked in a worker thread."""
    body = await read_body(request, limit, timeout)
    if len(body) <= PARSE_IN_THREAD:
        data = parse_json(body)
        return check(data) if check else data
    from starlette.concurrency import run_in_threadpool

    def work():
        data = parse_json(body, large=True)
        return check(data) if check else data

    return await run_in_threadpool(work)


def parse_json(body: bytes, large: bool = False) -> dict:
    """A body as a JSON object; anything else a 400. `large`: first bounded by MAX_CONTAINERS (in a worker thread)."""
    import orjson

    if large and body.count(b"{") + body.count(b"[") > MAX_CONTAINERS:
        raise ApiError(400, f"the request body holds over {MAX_CONTAINERS:,} JSON objects and arrays; medc "
                            "refuses that many.", "too_many_json_values")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        try:  # what orjson refuses but Python's json reads: integers past 64 bits, NaN; a range check then names them
            data = json.loads(body)
            json.dumps(data, ensure_ascii=False).encode()  # a lone surrogate (\ud800) would fail every later encode
        except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError; RecursionError: [[[[...]]]]
            raise ApiError(400, "the request body is not valid JSON (or holds a lone UTF-16 surrogate escape).",
                           "invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object.", "invalid_json")
    return data


def _check_keys(body: dict, allowed: set[str]) -> None:
    for key in body:
        if key not in allowed:
            raise ApiError(400, f"unsupported parameter {str(key)[:64]!r}.", "unsupported_parameter", str(key)[:64])


def _get(body: dict, key: str, kind: type | tuple, default=None, lo=None, hi=None):
    """body[key] checked for type (bool is not a number) and range; None and absent both mean `default`."""
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) and kind is not bool or not isinstance(value, (int, float) if kind is float else kind):
        raise ApiError(400, f"{key} must be {_KIND_NAMES.get(kind, 'valid')}.", "invalid_type", key)
    if kind in (int, float) and (isinstance(value, float) and not math.isfinite(value)
                                 or lo is not None and value < lo or hi is not None and value > hi):
        raise ApiError(400, f"{key} must be between {lo} and {hi}.", "invalid_value", key)
    return value


_KIND_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "an array",
               dict: "an object"}


MAX_TEXT_CHARS = 20_000  # per embedding text or label: MedSigLIP reads 64 tokens; this only bounds tokenizer work


def _strings(value, key: str, limit: int) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ApiError(400, f"{key} must be a string or a non-empty array of strings.", "invalid_type", key)
    if len(value) > limit:
        raise ApiError(400, f"{key} holds {len(value)} items; at most {limit} per request.", "too_many_inputs", key)
    if not all(isinstance(v, str) for v in value):
        raise ApiError(400, f"{key} must hold strings only (token arrays are not supported).", "invalid_type", key)
    if any(len(v) > MAX_TEXT_CHARS for v in value):
        raise ApiError(400, f"{key}: a text is over {MAX_TEXT_CHARS:,} characters.", "input_too_long", key)
    return value


def _image_urls(value, key: str, limit: int) -> list[str]:
    if not isinstance(value, list) or not value:
        raise ApiError(400, f"{key} must be a non-empty array of image data URLs.", "invalid_type", key)
    if len(value) > limit:
        raise ApiError(400, f"{key} holds {len(value)} images; at most {limit} per request.", "too_many_images", key)
    return value


def decode_image(url, max_bytes: int, param: str, prep=None, dicom=None, slices: int | None = None):
    """A data URL -> a PIL image (PNG or JPEG), with `prep` (ImagePreprocessing) a large JPEG decoded at reduced
    scale; DICOM -> its middle frame as uint8 RGB, by `dicom` (a DicomConfig; None: the built-in recipes), or with
    `slices` K a list: a CT/MR multi-frame instance's K evenly spaced frames (runtime/dicom.py read_volume; one
    frame for other modalities). Every failure is a 4xx naming the problem, never the content."""
    mime, data = data_url_bytes(url, max_bytes, param)
    return decode_bytes(mime, data, param, prep, dicom, slices)


def data_url_bytes(url, max_bytes: int, param: str) -> tuple[str, bytes]:
    """A data URL's media type (lower case) and its bytes, decoded from base64: a type medc reads, the size
    within `max_bytes`. Every failure is a 4xx naming the problem, never the content."""
    if not isinstance(url, str):
        raise ApiError(400, f"{param} must be a data URL string.", "invalid_type", param)
    if url.startswith(("http://", "https://")):
        raise ApiError(400, "remote image URLs are not fetched (the server works offline); send the image inline "
                            "as data:image/png;base64,...", "unsupported_image_url", param)
    m = _DATA_URL.match(url)
    if not m or ";base64" not in m.group(2):
        raise ApiError(400, f"{param} is not a base64 data URL (data:image/png;base64,...).", "invalid_image_url",
                       param)
    mime = m.group(1).lower()
    if mime not in ("image/png", "image/jpeg", "image/jpg", "application/dicom"):
        raise ApiError(415, f"image type {mime[:40]!r} is not supported; send PNG, JPEG or DICOM "
                            "(data:application/dicom;base64,...).", "unsupported_media_type", param)
    payload = url[m.end():]
    if len(payload) * 3 // 4 > max_bytes:
        raise ApiError(413, f"an image is over the {max_bytes / 2**20:g} MiB limit.", "image_too_large", param)
    try:
        return mime, base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{param}: the base64 data is malformed.", "invalid_image", param) from None


def decode_bytes(mime: str, data: bytes, param: str, prep=None, dicom=None, slices: int | None = None):
    """`decode_image` for bytes already taken from a data URL (`data_url_bytes`)."""
    from PIL import UnidentifiedImageError

    if mime == "application/dicom":
        return _decode_dicom(data, param, dicom, slices)
    try:
        return open_image(io.BytesIO(data), param, prep, formats=["PNG", "JPEG"])
    except ImageTooLarge as e:
        raise ApiError(413, str(e), "image_too_large", param) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError):
        raise ApiError(400, f"{param} is not a readable PNG or JPEG image (corrupt or truncated).", "invalid_image",
                       param) from None


def _decode_dicom(data: bytes, param: str, config=None, k: int | None = None):
    """DICOM Part 10 bytes -> the middle frame's model-ready uint8 RGB, or with `k` a list of K evenly spaced
    slices' (a CT/MR volume; runtime/dicom.py, the same size limits as PNG/JPEG, checked from the header before
    decoding). Errors name the part, never the content."""
    from medc.runtime.dicom import UnsupportedTransferSyntax, read_dicom, read_volume

    try:
        if k is not None:
            return [im.pixels for im in read_volume(data, k, config, name=param)]
        return read_dicom(data, config, frames="middle", name=param)[0].pixels
    except ImageTooLarge as e:
        raise ApiError(413, str(e), "image_too_large", param) from None
    except UnsupportedTransferSyntax as e:
        raise ApiError(415, str(e), "unsupported_media_type", param) from None
    except MedcError as e:
        raise ApiError(400, str(e), "invalid_image", param) from None


def _pixels(pipeline, urls: list, cfg: ServeConfig, key: str, one: bool = False) -> np.ndarray:
    """In a worker thread (one of `Server.decoding`'s): decode and preprocess every image -> float32 [N, 3, H, W].
    `one`: `urls` is the single image of a request key that takes one (errors name `key`, not `key[0]`)."""
    limit, prep = int(cfg.max_image_mb * 2**20), pipeline.preprocess
    dicom = getattr(cfg, "dicom", None)
    return np.stack([prep.one(decode_image(u, limit, key if one else f"{key}[{i}]", prep, dicom))
                     for i, u in enumerate(urls)])


# -- chat -----------------------------------------------------------------------------------------------------------
_CHAT_KEYS = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "seed",
              "stop", "stream", "stream_options", "n", "user", "logprobs", "frequency_penalty", "presence_penalty",
              "ignore_eos", "slices"}  # top_k and ignore_eos (benchmarks: exactly max_tokens) as llama-server and vLLM take them
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def parse_messages(value, max_images: int, max_messages: int = 256, max_parts: int = 512) -> tuple[list[dict], list]:
    """OpenAI messages -> (messages in the chat template's form, image URLs in order)."""
    if not isinstance(value, list) or not value:
        raise ApiError(400, "messages must be a non-empty array.", "invalid_type", "messages")
    if len(value) > max_messages:
        raise ApiError(400, f"{len(value):,} messages; at most {max_messages} per request.", "too_many_messages",
                       "messages")
    out, urls, n_parts = [], [], 0
    for i, msg in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(msg, dict) or not isinstance(msg.get("role"), str) or msg["role"] not in _ROLES:
            raise ApiError(400, f"{where} needs a role: system, user or assistant.", "invalid_value", where)
        content = msg.get("content")
        if isinstance(content, str):
            out.append({"role": _ROLES[msg["role"]], "content": content})
            continue
        if not isinstance(content, list):
            raise ApiError(400, f"{where}.content must be a string or an array of parts.", "invalid_type", where)
        n_parts += len(content)
        if n_parts > max_parts:
            raise ApiError(400, f"over {max_parts} content parts; at most {max_parts} per request, all messages "
                                "together.", "too_many_content_parts", where)
        parts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append({"type": "text", "text": part["text"]})
            elif kind == "image_url":
                url = part.get("image_url")
                urls.append(url.get("url") if isinstance(url, dict) else url)
                parts.append({"type": "image"})
            else:
                raise ApiError(400, f"{where}.content[{j}] must be a text or image_url part.", "invalid_value", where)
        out.append({"role": _ROLES[msg["role"]], "content": parts})
    if len(urls) > max_images:
        raise ApiError(400, f"{len(urls)} images; at most {max_images} per request.", "too_many_images", "messages")
    return out, urls


class GenerationFailed(Exception):
    pass


@dataclass
class ChatRequest:
    messages: list[dict]  # in the chat template's form
    image_urls: list
    sampling: dict  # SamplingParams fields but max_new_tokens
    max_tokens: int | None  # None: the default, cut to the room the context leaves
    stop: list[str]
    stream: bool
    usage_in_stream: bool
    slices: int | None = None  # K per DICOM CT/MR volume; None: what fits (_chat_images)


def parse_chat(body: dict, model: ServedModel, cfg: ServeConfig) -> ChatRequest:
    _check_keys(body, _CHAT_KEYS)
    if _get(body, "n", int, 1) != 1:
        raise ApiError(400, "only n=1 is supported.", "unsupported_value", "n")
    if _get(body, "logprobs", bool, False):
        raise ApiError(400, "logprobs are not supported.", "unsupported_value", "logprobs")
    for key in ("frequency_penalty", "presence_penalty"):
        if _get(body, key, float, 0.0) != 0:
            raise ApiError(400, f"{key} is not supported (only 0).", "unsupported_value", key)
    limit = model.pipeline.assets.max_positions
    # Both are checked (a bad max_tokens is not ignored because max_completion_tokens is set); the newer name wins.
    newer, older = (_get(body, key, int, None, 1, limit) for key in ("max_completion_tokens", "max_tokens"))
    for key, value in (("max_completion_tokens", newer), ("max_tokens", older)):
        if value is not None and value > cfg.max_tokens_cap:
            raise ApiError(400, f"{key} is {value}; this server answers at most {cfg.max_tokens_cap} new tokens per "
                                "request (--max-tokens-cap).", "invalid_value", key)
    max_tokens = newer or older
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > cfg.max_stops or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, f"stop must be a string or up to {cfg.max_stops} non-empty strings.", "invalid_value",
                       "stop")
    if any(len(s) > cfg.max_stop_chars for s in stop):
        raise ApiError(400, f"a stop string is over the {cfg.max_stop_chars} character limit.", "stop_too_long",
                       "stop")
    # temperature defaults to 0 (greedy), not OpenAI's 1: the same question gets the same answer unless asked.
    sampling = dict(temperature=_get(body, "temperature", float, 0.0, 0, 2),
                    top_p=_get(body, "top_p", float, 1.0, 0, 1), top_k=_get(body, "top_k", int, 0, 0, 1 << 20),
                    seed=_get(body, "seed", int, None, 0, 2**63 - 1), ignore_eos=_get(body, "ignore_eos", bool, False))
    if sampling["top_p"] == 0:
        raise ApiError(400, "top_p must be above 0.", "invalid_value", "top_p")
    messages, urls = parse_messages(body.get("messages"), cfg.max_images, cfg.max_messages, cfg.max_content_parts)
    chars = sum(len(m["content"]) if isinstance(m["content"], str)
                else sum(len(p.get("text", "")) for p in m["content"]) for m in messages)
    if chars > 64 * limit:  # no tokenizer makes fewer tokens than that: refuse before tokenizing megabytes
        raise ApiError(400, f"the messages hold {chars:,} characters, far over this model's context limit of {limit} "
                            "tokens.", "context_length_exceeded", "messages")
    if urls and not model.pipeline.assets.mm_tokens_per_image:
        raise ApiError(400, f"model {model.id!r} is text-only: it takes no images.", "invalid_value", "messages")
    slices = _get(body, "slices", int, None, 1, cfg.max_images)  # without a DICOM image_url: nothing to slice
    return ChatRequest(messages, urls, sampling, max_tokens, stop, _get(body, "stream", bool, False),
                       bool(_get(body, "stream_options", dict, {}).get("include_usage")), slices)


def _is_dicom_url(url) -> bool:
    m = _DATA_URL.match(url) if isinstance(url, str) else None
    return bool(m) and m.group(1).lower() == "application/dicom"


def _expand_images(messages: list[dict], counts: list[int]) -> list[dict]:
    """The messages with their i-th image part repeated counts[i] times (a volume's slices, in order)."""
    it = iter(counts)
    return [m if isinstance(m["content"], str) else
            {**m, "content": [q for p in m["content"] for q in ([p] * next(it) if p["type"] == "image" else [p])]}
            for m in messages]


def _chat_images(pipeline, chat: ChatRequest, cfg: ServeConfig) -> tuple[list[int], np.ndarray]:
    """In a worker thread (under `Server.decoding`): prompt ids and the chat's images, decoded and preprocessed
    (float32 [N, 3, H, W]). A DICOM CT or MR volume (a multi-frame instance) becomes K evenly spaced slices, each
    windowed, its image part repeated K times, as MedGemma 1.5 reads CT/MR. K is the request's `slices`, else the
    most that fit, shared evenly among the request's DICOM images: every image of the request counts against
    max_images, and the prompt with max_tokens (else the default answer length) kept free must fit the context as
    bounded by the bundle's memory plan (runtime/gemma.py prompt_positions, the rule `medc run --slices` obeys).
    Each slice goes through the same byte, pixel and decode limits as any image."""
    from medc.runtime.gemma import image_tokens, prompt_positions

    assets, limit, prep = pipeline.assets, int(cfg.max_image_mb * 2**20), pipeline.preprocess
    urls, dicom = chat.image_urls, getattr(cfg, "dicom", None)
    volumes = {i for i, u in enumerate(urls) if _is_dicom_url(u)}
    reserve = chat.max_tokens or min(cfg.default_max_tokens, cfg.max_tokens_cap)
    positions = prompt_positions(assets)

    def length(k: int) -> int:  # prompt tokens were each volume K slices
        return len(encode_messages(assets, _expand_images(chat.messages, [k if i in volumes else 1
                                                                          for i in range(len(urls))])))

    fit = len(urls) + (positions - length(1) - reserve) // image_tokens(assets)  # images that fit, all together
    k = chat.slices
    if volumes and k is None:
        k = max(1, (min(fit, cfg.max_images) - (len(urls) - len(volumes))) // len(volumes))
        while k > 1 and length(k) + reserve > positions:  # image tokens are not quite additive in every tokenizer
            k -= 1
    images, counts = [], []
    for i, u in enumerate(urls):
        got = decode_image(u, limit, f"image_url[{i}]", prep, dicom, k if i in volumes else None)
        got = got if isinstance(got, list) else [got]
        counts.append(len(got))
        if sum(counts) > cfg.max_images:
            raise ApiError(400, f"over {cfg.max_images} images (a DICOM volume counts its slices); at most "
                                f"{cfg.max_images} per request: send fewer slices.", "too_many_images",
                           "slices" if chat.slices else "messages")
        images += [prep.one(g) for g in got]
    ids = encode_messages(assets, _expand_images(chat.messages, counts))
    if len(images) > len(urls) and len(ids) + reserve > positions:
        raise ApiError(400, f"{len(images)} images with these messages and {reserve} new tokens do not fit this "
                            f"model's {positions} positions (context and memory plan), which hold {max(fit, 1)}; "
                            "send fewer slices or a smaller max_tokens.", "context_length_exceeded", "slices")
    return ids, np.stack(images)


async def _deltas(events: asyncio.Queue, seq: Sequence, text: TextStream):
    """The scheduler's events for one request -> (text delta, finish reason or None). Tokens that queued up while
    the event loop was busy go out as one delta: under load, fewer and larger chunks, at no cost in latency."""
    while True:
        batch = [await events.get()]
        while not events.empty():
            batch.append(events.get_nowait())
        delta = ""
        for kind, value in batch:
            if kind == "token":
                piece, stopped = text.push(value)
                delta += piece
                if stopped:
                    seq.cancel("stop")
                    yield delta, "stop"
                    return
            elif kind == "done":
                rest, stopped = text.flush()
                yield delta + rest, "stop" if stopped else _FINISH.get(value, value)
                return
            else:
                raise GenerationFailed(value)
        if delta:
            yield delta, None


_FINISH = {"timeout": "length"}  # finish reasons clients know: a request cut at --request-timeout ends as "length"


def _chat_request(srv: "Server", body: dict) -> tuple[ServedModel, ChatRequest]:
    """The model (BASE or BASE:ADAPTER, a run-time LoRA adapter of BASE's bundle) and the parsed request."""
    name, adapter = body.get("model"), None
    if isinstance(name, str) and ":" in name and name not in srv.by_id:
        name, _, adapter = name.partition(":")
    model = srv.pick(name, "chat")
    if adapter is not None and adapter not in model.pipeline.adapters:
        have = ", ".join(f"{model.id}:{a}" for a in model.pipeline.adapters) or "none"
        raise ApiError(404, f"model {model.id!r} has no adapter {adapter[:80]!r} (its adapters: {have}).",
                       "model_not_found", "model")
    chat = parse_chat(body, model, srv.cfg)
    chat.sampling["adapter"] = adapter
    return model, chat


async def chat_completions(srv: "Server", request):
    from starlette.concurrency import run_in_threadpool

    t0 = time.perf_counter()
    model, chat = await read_json(request, srv.max_body, srv.cfg.body_timeout, lambda b: _chat_request(srv, b))
    model.scheduler.check()

    def prepare():  # in a worker thread: image decoding and the chat template are CPU work
        if chat.image_urls:
            return _chat_images(model.pipeline, chat, srv.cfg)
        return encode_messages(model.pipeline.assets, chat.messages), None

    if chat.image_urls:
        async with srv.decoding:
            ids, pixels = await run_in_threadpool(prepare)
    else:
        ids, pixels = await run_in_threadpool(prepare)
    limit = model.pipeline.assets.max_positions
    room = limit - len(ids)
    if room < 1 or (chat.max_tokens or 0) > room:
        raise ApiError(400, f"the prompt is {len(ids)} tokens and {chat.max_tokens or 1} new tokens were asked for; "
                            f"this model's context limit is {limit} tokens. Shorten the messages or max_tokens.",
                       "context_length_exceeded", "messages")
    default = min(srv.cfg.default_max_tokens, srv.cfg.max_tokens_cap, room)
    sampling = SamplingParams(max_new_tokens=chat.max_tokens or default, **chat.sampling)
    sampling.validate()

    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    seq = Sequence(ids, pixels, sampling, lambda kind, v: loop.call_soon_threadsafe(events.put_nowait, (kind, v)))
    model.scheduler.submit(seq)
    # The request's wall time, counted from its headers: past it the sequence ends at its next step (or leaves the
    # queue), as a client disconnect ends it, and the answer so far goes out.
    timer = loop.call_later(max(0.0, srv.cfg.request_timeout - (time.perf_counter() - t0)), seq.cancel, "timeout")
    srv.metrics.counters[("medc_prompt_tokens_total", model.id)] += len(ids)
    srv.metrics.counters[("medc_images_encoded_total", model.id)] += 0 if pixels is None else len(pixels)
    reply = _Reply(srv, request, model, seq, events, TextStream(model.pipeline.assets.tokenizer, chat.stop), timer)
    return await reply.stream(chat.usage_in_stream) if chat.stream else await reply.whole()


class _Reply:
    """One chat answer, whole (JSON) or streamed (server-sent events in OpenAI's chunk format, then [DONE])."""

    def __init__(self, srv: "Server", request, model: ServedModel, seq: Sequence, events, text: TextStream,
                 timer: asyncio.TimerHandle | None = None):
        self.srv, self.request, self.model, self.seq, self.events, self.text = srv, request, model, seq, events, text
        self.id, self.created, self.t0 = f"chatcmpl-{new_id()}", int(time.time()), time.perf_counter()
        self.timer = timer
        # The name the request used: BASE:ADAPTER for a run-time adapter's answer.
        adapter = seq.params.adapter
        self.name = f"{model.id}:{adapter}" if adapter else model.id

    def usage(self) -> dict:
        n, m = len(self.seq.ids), len(self.text.ids)
        return {"prompt_tokens": n, "completion_tokens": m, "total_tokens": n + m}

    def done(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        elapsed = time.perf_counter() - self.t0
        self.srv.metrics.request("/v1/chat/completions", 200, elapsed)
        if self.seq.finished == "timeout":
            log.warning("%s chat %s: ended at --request-timeout (%g s) after %d new tokens", self.request.state.rid,
                        self.model.id, self.srv.cfg.request_timeout, len(self.text.ids))
        log.info("%s chat %s: %d prompt + %d new tokens, %.0f ms, %s", self.request.state.rid, self.model.id,
                 len(self.seq.ids), len(self.text.ids), elapsed * 1e3, self.seq.finished or "client gone")

    async def whole(self):
        watch = asyncio.create_task(_cancel_on_disconnect(self.request, self.seq))
        pieces, finish = [], None
        try:
            async for delta, finish in _deltas(self.events, self.seq, self.text):
                pieces.append(delta)
        except GenerationFailed as e:
            raise ApiError(500, f"{e}; request id {self.request.state.rid}.", "inference_failed") from None
        finally:
            watch.cancel()
            self.seq.cancel()  # a no-op once it finished; otherwise (this task cancelled) it stops decoding
        self.done()
        return json_response({"id": self.id, "object": "chat.completion", "created": self.created,
                             "model": self.name, "choices": [{"index": 0, "finish_reason": finish, "message": {
                                 "role": "assistant", "content": "".join(pieces)}}], "usage": self.usage()})

    def _event(self, choices: list, **extra) -> bytes:
        return _sse({"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.name,
                     "choices": choices, **extra})

    async def stream(self, usage_in_stream: bool):
        from starlette.responses import StreamingResponse

        def chunk(delta: dict, finish=None) -> bytes:
            return self._event([{"index": 0, "delta": delta, "finish_reason": finish}])

        async def sse():
            first = True
            try:
                yield chunk({"role": "assistant", "content": ""})
                async for delta, finish in _deltas(self.events, self.seq, self.text):
                    if first:
                        self.srv.metrics.observe("medc_time_to_first_token_seconds", f'model="{_esc(self.model.id)}"',
                                                 time.perf_counter() - self.t0)
                        first = False
                    if delta:
                        yield chunk({"content": delta})
                    if finish:
                        yield chunk({}, finish)
                if usage_in_stream:
                    yield self._event([], usage=self.usage())
                yield b"data: [DONE]\n\n"
            except Exception as e:  # noqa: BLE001 - headers are gone: end with an error event, log the type only
                if not isinstance(e, GenerationFailed):
                    log.error("%s chat stream: internal error (%s)", self.request.state.rid, type(e).__name__)
                yield _sse({"error": {"message": f"inference failed; request id {self.request.state.rid}.",
                                      "type": "server_error", "param": None, "code": "inference_failed"}})
            finally:  # also on a client disconnect (Starlette cancels this generator): the sequence leaves its batch
                self.seq.cancel()
                self.done()

        return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _cancel_on_disconnect(request, seq: Sequence) -> None:
    while not seq.finished:
        await asyncio.sleep(0.1)
        if await request.is_disconnected():
            seq.cancel()
            return


# -- embeddings and zero-shot -----------------------------------------------------------------------------------------
async def _encode(batcher: MicroBatcher, items: list):
    return await batcher.submit(items)


async def _images(srv: "Server", model: ServedModel, value, key: str, one: bool = False) -> np.ndarray:
    """The image embeddings of a request's images (`one`: `value` is a single data URL, not an array of them)."""
    from starlette.concurrency import run_in_threadpool

    urls = [value] if one else _image_urls(value, key, srv.cfg.max_images)
    model.images.check()
    async with srv.decoding:
        with model.images.coming():
            pixels = await run_in_threadpool(_pixels, model.pipeline, urls, srv.cfg, key, one)
    srv.metrics.counters[("medc_images_encoded_total", model.id)] += len(urls)
    return await _encode(model.images, list(pixels))


def _embeddings_request(srv: "Server", body: dict):
    _check_keys(body, {"model", "input", "images", "encoding_format", "dimensions", "user"})
    model = srv.pick(body.get("model"), "embeddings")
    fmt = _get(body, "encoding_format", str, "float")
    if fmt not in ("float", "base64"):
        raise ApiError(400, "encoding_format must be float or base64.", "invalid_value", "encoding_format")
    if (body.get("input") is None) == (body.get("images") is None):
        raise ApiError(400, "give either input (texts) or images.", "invalid_value", "input")
    dim = model.pipeline.bundle.manifest.components["text_encoder"].outputs[0].shape[-1]
    if _get(body, "dimensions", int, dim) != dim:
        raise ApiError(400, f"dimensions must be {dim} for {model.id}.", "unsupported_value", "dimensions")
    texts = _strings(body["input"], "input", srv.cfg.max_inputs) if body.get("input") is not None else None
    return model, fmt, texts, body.get("images")


async def embeddings(srv: "Server", request):
    model, fmt, texts, images = await read_json(request, srv.max_body, srv.cfg.body_timeout,
                                                lambda b: _embeddings_request(srv, b))
    tokens = 0
    if texts is not None:
        vectors, counts = await _encode(model.texts, texts)  # counted as they are tokenized, in the worker
        tokens = sum(counts.tolist())  # not counts.sum(): numpy call overhead, on the loop
    else:
        vectors = await _images(srv, model, images, "images")
    encode = ((lambda v: base64.b64encode(v.astype("<f4").tobytes()).decode()) if fmt == "base64"
              else (lambda v: v))  # a float32 row: orjson writes it
    return json_response({"object": "list", "model": model.id,
                         "data": [{"object": "embedding", "index": i, "embedding": encode(v)}
                                  for i, v in enumerate(vectors)],
                         "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


def _classify_request(srv: "Server", body: dict):
    _check_keys(body, {"model", "images", "labels", "user"})
    model = srv.pick(body.get("model"), "embeddings")
    labels = _strings(body.get("labels"), "labels", srv.cfg.max_inputs)
    if not all(label.strip() for label in labels):
        raise ApiError(400, "labels must not be empty strings.", "invalid_value", "labels")
    return model, labels, body.get("images")


async def classify(srv: "Server", request):
    model, labels, images = await read_json(request, srv.max_body, srv.cfg.body_timeout,
                                            lambda b: _classify_request(srv, b))
    image_embeds = await _images(srv, model, images, "images")
    text_embeds, _ = await _encode(model.texts, labels)
    # SigLIP scores each label independently: sigmoid(exp(scale) * cos + bias), not a softmax over labels.
    probs = 1 / (1 + np.exp(-model.pipeline.logits(image_embeds, text_embeds)))
    data = [{"object": "classification", "index": i,
             "labels": [{"label": labels[j], "score": float(row[j])} for j in np.argsort(-row, kind="stable")]}
            for i, row in enumerate(probs)]
    return json_response({"object": "list", "model": model.id, "data": data})


# -- similar-case search: an embedding index (--index) -------------------------------------------------------------
MAX_K = 100
MAX_SOP_CHARS = 128  # a UID has at most 64; an image's key is "sha256:" and 64 hex digits
_SEARCH_KEYS = {"model", "image", "text", "sop_uid", "k", "filters", "user"}
_INDEX_KEYS = {"model", "images", "labels", "user"}  # no server-side paths: a client sends its images inline
_ITEM_FIELDS = ("sop_uid", "study_uid", "series_uid", "modality", "body_part", "study_date")


@dataclass
class SearchIndex:
    """The server's embedding index and the served model whose bundle made its vectors.

    The index is one SQLite connection and one in-memory graph: every call on it runs in `pool`, a single thread, so
    calls are serialised and none (SQLite, HNSW, a checkpoint that rewrites the graph file) runs on the event loop;
    requests waiting for the index hold no thread of the shared pool that decodes images."""

    index: object  # runtime.vectorindex.VectorIndex
    model: ServedModel
    salt: bytes | None
    pool: ThreadPoolExecutor
    saves: object  # runtime.retrieval.Checkpointer: when the graph file is rewritten
    closed: bool = False

    async def run(self, fn, *args):
        """fn(*args) in the index's thread."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, self._call, fn, args)

    def _call(self, fn, args):
        if self.closed:
            raise Closed("the server is shutting down; its index is closed.")
        return fn(*args)

    def add(self, items: list, vectors: np.ndarray) -> set[str]:
        """In the index's thread: add the items not indexed yet; returns the keys that already were (another
        request may have added one since this request looked)."""
        before = self.index.known([it.key for it in items])
        self.saves.added(self.index, self.index.add(items, vectors))
        return before

    def find(self, vector, sop_uid: str | None, k: int, filters: dict[str, str]) -> list:
        """In the index's thread: the k nearest hits to `vector`, or with `sop_uid` to that indexed item (itself
        left out)."""
        exclude = None
        if sop_uid is not None:
            try:
                exclude = self.index.find_sop(sop_uid)
            except MedcError:
                raise ApiError(404, "no indexed item has this SOP Instance UID (or key).", "item_not_found",
                               "sop_uid") from None
            vector = self.index.vector(exclude)
        return self.index.search(vector, k, filters, exclude)

    def close(self) -> None:
        """Write the graph and close the index, after the calls in progress."""
        def shut():
            if not self.closed:
                self.closed = True
                self.index.close()

        self.pool.submit(shut).result()
        self.pool.shutdown()


def open_search_index(models: list[ServedModel], cfg: ServeConfig) -> SearchIndex | None:
    """--index: the index opened, the served MedSigLIP model whose bundle made it found by manifest digest, the
    site's salt read and checked against the index. Refused here, at startup, never on a first request."""
    if cfg.index is None:
        return None
    from medc.runtime.retrieval import Checkpointer
    from medc.runtime.vectorindex import VectorIndex, read_salt

    salt = read_salt(cfg.index_salt_file)
    try:
        index = VectorIndex.open(cfg.index)
    except MedcError as e:
        if "open in another process" not in str(e):
            raise
        # A listener (or `medc index add`) writes it: search what it adds, as it adds it; adding is its job.
        index = VectorIndex.open(cfg.index, readonly=True)
        log.warning("index %s is written by another process (a listener?): this server searches it, and POST "
                    "/v1/index answers 409.", cfg.index)
    try:
        model = _index_owner(index, models)
        if salt is not None:
            try:
                index.check_salt(salt)
            except MedcError:
                raise MedcError(f"this is not the salt index {cfg.index} was made with: its patients' hashes would "
                                "not match. Give the site's salt file (--index-salt-file FILE or "
                                "MEDC_INDEX_SALT_FILE).") from None
    except BaseException:
        index.close()
        raise
    log.info("index %s: %d items, searched and added to with %s", cfg.index, len(index), model.id)
    if salt is None:
        log.warning("--index without --index-salt-file (or MEDC_INDEX_SALT_FILE): POST /v1/index refuses DICOM "
                    "instances that name a patient.")
    return SearchIndex(index, model, salt, ThreadPoolExecutor(1, thread_name_prefix="medc-index"), Checkpointer())


def _index_owner(index, models: list[ServedModel]) -> ServedModel:
    """The served MedSigLIP model whose bundle made `index`'s vectors (embeddings of two builds are not comparable)."""
    from medc.runtime.retrieval import bundle_record

    siglips = [m for m in models if m.kind == "embeddings"]
    if not siglips:
        raise MedcError(f"--index {index.path} needs the MedSigLIP bundle that made it among the bundles served; "
                        "none of them is a MedSigLIP bundle.")
    refusals = []
    for m in siglips:
        try:
            index.check_bundle(bundle_record(m.pipeline))
            return m
        except MedcError as e:
            refusals.append(e)
    if len(siglips) == 1:
        raise refusals[0]
    mine = index.bundle
    raise MedcError(f"index {index.path} holds embeddings of bundle {mine.get('name')!r} (manifest sha256 "
                    f"{mine.get('sha256', '?')[:16]}…), which none of the MedSigLIP bundles served "
                    f"({', '.join(m.id for m in siglips)}) is: embeddings of two builds are not comparable. Serve the "
                    "bundle that made the index, or create a new index for one of these.")


def _search_index(srv: "Server") -> SearchIndex:
    if srv.search is None:
        raise ApiError(501, "this server has no embedding index: start medc serve with --index INDEX (made with "
                            "`medc index create INDEX --bundle BUNDLE`).", "index_not_configured")
    return srv.search


def _index_model(srv: "Server", name) -> ServedModel:
    """The index's model; `model` may be left out, and when given must name it."""
    owner = srv.search.model
    if name is None:
        return owner
    model = srv.pick(name, "embeddings")
    if model is not owner:
        raise ApiError(400, f"the index holds embeddings of {owner.id!r}; those of {model.id!r} are not comparable "
                            f"with them: send model {owner.id!r}, or leave model out.", "invalid_value", "model")
    return model


@dataclass(frozen=True)
class SearchQuery:
    model: ServedModel
    image: str | None  # exactly one of image, text and sop_uid
    text: str | None
    sop_uid: str | None
    k: int
    filters: dict[str, str]


def _search_request(srv: "Server", body: dict) -> SearchQuery:
    from medc.runtime.vectorindex import FILTERS

    _check_keys(body, _SEARCH_KEYS)
    model = _index_model(srv, body.get("model"))
    given = [key for key in ("image", "text", "sop_uid") if body.get(key) is not None]
    if len(given) != 1:
        raise ApiError(400, "give exactly one query: image (a data URL), text, or sop_uid (the SOP Instance UID of an "
                            "indexed instance, or an item's key).", "invalid_value", given[1] if given else None)
    for key, limit in (("text", MAX_TEXT_CHARS), ("sop_uid", MAX_SOP_CHARS)):
        value = _get(body, key, str)
        if value is not None and (not value.strip() or len(value) > limit):
            raise ApiError(400, f"{key} must be 1 to {limit:,} characters, not only whitespace.", "invalid_value", key)
    filters = _get(body, "filters", dict, {})
    for name, value in filters.items():
        if name not in FILTERS:
            raise ApiError(400, f"cannot filter on {name[:64]!r}; filters: {', '.join(FILTERS)} (e.g. "
                                '{"modality": "CT"}).', "invalid_value", "filters")
        if not isinstance(value, str) or not value.strip() or len(value) > MAX_TEXT_CHARS:
            raise ApiError(400, f"filters.{name} must be a string of 1 to {MAX_TEXT_CHARS:,} characters, not only "
                                "whitespace.", "invalid_type", "filters")
    return SearchQuery(model, body.get("image"), body.get("text"), body.get("sop_uid"),
                       _get(body, "k", int, 10, 1, MAX_K), filters)


async def search(srv: "Server", request):
    """The k indexed items most like an image, a text or an indexed instance, best first (cosine)."""
    index = _search_index(srv)
    q = await read_json(request, srv.max_body, srv.cfg.body_timeout, lambda b: _search_request(srv, b))
    vector = None
    if q.image is not None:  # through the model's batchers: a query batches with other requests' images and texts
        vector = (await _images(srv, q.model, q.image, "image", one=True))[0]
    elif q.text is not None:
        vectors, _ = await _encode(q.model.texts, [q.text])
        vector = vectors[0]
    hits = await index.run(index.find, vector, q.sop_uid, q.k, q.filters)
    return json_response({"object": "list", "model": q.model.id, "results": [h.to_json() for h in hits]})


@dataclass(frozen=True)
class _Upload:
    """One image of POST /v1/index: its bytes as sent and the item they make (pixels not decoded yet)."""

    param: str
    mime: str
    data: bytes
    item: object  # runtime.vectorindex.Item


def _index_request(srv: "Server", body: dict) -> tuple[ServedModel, list, tuple[str, ...]]:
    _check_keys(body, _INDEX_KEYS)
    model = _index_model(srv, body.get("model"))
    urls = _image_urls(body.get("images"), "images", srv.cfg.max_images)
    labels = ()
    if body.get("labels") is not None:
        labels = tuple(_strings(body["labels"], "labels", srv.cfg.max_inputs))
        if not all(label.strip() for label in labels):
            raise ApiError(400, "labels must not be empty strings.", "invalid_value", "labels")
    return model, urls, labels


def _uploads(urls: list, cfg: ServeConfig, salt: bytes | None, labels: tuple[str, ...]) -> list[_Upload]:
    """In a worker thread (one of `Server.decoding`'s): each data URL checked and its item made, as `medc index add`
    makes it from a file: a DICOM instance's from its header (keyed by SOP Instance UID), a PNG's or JPEG's from the
    sha256 of its bytes. Known items are skipped before any pixels are decoded."""
    from medc.runtime.retrieval import SaltRequired, describe_bytes

    limit, out = int(cfg.max_image_mb * 2**20), []
    for i, url in enumerate(urls):
        param = f"images[{i}]"
        mime, data = data_url_bytes(url, limit, param)
        try:
            item = describe_bytes(data, mime == "application/dicom", param, salt, labels)
        except SaltRequired:
            raise ApiError(400, f"{param} is a DICOM instance that names a patient, and this server has no salt to "
                                "hash its Patient ID with (the hash is how a patient's data is found and deleted "
                                "later): start medc serve with --index-salt-file FILE, or set MEDC_INDEX_SALT_FILE "
                                "(`medc index salt FILE` makes one).", "salt_required", param) from None
        except MedcError as e:
            raise ApiError(400, str(e), "invalid_image", param) from None
        out.append(_Upload(param, mime, data, item))
    return out


def _upload_pixels(pipeline, uploads: list[_Upload], cfg: ServeConfig) -> np.ndarray:
    """In a worker thread (one of `Server.decoding`'s): the uploads decoded and preprocessed -> float32 [N, 3, H, W]."""
    prep, dicom = pipeline.preprocess, getattr(cfg, "dicom", None)
    return np.stack([prep.one(decode_bytes(u.mime, u.data, u.param, prep, dicom)) for u in uploads])


async def index_add(srv: "Server", request):
    """Images (PNG, JPEG, DICOM) embedded and added to the index, each once: a DICOM instance by its SOP Instance
    UID, an image by the sha256 of its bytes. `labels` go to the items added; an item already indexed keeps its own."""
    from starlette.concurrency import run_in_threadpool

    index = _search_index(srv)
    if index.index.readonly:
        raise ApiError(409, f"index {srv.cfg.index} is written by another process (a listener or `medc index add`): "
                            "this server only searches it. Send the images to that process, or stop it and restart "
                            "this server to add here.", "index_read_only", headers=ApiError.CLOSE)
    model, urls, labels = await read_json(request, srv.max_body, srv.cfg.body_timeout,
                                          lambda b: _index_request(srv, b))
    model.images.check()
    async with srv.decoding:
        uploads = await run_in_threadpool(_uploads, urls, srv.cfg, index.salt, labels)
    known = await index.run(index.index.known, [u.item.key for u in uploads])
    new: dict[str, _Upload] = {}  # by key: an image sent twice in one request is embedded once
    for u in uploads:
        if u.item.key not in known:
            new.setdefault(u.item.key, u)
    raced: set[str] = set()
    if new:
        todo = list(new.values())
        async with srv.decoding:
            with model.images.coming():
                pixels = await run_in_threadpool(_upload_pixels, model.pipeline, todo, srv.cfg)
        srv.metrics.counters[("medc_images_encoded_total", model.id)] += len(todo)
        vectors = await _encode(model.images, list(pixels))
        raced = await index.run(index.add, [u.item for u in todo], vectors)
    added = set(new) - raced
    srv.metrics.counters[("medc_index_items_added_total", model.id)] += len(added)
    items, seen = [], set()
    for i, u in enumerate(uploads):
        item = u.item
        items.append({"index": i, "key": item.key, "added": item.key in added and item.key not in seen,
                      **{f: getattr(item, f) for f in _ITEM_FIELDS if getattr(item, f) is not None}})
        seen.add(item.key)
    return json_response({"object": "index.add", "model": model.id, "added": len(added),
                         "known": len(uploads) - len(added), "items": items})


# -- DICOMweb: STOW-RS in, Structured Reports out -------------------------------------------------------------------
STOW_DEFAULT_LABELS = ("normal", "abnormal")
STOW_DEFAULT_PROMPT = "Describe the findings in this image."
_STOW_QUERY = {"model", "labels", "prompt", "max_tokens"}
# A prompt or labels in a URL: with percent-encoding (up to 12 bytes a character) they stay inside the 64 KiB header
# cap, so text over it is a 400 that names it, not a 431 for the whole request line.
MAX_QUERY_TEXT = 2000


@dataclass
class _Stowed:
    """One instance stored and decoded: what the model reads and what the answer and the SR name."""

    index: int
    header: stow.Header
    dataset: object  # pydicom Dataset without its pixel data: the SR's evidence
    image: object  # runtime.dicom.DicomImage
    pixels: np.ndarray  # float32 [3, H, W], the bundle's preprocessing applied


def _stow_query(srv: "Server", query) -> tuple[ServedModel, list[str], str, int | None]:
    """(model, labels, prompt, max_tokens) from the query string: `labels` repeated or comma separated."""
    for key in query.keys():
        if key not in _STOW_QUERY:
            raise ApiError(400, f"unsupported query parameter {key[:64]!r}.", "unsupported_parameter", key[:64])
    model_id = query.get("model") or None
    kind = "chat" if query.get("prompt") is not None or query.get("max_tokens") is not None else "embeddings"
    if model_id is None and not any(m.kind == kind for m in srv.models):
        kind = "chat" if kind == "embeddings" else kind
    if model_id is not None and model_id in srv.by_id:
        kind = srv.by_id[model_id].kind
    model = srv.pick(model_id, kind)
    if any(len(v) > MAX_QUERY_TEXT for v in query.getlist("labels")):
        raise ApiError(400, f"labels: over {MAX_QUERY_TEXT:,} characters in one parameter.", "input_too_long", "labels")
    labels = [x.strip() for v in query.getlist("labels") for x in v.split(",")] or list(STOW_DEFAULT_LABELS)
    if model.kind == "chat" and query.get("labels") is not None:
        raise ApiError(400, f"labels are for a MedSigLIP model; {model.id!r} answers a prompt.", "invalid_value",
                       "labels")
    if model.kind == "embeddings" and (query.get("prompt") is not None or query.get("max_tokens") is not None):
        raise ApiError(400, f"prompt and max_tokens are for a MedGemma model; {model.id!r} scores labels.",
                       "invalid_value", "prompt")
    _strings(labels, "labels", srv.cfg.max_inputs)
    if not all(labels):
        raise ApiError(400, "labels must not be empty strings.", "invalid_value", "labels")
    prompt = query.get("prompt", STOW_DEFAULT_PROMPT)
    if not prompt.strip() or len(prompt) > MAX_QUERY_TEXT:
        raise ApiError(400, f"prompt must be 1 to {MAX_QUERY_TEXT:,} characters.", "invalid_value", "prompt")
    max_tokens = query.get("max_tokens")
    if max_tokens is not None:
        if not max_tokens.isdigit() or not 1 <= int(max_tokens) <= srv.cfg.max_tokens_cap:
            raise ApiError(400, f"max_tokens must be an integer from 1 to {srv.cfg.max_tokens_cap}.",
                           "invalid_value", "max_tokens")
        max_tokens = int(max_tokens)
    return model, labels, prompt, max_tokens


def _stow_one(srv: "Server", model: ServedModel, part: stow.Part):
    """In a worker thread (one of `Server.decoding`'s): one part read from its header, its size checked, decoded,
    stored durably. A _Stowed, or stow.Refused (the instance is then not stored)."""
    from medc.runtime.dicom import read_dicom

    where = f"part {part.index}"
    try:
        if part.content_type not in ("application/dicom", ""):
            raise stow.Refused(stow.CANNOT_UNDERSTAND, f"{where} is {part.content_type[:60]!r}, not application/dicom.")
        h, ds = stow.header(part.data, where, check_size)
        try:
            image = read_dicom(bytes(part.data), name=where)[0]
            pixels = model.pipeline.preprocess.one(image.pixels)
        except (MedcError, ValueError, IndexError) as e:
            raise stow.Refused(stow.CANNOT_UNDERSTAND, f"{where}: the pixel data cannot be read "
                                                       f"({type(e).__name__}).", h.sop_class, h.sop) from None
        try:
            stow.store(srv.store / "instances", h, part.data)
        except OSError as e:
            log.error("DICOM store: an instance could not be written (%s)", type(e).__name__)
            raise stow.Refused(stow.OUT_OF_RESOURCES, "the instance could not be stored (disk full or not "
                                                      "writable).", h.sop_class, h.sop) from None
        return _Stowed(part.index, h, ds, image, pixels)
    except stow.Refused as e:
        return e


async def _stow_infer(srv: "Server", model: ServedModel, done: list[_Stowed], labels: list[str], prompt: str,
                      max_tokens: int | None, rid: str) -> list[dict]:
    """The served model on every stored instance: MedSigLIP through the image and text micro-batchers, MedGemma
    through the generation scheduler (at most --max-concurrency of this request's at once)."""
    if not done:
        return []
    if model.kind == "embeddings":
        image_embeds = await _encode(model.images, [d.pixels for d in done])
        text_embeds, _ = await _encode(model.texts, labels)
        probs = 1 / (1 + np.exp(-model.pipeline.logits(image_embeds, text_embeds)))
        return [{"scores": {labels[j]: float(row[j]) for j in np.argsort(-row, kind="stable")}} for row in probs]
    from starlette.concurrency import run_in_threadpool

    room = model.pipeline.assets.max_positions
    ids = await run_in_threadpool(encode_messages, model.pipeline.assets, [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}])
    if len(ids) >= room:
        raise ApiError(400, f"the prompt with its image is {len(ids)} tokens; this model's context limit is {room}.",
                       "context_length_exceeded", "prompt")
    n = min(max_tokens or srv.cfg.default_max_tokens, srv.cfg.max_tokens_cap, room - len(ids))
    loop, gate = asyncio.get_running_loop(), asyncio.Semaphore(srv.cfg.max_concurrency)
    deadline = time.monotonic() + srv.cfg.request_timeout

    async def one(d: _Stowed) -> dict:
        async with gate:
            events: asyncio.Queue = asyncio.Queue()
            seq = Sequence(ids, d.pixels[None], SamplingParams(max_new_tokens=n),
                           lambda kind, v: loop.call_soon_threadsafe(events.put_nowait, (kind, v)))
            model.scheduler.submit(seq)
            timer = loop.call_later(max(0.0, deadline - time.monotonic()), seq.cancel, "timeout")
            text, finish = TextStream(model.pipeline.assets.tokenizer, []), None
            pieces = []
            try:
                async for delta, finish in _deltas(events, seq, text):
                    pieces.append(delta)
            except GenerationFailed:
                raise ApiError(500, f"inference failed; request id {rid}.", "inference_failed") from None
            finally:
                timer.cancel()
                seq.cancel()
            srv.metrics.counters[("medc_generated_tokens_stow_total", model.id)] += len(text.ids)
            return {"prompt": prompt, "text": "".join(pieces), "finish_reason": finish}

    return list(await asyncio.gather(*(one(d) for d in done)))


def _stow_sr(srv: "Server", model: ServedModel, d: _Stowed, out: dict):
    """In a worker thread: the result as a Comprehensive 3D SR (runtime/sr.py), stored under the store's sr/ folder
    where GET /dicomweb/studies/{study}/series/{series}/instances/{instance} answers it. Its UIDs, or None when no
    SR could be made from this source (logged by type, without content)."""
    from medc.runtime.sr import AiResult, make_sr

    info = srv.sr_info(model)
    result = AiResult(model=info["name"], bundle_sha256=info["sha256"], precision=info["precision"],
                      scores=out.get("scores") or {}, text=out.get("text"), prompt=out.get("prompt"),
                      clinical_use=info["clinical_use"], degraded=info["degraded"])
    try:
        sr = make_sr([d.dataset], result)
        buf = io.BytesIO()
        sr.save_as(buf, enforce_file_format=True)
    except Exception as e:  # noqa: BLE001 - highdicom refuses some sources; the instance is stored all the same
        log.warning("DICOM SR: not written for one instance (%s)", type(e).__name__)
        return None
    h = stow.Header(str(sr.StudyInstanceUID), str(sr.SeriesInstanceUID), str(sr.SOPInstanceUID), str(sr.SOPClassUID),
                    0, 0, 1)
    stow.store(srv.store / "sr", h, buf.getbuffer())
    return h


async def stow_studies(srv: "Server", request):
    """STOW-RS (PS3.18 10.5): every application/dicom part checked, stored durably, run through the model; the
    Store Instances Response (200 all stored, 202 some, 409 none) with medc's results."""
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import Response

    if srv.store is None:
        raise ApiError(501, "this server stores no DICOM: start medc serve with --dicom-store DIR to accept STOW-RS.",
                       "dicom_store_not_configured", headers=ApiError.CLOSE)
    model, labels, prompt, max_tokens = _stow_query(srv, request.query_params)
    try:
        sep = stow.boundary(request.headers.get("content-type"))
    except stow.UnsupportedType as e:
        raise ApiError(415, str(e), "unsupported_media_type", headers=ApiError.CLOSE) from None
    except stow.MultipartError as e:
        raise ApiError(400, str(e), "invalid_multipart", headers=ApiError.CLOSE) from None
    (model.images or model.scheduler).check()
    body = await read_body(request, srv.max_body, srv.cfg.body_timeout)
    try:
        parts = await run_in_threadpool(stow.split, body, sep, srv.cfg.max_stow_instances)
    except stow.TooManyParts as e:
        raise ApiError(400, str(e), "too_many_instances") from None
    except stow.MultipartError as e:
        raise ApiError(400, str(e), "invalid_multipart") from None

    async def take(part):
        async with srv.decoding:
            return await run_in_threadpool(_stow_one, srv, model, part)

    if model.images is not None:
        with model.images.coming():
            taken = await asyncio.gather(*(take(p) for p in parts))
    else:
        taken = await asyncio.gather(*(take(p) for p in parts))
    done = [t for t in taken if isinstance(t, _Stowed)]
    srv.metrics.counters[("medc_dicom_instances_stored_total", model.id)] += len(done)
    srv.metrics.counters[("medc_dicom_instances_failed_total", model.id)] += len(taken) - len(done)
    outs = await _stow_infer(srv, model, done, labels, prompt, max_tokens, request.state.rid)
    base = str(request.base_url).rstrip("/") + "/dicomweb/studies"
    results, by_index = [], {d.index: (d, o) for d, o in zip(done, outs)}
    for t in taken:
        if isinstance(t, stow.Refused):
            results.append({"index": len(results), "status": "failed", "sop_class_uid": t.sop_class or None,
                            "sop_instance_uid": t.sop or None, "failure_reason": t.reason, "message": t.message})
            continue
        d, out = by_index[t.index]
        h, ref = d.header, d.image.ref
        sr = await run_in_threadpool(_stow_sr, srv, model, d, out)
        item = {"index": t.index, "status": "stored", "study_instance_uid": h.study, "series_instance_uid": h.series,
                "sop_instance_uid": h.sop, "sop_class_uid": h.sop_class, "modality": ref.modality or None,
                "frame": ref.frame, **out, "sr": None}
        if "scores" in out:
            item["scores"] = [{"label": k, "score": v} for k, v in out["scores"].items()]
        if sr is not None:
            item["sr"] = {"study_instance_uid": sr.study, "series_instance_uid": sr.series,
                          "sop_instance_uid": sr.sop, "sop_class_uid": sr.sop_class,
                          "retrieve_url": f"{base}/{sr.study}/series/{sr.series}/instances/{sr.sop}"}
        results.append(item)
    info = srv.sr_info(model)
    trusted = info["clinical_use"] and not info["degraded"]
    medc = {"object": "dicomweb.store", "model": model.id, "clinical_use": trusted, "results": results}
    failed = [(t.sop_class, t.sop, t.reason) for t in taken if isinstance(t, stow.Refused)]
    stored = [(d.header.sop_class, d.header.sop, None) for d in done]
    import orjson

    log.info("%s STOW-RS %s: %d parts, %d stored, %d failed", request.state.rid, model.id, len(parts), len(done),
             len(failed))
    accept = request.headers.get("accept", "")
    if "application/json" in accept and "application/dicom+json" not in accept:
        status, dataset = stow.response(stored, failed, None)
        return json_response({**medc, "status": status, "stow": dataset}, status)
    status, dataset = stow.response(stored, failed, None, orjson.dumps(medc).decode())
    return Response(orjson.dumps(dataset), status, media_type="application/dicom+json")


async def retrieve_instance(srv: "Server", request):
    """WADO-RS Retrieve Instance (PS3.18 10.4) for the SRs this server wrote: multipart/related with one
    application/dicom part. Stored source instances are not served back (medc is not a PACS)."""
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import Response

    if srv.store is None:
        raise ApiError(501, "this server stores no DICOM: start medc serve with --dicom-store DIR.",
                       "dicom_store_not_configured")
    p = request.path_params
    try:
        path = stow.instance_path(srv.store / "sr", p["study"], p["series"], p["instance"])
        data = await run_in_threadpool(path.read_bytes)
    except (ValueError, OSError):
        raise ApiError(404, "no such instance among the Structured Reports this server wrote.",
                       "instance_not_found") from None
    sep = new_id()
    body = b"".join((b"--", sep.encode(), b"\r\nContent-Type: application/dicom\r\n\r\n", data, b"\r\n--",
                     sep.encode(), b"--\r\n"))
    return Response(body, media_type=f'multipart/related; type="application/dicom"; boundary={sep}')


# -- the Open Inference Protocol (KServe V2) -----------------------------------------------------------------------
# Triton clients (tritonclient, perf_analyzer) and KServe's V2 data plane, beside the OpenAI routes: the encoder
# components as models of their own, named "{model id}.{component}", with their graphs' input and output names. The
# tensors' codec is runtime/kserve.py; auth, limits and errors are the server's, errors in V2's shape.
def _v2_model(srv: "Server", request) -> V2Model:
    """The V2 model a path names (and its version, where it names one: only "1")."""
    name, version = request.path_params["name"], request.path_params.get("version")
    model = srv.v2.get(name)
    if model is None:
        raise ApiError(404, f"model {name[:80]!r} is not served here over V2; use one of "
                            f"{', '.join(srv.v2) or '(none served)'}.", "model_not_found", "model")
    if version is not None and version != kserve.VERSION:
        raise ApiError(404, f"model {name} has no version {version[:20]!r}; each bundle is one version, "
                            f"{kserve.VERSION!r} (or leave /versions/... out).", "model_not_found", "model")
    return model


def _empty():
    """200 with an empty body: what Triton answers a health or readiness probe."""
    from starlette.responses import Response

    return Response(status_code=200)


def _not_closing(srv: "Server") -> None:
    if srv.closing:
        raise ApiError(503, "shutting down.", "shutting_down", headers={"Retry-After": "5"})


async def v2_server(srv: "Server", request):
    from medc import __version__

    return json_response({"name": "medc", "version": __version__, "extensions": ["binary_tensor_data"]})


async def v2_live(srv: "Server", request):
    return _empty()


async def v2_ready(srv: "Server", request):
    _not_closing(srv)  # the models load before the server listens: ready until it begins to close
    return _empty()


async def v2_model(srv: "Server", request):
    return json_response(_v2_model(srv, request).signature.metadata())


async def v2_model_ready(srv: "Server", request):
    _v2_model(srv, request)
    _not_closing(srv)
    return _empty()


async def v2_infer(srv: "Server", request):
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import Response

    model = _v2_model(srv, request)
    model.batcher.check()
    body = await read_body(request, srv.max_body, srv.cfg.body_timeout)
    length = request.headers.get("inference-header-content-length")

    def decode() -> kserve.InferRequest:
        head, tail = kserve.split_body(body, length)
        try:
            header = parse_json(head, large=len(head) > PARSE_IN_THREAD)
        except ApiError as e:
            if e.code != "invalid_json":
                raise
            if length is None:
                raise ApiError(400, f"{e.message} A body of JSON followed by binary tensors needs the "
                                    "Inference-Header-Content-Length header: the JSON's length in bytes.",
                               "invalid_json") from None
            raise ApiError(400, f"the body's first {len(head)} bytes (Inference-Header-Content-Length) are not a "
                                "JSON object: the header must give the JSON's length exactly, and be left out when "
                                "no tensor is binary.", "invalid_json") from None
        return kserve.decode_request(header, tail, model.signature, srv.cfg.max_inputs)

    large = len(body) > PARSE_IN_THREAD
    infer = await run_in_threadpool(decode) if large else decode()
    outputs = await _encode(model.batcher, list(zip(*infer.inputs)))  # one item per row
    srv.metrics.counters[("medc_v2_inferred_rows_total", model.signature.name)] += infer.rows
    results = dict(zip((t.name for t in model.signature.outputs), outputs))
    if sum(a.nbytes for a in results.values()) > PARSE_IN_THREAD:
        content, header_length = await run_in_threadpool(kserve.encode_response, infer, model.signature, results)
    else:
        content, header_length = kserve.encode_response(infer, model.signature, results)
    if header_length is None:
        return Response(content, media_type="application/json")
    return Response(content, media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(header_length)})


# -- small routes ---------------------------------------------------------------------------------------------------
async def health(srv: "Server", request):
    return json_response({"status": "ok"})


async def ready(srv: "Server", request):
    if srv.closing:
        raise ApiError(503, "shutting down.", "shutting_down", headers={"Retry-After": "5"})
    return json_response({"status": "ready", "models": [m.id for m in srv.models]})


async def list_models(srv: "Server", request):
    data = []
    for m in srv.models:
        data.append({"id": m.id, "object": "model", "created": m.created, "owned_by": "medc", "kind": m.kind})
        adapters = m.pipeline.adapters if m.kind == "chat" else {}
        data += [{"id": f"{m.id}:{a}", "object": "model", "created": m.created, "owned_by": "medc", "kind": m.kind,
                  "parent": m.id} for a in adapters]  # run-time LoRA adapters: BASE:ADAPTER
    return json_response({"object": "list", "data": data})


async def metrics(srv: "Server", request):
    from starlette.responses import PlainTextResponse

    return PlainTextResponse(srv.metrics.render(srv.models), media_type="text/plain; version=0.0.4")


# (schema in runtime/openapi.json, keyword, ServeConfig field): the document holds the defaults, a server its own.
OPENAPI_LIMITS = (("Images", "maxItems", "max_images"), ("TextList", "maxItems", "max_inputs"),
                  ("LabelList", "maxItems", "max_inputs"), ("Messages", "maxItems", "max_messages"),
                  ("ContentParts", "maxItems", "max_content_parts"), ("StopList", "maxItems", "max_stops"),
                  ("StopString", "maxLength", "max_stop_chars"), ("Slices", "maximum", "max_images"))


def openapi_document(cfg: ServeConfig, models: list[ServedModel]) -> bytes:
    """runtime/openapi.json (written by hand, kept true by tests/test_openapi.py) with this server's limits filled in:
    what GET /openapi.json answers."""
    from importlib import resources

    import orjson

    doc = json.loads(resources.files("medc.runtime").joinpath("openapi.json").read_text("utf-8"))
    schemas = doc["components"]["schemas"]
    for name, keyword, setting in OPENAPI_LIMITS:
        schemas[name][keyword] = getattr(cfg, setting)
    # max_tokens over a model's context or over the cap is refused; the largest context served bounds them all.
    contexts = [m.pipeline.assets.max_positions for m in models if m.kind == "chat"]
    schemas["MaxTokens"]["maximum"] = min([cfg.max_tokens_cap, *([max(contexts)] if contexts else [])])
    names = [name for m in models for name in m.v2]
    if names:  # the V2 models served, by name: what a client (or a fuzzer) may put in a /v2/models/{name} path
        schemas["V2ModelName"]["enum"] = names
    return orjson.dumps(doc)


async def openapi(srv: "Server", request):
    from starlette.responses import Response

    return Response(srv.openapi, media_type="application/json")


# The route table: (method, path, handler, needs the API key when one is set).
ROUTES = [
    ("GET", "/health", health, False),
    ("GET", "/ready", ready, True),
    ("GET", "/metrics", metrics, True),
    ("GET", "/v1/models", list_models, True),
    ("POST", "/v1/chat/completions", chat_completions, True),
    ("POST", "/v1/embeddings", embeddings, True),
    ("POST", "/v1/classify", classify, True),
    ("POST", "/v1/search", search, True),
    ("POST", "/v1/index", index_add, True),
    ("POST", "/dicomweb/studies", stow_studies, True),
    ("GET", "/dicomweb/studies/{study}/series/{series}/instances/{instance}", retrieve_instance, True),
    ("GET", "/openapi.json", openapi, False),
    # KServe V2 (the Open Inference Protocol): the probes are open, as Kubernetes sends them without a key.
    ("GET", "/v2", v2_server, True),
    ("GET", "/v2/health/live", v2_live, False),
    ("GET", "/v2/health/ready", v2_ready, False),
    ("GET", "/v2/models/{name}", v2_model, True),
    ("GET", "/v2/models/{name}/ready", v2_model_ready, True),
    ("POST", "/v2/models/{name}/infer", v2_infer, True),
    ("GET", "/v2/models/{name}/versions/{version}", v2_model, True),
    ("GET", "/v2/models/{name}/versions/{version}/ready", v2_model_ready, True),
    ("POST", "/v2/models/{name}/versions/{version}/infer", v2_infer, True),
]


# -- the server -------------------------------------------------------------------------------------------------------
class Server:
    def __init__(self, models: list[ServedModel], cfg: ServeConfig):
        self.models, self.cfg = models, cfg
        self.by_id = {m.id: m for m in models}
        self.v2 = {name: v for m in models for name, v in m.v2.items()}  # KServe V2 models by name
        self.metrics = Metrics()
        self.max_body = int(cfg.max_body_mb * 2**20)
        self.inflight = 0
        self.closing = False
        self.hosts = allowed_hosts(cfg)
        # Image decoding and preprocessing, at most one per core at a time: waiting requests hold no thread and no
        # decoded pixels (20 small-file 50 MP images at once took +2.5 GiB before).
        self.decoding = asyncio.Semaphore(cfg.decode_concurrency or _cores())
        self.openapi = openapi_document(cfg, models)  # built once, answered by GET /openapi.json
        self.store = Path(cfg.dicom_store) if cfg.dicom_store else None  # STOW-RS: instances/ and sr/ under it
        self.search = open_search_index(models, cfg)  # --index: /v1/search and /v1/index; None: they answer 501
        self._sr_info: dict[str, dict] = {}

    def sr_info(self, model: ServedModel) -> dict:
        """What an SR records of the model that made it (as `medc listen` does): name, bundle digest, precision,
        whether its weights are meant for clinical use, components that failed their gate."""
        if model.id not in self._sr_info:
            from medc.manifest import read_json_file
            from medc.signing import digest

            bundle = model.pipeline.bundle
            m = bundle.manifest
            self._sr_info[model.id] = {
                "name": m.model["name"], "sha256": digest(read_json_file(Path(bundle.path))),
                "precision": ",".join(sorted({c.precision for c in m.components.values()})),
                "clinical_use": m.model.get("clinical_use", True) is not False
                and m.model.get("source", {}).get("kind") not in ("random", "tiny"),
                "degraded": degraded(m)}
        return self._sr_info[model.id]

    def pick(self, name, kind: str) -> ServedModel:
        """The model a request names; it may be left out when one model of that kind is served."""
        fitting = [m.id for m in self.models if m.kind == kind]
        if name is None and len(fitting) == 1:
            return self.by_id[fitting[0]]
        if not isinstance(name, str):
            raise ApiError(400, f"model is required: one of {', '.join(fitting) or '(none served)'}.", "invalid_value",
                           "model")
        m = self.by_id.get(name)
        if m is None or m.kind != kind:
            raise ApiError(404, f"model {name[:80]!r} is not served here for this route; use one of "
                                f"{', '.join(fitting) or '(none served)'}.", "model_not_found", "model")
        return m

    def authorized(self, request) -> bool:
        if self.cfg.api_key is None:
            return True
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        # Constant-time compare: the time taken tells nothing about how much of the key was right.
        return hmac.compare_digest(token.strip().encode(), self.cfg.api_key.encode()) and scheme.lower() == "bearer"

    def endpoint(self, path: str, handler, needs_key: bool, body_type=None):
        """The route's handler with what every route shares: request id, API key, in-flight cap, the body's
        Content-Type (`body_type(value) -> bool`, None: not checked), errors shaped, metrics and the log line."""
        v2 = _is_v2(path)

        async def run(request):
            rid = request.headers.get("x-request-id", "")
            rid = rid if _REQUEST_ID.fullmatch(rid) else new_id()
            request.state.rid = rid
            t0 = time.perf_counter()
            self.inflight += 1
            try:
                if needs_key and not self.authorized(request):
                    raise ApiError(401, "missing or wrong API key: send Authorization: Bearer KEY.", "invalid_api_key",
                                   headers={"WWW-Authenticate": "Bearer"})
                if self.inflight > self.cfg.max_inflight:  # refused before its body is read: memory stays bounded
                    raise ApiError(503, "too many requests in progress; retry shortly.", "overloaded",
                                   headers={"Retry-After": "1"})
                if body_type is not None and not body_type(request.headers.get("content-type")):
                    # text/plain, forms and multipart are what a web page may POST to any origin without asking
                    # (no CORS preflight): refusing them keeps a keyless server on loopback out of a browser's reach.
                    raise ApiError(415, "the request body must be JSON: send it with Content-Type: application/json "
                                        "(curl: -H 'Content-Type: application/json')"
                                   + (", or JSON then binary tensors as application/octet-stream." if v2 else "."),
                                   "unsupported_media_type", headers=ApiError.CLOSE)
                response = await handler(self, request)
            except ApiError as e:
                response = e.response(v2)
            except QueueFull as e:
                response = ApiError(429, str(e), "queue_full", headers={"Retry-After": str(e.retry_after)}).response(v2)
            except Closed as e:
                response = ApiError(503, str(e), "shutting_down", headers={"Retry-After": "5"}).response(v2)
            except MedcError as e:  # the runtime's own checks of user input (template roles, sampling ranges, ...)
                response = ApiError(400, str(e), "invalid_request").response(v2)
            except Exception as e:  # noqa: BLE001 - a bug: a generic 500, the type name in the log, no content
                log.error("%s %s: internal error (%s)", rid, path, type(e).__name__)
                response = ApiError(500, f"internal error; request id {rid}.", "internal_error").response(v2)
            finally:
                self.inflight -= 1
            response.headers["x-request-id"] = rid
            if response.media_type != "text/event-stream":  # a stream records itself when it ends
                self.metrics.request(path, response.status_code, time.perf_counter() - t0)
                log.info("%s %s %s %d, %s bytes in, %.1f ms", rid, request.method, path, response.status_code,
                         request.headers.get("content-length", "0"), (time.perf_counter() - t0) * 1e3)
            return response

        return run

    def close(self) -> None:
        """Graceful: every queued and running request finishes before the workers stop."""
        self.closing = True
        for m in self.models:
            m.close(self.cfg.shutdown_timeout)
        if self.search is not None:  # after the models: a request still embedding adds to the index at its end
            self.search.close()


class App:
    """The ASGI app: the route table in one dict, {path: {method: endpoint}}, looked up per request.

    Not Starlette's Router and its middleware stack: `Server.endpoint` already turns every exception into an
    OpenAI-shaped answer, so Starlette's error middlewares had nothing left to catch, yet they, the router and their
    send wrappers cost the event loop time on every request (benchmarks/results/design-measurements.md). Requests
    and responses are still Starlette's. No CORS middleware: browsers on other origins get no access unless a proxy
    adds it."""

    def __init__(self, srv: Server):
        self.state = types.SimpleNamespace(server=srv)
        self.routes: dict[str, dict] = {}  # fixed paths
        self.templates: list[tuple[re.Pattern, dict]] = []  # paths with {parameters}, tried when no path matches
        templated: dict[str, dict] = {}  # (not in `routes`: a request for ".../{name}" itself must not match)
        self.hosts = srv.hosts
        for method, path, handler, needs_key in ROUTES:
            # STOW-RS bodies are multipart/related: no CORS-simple type either (a browser asks first), so checked
            # by the route (415) instead of the JSON check. V2 infer bodies with binary tensors are
            # application/octet-stream (not CORS-simple either).
            body_type = (None if method != "POST" or handler is stow_studies
                         else _is_v2_body if handler is v2_infer else _is_json)
            endpoint = srv.endpoint(path, handler, needs_key, body_type)
            methods = (templated if "{" in path else self.routes).setdefault(path, {})
            if "{" in path and not any(t[1] is methods for t in self.templates):
                pattern = re.sub(r"\\{(\w+)\\}", r"(?P<\1>[^/]+)", re.escape(path))
                self.templates.append((re.compile(pattern), methods))
            methods[method] = endpoint
            if method == "GET":
                methods["HEAD"] = endpoint  # as Starlette does; uvicorn sends no body for HEAD
        self.template_prefixes = tuple({p[:p.index("{")] for p in templated})  # what a templated path starts with

    async def __call__(self, scope, receive, send):
        from starlette.requests import Request

        if scope["type"] == "lifespan":
            return await self._lifespan(receive, send)
        # scope["type"] is "http": uvicorn runs with ws="none". A trailing slash names the same route.
        path = scope["path"].rstrip("/") or "/"
        methods = self.routes.get(path)
        if methods is None and path.startswith(self.template_prefixes):
            for pattern, candidate in self.templates:
                if (m := pattern.fullmatch(path)) is not None:
                    methods, scope["path_params"] = candidate, m.groupdict()
                    break
        request = Request(scope, receive, send)
        v2 = _is_v2(path)  # a Triton client reads errors under /v2 in V2's shape only
        if self.hosts is not None and (host := _wrong_host(scope, self.hosts)) is not None:
            response = ApiError(400, f"Host {host[:100]!r} is not a name of this server; call it by one of "
                                     f"{', '.join(sorted(self.hosts))}, or start it with --allowed-host NAME.",
                                "host_not_allowed").response(v2)
        elif methods is None:
            response = ApiError(404, f"{scope['method']} {scope['path'][:100]}: Not Found.", "not_found").response(v2)
        elif scope["method"] not in methods:
            response = ApiError(405, f"{scope['method']} {scope['path'][:100]}: Method Not Allowed.",
                                "method_not_allowed", headers={"Allow": ", ".join(methods)}).response(v2)
        else:
            response = await methods[scope["method"]](request)
        await response(scope, receive, send)

    async def _lifespan(self, receive, send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":  # after uvicorn has let in-flight requests finish
                await asyncio.get_running_loop().run_in_executor(None, self.state.server.close)
                await send({"type": "lifespan.shutdown.complete"})
                return


def _is_json(content_type: str | None) -> bool:
    """No Content-Type (tritonclient sends none), application/json, or any type/subtype+json, with any parameters."""
    if content_type is None:
        return True
    mime = content_type.partition(";")[0].strip().lower()
    return mime == "application/json" or mime.endswith("+json") and "/" in mime


def _is_v2_body(content_type: str | None) -> bool:
    """A V2 infer body: JSON as `_is_json` takes it, or application/octet-stream (JSON then binary tensors)."""
    return _is_json(content_type) or content_type.partition(";")[0].strip().lower() == "application/octet-stream"


def _is_v2(path: str) -> bool:
    return path == "/v2" or path.startswith("/v2/")


LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")


def _host_name(value: str) -> str:
    """A Host header (or an --allowed-host) without its port, lower case: example.org:8000 -> example.org,
    [::1]:8000 -> [::1]; a bare IPv6 address gets its brackets."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[:value.find("]") + 1]
    if value.count(":") > 1:
        return f"[{value}]"
    return value.partition(":")[0].rstrip(".")


def allowed_hosts(cfg: ServeConfig) -> frozenset[str] | None:
    """The names the Host header may carry (any port): --allowed-host, else the loopback names when bound to
    loopback; None (no check) when bound elsewhere without --allowed-host (`medc serve` warns then)."""
    import ipaddress

    if cfg.allowed_hosts:
        return frozenset(_host_name(h) for h in cfg.allowed_hosts)
    try:
        loopback = cfg.host == "localhost" or ipaddress.ip_address(cfg.host.strip("[]")).is_loopback
    except ValueError:
        loopback = False
    return frozenset(LOOPBACK_NAMES) if loopback else None


def _wrong_host(scope, hosts: frozenset[str]) -> str | None:
    """The request's Host when it is not in `hosts`, else None. A request without one passes: no browser sends such
    a request, and DNS rebinding needs the attacker's name in it."""
    for name, value in scope["headers"]:
        if name == b"host":
            host = value.decode("latin-1")
            return None if _host_name(host) in hosts else host
    return None


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def create_app(models: list[ServedModel], cfg: ServeConfig) -> App:
    return App(Server(models, cfg))


def uvicorn_config(app, cfg: ServeConfig, **kw):
    import uvicorn

    from medc.runtime.connections import MAX_HEAD_BYTES, guard

    close = ApiError.CLOSE
    answers = {  # what the protocol layer answers by itself, in the same shape as every other error
        "overloaded": ApiError(503, "too many connections with requests in progress; retry shortly.", "overloaded",
                               headers={"Retry-After": "1", **close}).response(),
        "invalid": ApiError(400, "not a valid HTTP/1.1 request.", "invalid_http", headers=close).response(),
        "too_large": ApiError(431, f"the request line and headers are over {MAX_HEAD_BYTES // 1024} KiB.",
                              "headers_too_large", headers=close).response()}

    # log_config=None: keep medc's logging; access_log off: medc logs its own line per request (ids, sizes, times).
    # Keep-alive 30 s, not uvicorn's 5: httpx (and so the openai client) drops idle connections after 5 s too, and
    # when both ends give up on a connection at the same moment, a request just sent on it dies with a reset (seen
    # under overload). Outlasting the clients lets them close first.
    # proxy_headers off: nothing here reads the client's address (behind a reverse proxy, the proxy logs it).
    # ws="none": the app speaks HTTP only. http: uvicorn's httptools protocol with a header deadline and a cap on
    # open connections that closes the longest-idle one (runtime/connections.py); limit_concurrency, above that
    # cap, is only a backstop for when every connection has a request in progress.
    return uvicorn.Config(app, host=cfg.host, port=cfg.port, log_config=None, access_log=False, server_header=False,
                          timeout_graceful_shutdown=cfg.shutdown_timeout, timeout_keep_alive=30, proxy_headers=False,
                          ws="none", http=guard(cfg.max_connections, cfg.header_timeout, answers),
                          limit_concurrency=cfg.max_connections + max(16, cfg.max_connections // 4), **kw)


def serve(bundles: list[str], cfg: ServeConfig, on_ready=None) -> None:
    """Load the bundles, then serve until SIGINT/SIGTERM; in-flight requests finish first."""
    import uvicorn

    give_back_large_frees()  # images decoded in bursts: their memory returns to the OS after each burst
    models = load_models(bundles, cfg)
    try:
        app = create_app(models, cfg)  # opens --index: refused now (another bundle's, another salt), not later
    except BaseException:
        for m in models:
            m.close(cfg.shutdown_timeout)
        raise
    if on_ready:
        on_ready(models)
    uvicorn.Server(uvicorn_config(app, cfg)).run()
