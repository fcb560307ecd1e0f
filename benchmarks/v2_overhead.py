"""What a request costs over the Open Inference Protocol (KServe V2) against the OpenAI routes, on one `medc serve`.

    python benchmarks/v2_overhead.py [BUNDLE] -n 300 --out benchmarks/results/v2-overhead-medsiglip-tiny

Without BUNDLE it builds the tiny MedSigLIP (`medc build medsiglip-tiny -o DIR --force`, in a temporary folder).
It starts `medc serve` on the bundle (a child process, as in production) and sends, interleaved in one run, N
requests of each kind, one at a time (the order rotates every round, so none always follows the same one):

- `openai-image`: POST /v1/embeddings with one image as a PNG data URL (httpx); the server decodes and preprocesses it;
- `v2-image-binary`: image_encoder infer with pixel_values as binary tensors, tritonclient.http's default both ways;
- `v2-image-json`: the same with JSON tensors both ways (binary_data=False on the input and the output);
- `openai-text`: POST /v1/embeddings with one text (httpx); the server tokenizes it;
- `v2-text-binary`: text_encoder infer with the text's input_ids (binary, tritonclient.http).

One client each (an httpx.Client, a tritonclient InferenceServerClient), each with one keep-alive connection. A V2
client does its own preprocessing, once, before the clock starts: pixel_values are the bundle's own preprocessing
of the same PNG, input_ids its tokenizer's, so both protocols answer the same embedding (checked before timing).
Latency is the client's time around the call, the answer parsed into an array included (the JSON kinds' encoding
and parsing are what such a client pays). The ratios V2 / OpenAI of p50 and p90 are notes of the run.

The result (benchmarks/schema.py, JSON + Markdown): one row of kind "load" per request kind, params {request,
protocol, encoding, client, concurrency}, metric latency_ms (every request, in order).
"""

from __future__ import annotations

import argparse
import io
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from medc.benchmarks import schema
from medc.benchmarks.schema import Metric, Row
from medc.benchmarks.serve_load import TEXT, ServerProcess

KINDS = ("openai-image", "v2-image-binary", "v2-image-json", "openai-text", "v2-text-binary")
PAIRS = (("v2-image-binary", "openai-image"), ("v2-image-json", "openai-image"), ("v2-text-binary", "openai-text"))


def _png(side: int = 224) -> bytes:
    """An RGB gradient at the tiny model's input size: decoding and resizing stay small beside the protocol."""
    from PIL import Image

    ramp = np.linspace(0, 255, side * side, dtype=np.float32).reshape(side, side)
    rgb = np.stack([ramp, ramp.T, 255 - ramp], axis=-1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def _calls(url: str, model: str, png: bytes, pixel_values: np.ndarray, input_ids: np.ndarray) -> dict:
    """Request kind -> a function that sends one request and returns the embedding [1, D] it got back."""
    import base64

    import httpx
    import tritonclient.http as http

    openai = httpx.Client(base_url=url, timeout=60)
    triton = http.InferenceServerClient(url.removeprefix("http://"), connection_timeout=60, network_timeout=60)
    data_url = "data:image/png;base64," + base64.b64encode(png).decode()

    def embeddings(body: dict):
        def call():
            r = openai.post("/v1/embeddings", json={"model": model, **body})
            r.raise_for_status()
            return np.array([d["embedding"] for d in r.json()["data"]], np.float32)
        return call

    def infer(component: str, name: str, array: np.ndarray, datatype: str, output: str, binary: bool):
        tensor = http.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array, binary_data=binary)  # once: a client builds its input once per request
        outputs = None if binary else [http.InferRequestedOutput(output, binary_data=False)]
        return lambda: triton.infer(f"{model}.{component}", [tensor], outputs=outputs).as_numpy(output)

    return {"openai-image": embeddings({"images": [data_url]}),
            "v2-image-binary": infer("image_encoder", "pixel_values", pixel_values, "FP32", "image_embeds", True),
            "v2-image-json": infer("image_encoder", "pixel_values", pixel_values, "FP32", "image_embeds", False),
            "openai-text": embeddings({"input": [TEXT]}),
            "v2-text-binary": infer("text_encoder", "input_ids", input_ids, "INT64", "text_embeds", True)}


def _build_tiny(folder: Path) -> Path:
    out = folder / "medsiglip-tiny"
    subprocess.run([sys.executable, "-m", "medc.cli", "-q", "build", "medsiglip-tiny", "-o", str(out), "--force"],
                   check=True)
    return out


def measure(bundle: Path, n: int, warmup: int, threads: int | None, log=print) -> list[Row]:
    import medc.runtime
    from PIL import Image

    png = _png()
    with medc.runtime.load(bundle) as pipeline:
        pixel_values = pipeline.preprocess([Image.open(io.BytesIO(png))])
        input_ids = pipeline.tokenizer([TEXT])
        model = pipeline.bundle.manifest.model["name"]
    extra = ["--threads", str(threads)] if threads else []
    with ServerProcess("medc", [str(bundle)], extra) as server:
        calls = _calls(server.url, model, png, pixel_values, input_ids)
        answers = {kind: call() for kind, call in calls.items()}
        for v2, openai in PAIRS:  # the same embedding either way, or the comparison means nothing
            if not np.allclose(answers[v2], answers[openai], atol=1e-5):
                raise SystemExit(f"{v2} and {openai} answered different embeddings "
                                 f"(max difference {np.abs(answers[v2] - answers[openai]).max():.3g})")
        for _ in range(warmup):
            for call in calls.values():
                call()
        samples: dict[str, list[float]] = {kind: [] for kind in KINDS}
        for i in range(n):
            for kind in KINDS[i % len(KINDS):] + KINDS[:i % len(KINDS)]:
                t0 = time.perf_counter()
                calls[kind]()
                samples[kind].append((time.perf_counter() - t0) * 1e3)
    rows = []
    for kind in KINDS:
        protocol = kind.partition("-")[0]
        encoding = "binary" if kind.endswith("binary") else "json"
        client = "tritonclient.http" if protocol == "v2" else "httpx"
        row = Row("load", bundle.name, "server", {"request": kind, "protocol": protocol, "encoding": encoding,
                                                  "client": client, "concurrency": 1},
                  [Metric.of("latency_ms", "ms", samples[kind])])
        m = row.metrics[0]
        log(f"{kind:<16} p50 {m.p50:8.3f} ms  p90 {m.p90:8.3f} ms  ({m.count} requests)")
        rows.append(row)
    return rows


def headline(rows: list[Row]) -> list[str]:
    by = {r.params["request"]: r.metrics[0] for r in rows}
    out = [f"{k}: p50 {by[k].p50:.3f} ms, p90 {by[k].p90:.3f} ms" for k in KINDS]
    for v2, openai in PAIRS:
        out.append(f"{v2} / {openai}: p50 {by[v2].p50 / by[openai].p50:.2f}, p90 {by[v2].p90 / by[openai].p90:.2f}")
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", nargs="?", type=Path, help="A MedSigLIP bundle (default: build the tiny one).")
    ap.add_argument("-n", type=int, default=300, help="Timed requests of each kind.")
    ap.add_argument("--warmup", type=int, default=20, help="Untimed requests of each kind first.")
    ap.add_argument("--threads", type=int, help="Passed to medc serve: ONNX Runtime intra-op threads per session.")
    ap.add_argument("--out", type=Path, help="Write OUT.json and OUT.md.")
    args = ap.parse_args(argv)
    from medc.benchmarks.host import bundle_info, run_info

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="medc-v2-") as tmp:
        bundle = args.bundle or _build_tiny(Path(tmp))
        rows = measure(bundle, args.n, args.warmup, args.threads)
        argv = sys.argv[1:] if argv is None else argv
        run = run_info(args.threads, bundles=[bundle_info(bundle)],
                       command=shlex.join(["python", "benchmarks/v2_overhead.py", *argv]))
    run.notes = [f"{args.n} requests of each kind, one at a time, interleaved (the order rotating every round), after "
                 f"{args.warmup} untimed of each; client and server on the same machine; latency is the client's "
                 "time around each call, the answer parsed into an array included",
                 f"1-minute load average before / after: {load_before[0]:.2f} / {os.getloadavg()[0]:.2f}",
                 *headline(rows)]
    result = schema.Result(run, rows, f"KServe V2 infer vs the OpenAI routes on medc serve: {bundle.name}")
    print("\n".join(run.notes[2:]))
    if args.out:
        j, m = schema.save(result, args.out)
        print(f"wrote {j} and {m}")


if __name__ == "__main__":
    main()
