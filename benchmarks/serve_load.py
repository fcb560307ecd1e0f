"""Load generator for `medc serve`: a concurrency sweep on loopback, written as a benchmark result (JSON + Markdown).

    python benchmarks/serve_load.py bundles/medsiglip-tiny bundles/medgemma-tiny --out benchmarks/results/serve-tiny
    python benchmarks/serve_load.py --server http://127.0.0.1:8000 --concurrency 1,4,16,64   # a running server

Given bundles, it starts `medc serve` itself (separate processes, as in production):
- `batched` (the defaults) and, for embeddings, `unbatched` (--max-batch 1), both up at once: each point runs
  `--rounds` times, alternating the two, and the rounds are pooled, so a load change on a shared machine hits both;
- chat on `batched`: its concurrencies alternate round by round (`arms`), so c4 / c1 is a ratio of interleaved runs;
- `overload` (--max-queue 4 --max-concurrency 2) with chat at concurrency 64: what clients above the queue limit see
  (429 with Retry-After, after which a worker waits 50 ms as a polite client would; never a timeout or a 5xx);
- `--soak SECONDS`: every workload at once against the batched server (embeddings at the highest concurrency,
  chat at 4) for that long, the server's RSS sampled every 5 s: memory must stay bounded under sustained load.
Each run is a closed loop: `concurrency` workers, one keep-alive connection each, send requests back to back. Chat is
streamed with `ignore_eos`, so every request decodes exactly --max-tokens tokens; TTFT is the time to the first
content chunk, ITL the gaps between content chunks. The client is a minimal asyncio HTTP/1.1 client (Content-Length
and chunked responses, nothing more): on a 2-core machine a full client library would take as much CPU as the server
it measures. The HTTP overhead is the text-embedding p50 at concurrency 1 minus the same embedding's p50 through
medc.runtime in this process (no HTTP), which is a row of its own (server "in-process").

The result (benchmarks/schema.py) has one row of kind "load" per point: params {workload, server, concurrency} (plus
max_tokens for chat); metrics latency_ms (every successful request), ttft_ms and itl_ms (chat: every request's TTFT,
every inter-token gap), throughput_rps and output_tok_s (one sample per round), ok / rejected / errors (counts; what
the errors were is in the row's notes) and server_rss_mib. The headline ratios are notes of the run.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import io
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import types
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
from medc.benchmarks import schema
from medc.benchmarks.schema import Metric, Row

TEXT = "pleural effusion in the left lower lobe"
QUESTION = "Describe the findings in this chest x-ray."


# -- a minimal HTTP/1.1 client ---------------------------------------------------------------------------------------
class Connection:
    """One keep-alive connection; reconnects when the server closed it."""

    def __init__(self, url: str):
        u = urlsplit(url)
        self.host, self.port, self.reader, self.writer = u.hostname, u.port, None, None

    async def request(self, path: str, body: bytes, on_chunk=None) -> tuple[int, bytes]:
        """POST -> (status, body); a chunked body is handed to on_chunk piece by piece instead."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
            self.writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.writer.write(f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                          f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        try:
            status = int((await self.reader.readline()).split()[1])
            headers = {}
            while (line := await self.reader.readline()) not in (b"\r\n", b""):
                key, _, value = line.decode("latin-1").partition(":")
                headers[key.strip().lower()] = value.strip()
            data = b""
            if "content-length" in headers:
                data = await self.reader.readexactly(int(headers["content-length"]))
            else:
                while size := int((await self.reader.readline()).strip() or b"0", 16):
                    piece = (await self.reader.readexactly(size + 2))[:-2]
                    if on_chunk:
                        on_chunk(piece)
                await self.reader.readline()
        except (OSError, IndexError, ValueError, asyncio.IncompleteReadError):
            self.close()
            raise ConnectionResetError("the server closed the connection") from None
        if headers.get("connection") == "close":
            self.close()
        return status, data

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


# One request of each kind -> (status or exception name, latency s, TTFT s or None, inter-token gaps, tokens).
async def _post(conn: Connection, path: str, body: bytes):
    t0 = time.perf_counter()
    status, _ = await conn.request(path, body)
    return status, time.perf_counter() - t0, None, [], 0


async def _chat_stream(conn: Connection, path: str, body: bytes):
    t0 = time.perf_counter()
    stamps, usage, buf = [], [0], [b""]

    def on_chunk(piece: bytes) -> None:
        buf[0] += piece
        *events, buf[0] = buf[0].split(b"\n\n")
        for event in events:
            if not event.startswith(b"data: {"):
                continue
            data = json.loads(event[6:])
            if data.get("usage"):
                usage[0] = data["usage"]["completion_tokens"]
            if data.get("choices") and data["choices"][0]["delta"].get("content"):
                stamps.append(time.perf_counter())

    status, _ = await conn.request(path, body, on_chunk)
    ttft = stamps[0] - t0 if stamps else None
    return status, time.perf_counter() - t0, ttft, list(np.diff(stamps)), usage[0]


async def _run(url: str, path: str, kind: str, body: dict, concurrency: int, duration: float, warmup: float):
    send = _chat_stream if kind == "chat-stream" else _post
    payload = json.dumps(body).encode()
    records = []
    start = time.perf_counter()
    stop = start + warmup + duration

    async def worker():
        conn = Connection(url)
        while time.perf_counter() < stop:
            t = time.perf_counter()
            try:
                rec = await send(conn, path, payload)
            except OSError as e:
                rec = (type(e).__name__, time.perf_counter() - t, None, [], 0)
            if t >= start + warmup:
                records.append(rec)
            if rec[0] in (429, 503):
                await asyncio.sleep(0.05)
        conn.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return records, time.perf_counter() - start - warmup


def _summarise(records, rounds, workload, server, concurrency, rss, bundle, max_tokens) -> Row:
    """One "load" row from the pooled records of all rounds; `rounds` is [(ok, tokens, seconds)] per round."""
    ok = [r for r in records if r[0] == 200]
    bad = collections.Counter(str(r[0]) for r in records if r[0] not in (200, 429, 503))
    seconds = sum(sec for *_, sec in rounds)
    params = {"workload": workload, "server": server, "concurrency": concurrency}
    if workload == "chat-stream":
        params["max_tokens"] = max_tokens
    metrics = []
    if ok:
        metrics.append(Metric.of("latency_ms", "ms", [r[1] * 1e3 for r in ok]))
    # Throughput per round, so a comparison sees how much it moved between the interleaved rounds.
    metrics.append(Metric.of("throughput_rps", "req/s", [n / sec for n, _, sec in rounds if sec > 0]))
    if ttft := [r[2] * 1e3 for r in ok if r[2] is not None]:
        metrics.append(Metric.of("ttft_ms", "ms", ttft))
    if itl := [g * 1e3 for r in ok for g in r[3]]:
        metrics.append(Metric.of("itl_ms", "ms", itl))
    if workload == "chat-stream":
        metrics.append(Metric.of("output_tok_s", "tok/s", [t / sec for _, t, sec in rounds if sec > 0]))
    metrics += [Metric.of("ok", "count", [len(ok)]),
                Metric.of("rejected", "count", [sum(r[0] in (429, 503) for r in records)]),
                Metric.of("errors", "count", [sum(bad.values())])]
    if rss is not None:
        metrics.append(Metric.of("server_rss_mib", "MiB", [rss]))
    label = f"{workload} {server} c={concurrency}"
    notes = [f"{label}: {len(records)} requests in {seconds:.2f} s"]
    if bad:
        notes.append(f"{label}: errors " + ",".join(f"{k}:{n}" for k, n in sorted(bad.items())))
    return Row("load", bundle, "server", params, metrics, notes=notes)


def _value(row: Row, name: str) -> float | None:
    m = row.metric(name)
    return m.value if m else None


# -- servers --------------------------------------------------------------------------------------------------------
class ServerProcess:
    """`medc serve` in a child process on a free loopback port; SIGTERM (graceful) on exit."""

    def __init__(self, name: str, bundles: list[str], extra: list[str]):
        self.bundles = [Path(b).name for b in bundles]
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.name, self.url = name, f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "medc.cli", "-q", "serve", *bundles, "--port", str(port),
                                      *extra], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"medc serve exited with {self.proc.returncode}")
            try:
                if _get_json(self.url + "/ready").get("status") == "ready":
                    return
            except OSError:
                time.sleep(0.2)
        raise SystemExit("medc serve did not become ready")

    def rss_mib(self) -> float | None:
        import psutil

        try:
            return round(psutil.Process(self.proc.pid).memory_info().rss / 2**20, 1)
        except psutil.Error:
            return None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _get_json(url: str) -> dict:
    import urllib.request

    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def _image_url(side: int = 224) -> str:
    from PIL import Image

    ramp = np.linspace(0, 255, side * side, dtype=np.float32).reshape(side, side).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _bodies(url: str, max_tokens: int) -> dict[str, tuple[str, dict]]:
    models = {m["kind"]: m["id"] for m in _get_json(url + "/v1/models")["data"]}
    out = {}
    if "embeddings" in models:
        out["embed-text"] = ("/v1/embeddings", {"model": models["embeddings"], "input": [TEXT]})
        out["embed-image"] = ("/v1/embeddings", {"model": models["embeddings"], "images": [_image_url()]})
    if "chat" in models:
        out["chat-stream"] = ("/v1/chat/completions", {
            "model": models["chat"], "messages": [{"role": "user", "content": QUESTION}], "max_tokens": max_tokens,
            "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}})
    return out


def point(servers: list[ServerProcess], workload: str, body: tuple[str, dict], concurrency: int, duration: float,
          rounds: int, log=print) -> list[Row]:
    """`rounds` runs per server, alternating servers, pooled per server."""
    return arms([(s, concurrency) for s in servers], workload, body, duration, rounds, log)


def arms(pairs: list[tuple[ServerProcess, int]], workload: str, body: tuple[str, dict], duration: float, rounds: int,
         log=print) -> list[Row]:
    """`rounds` runs of each (server, concurrency) pair, alternating pairs, pooled per pair: two servers at one
    concurrency (batched vs unbatched), or one server at several (chat's c4 / c1), so a load change on a shared
    machine hits every arm of a ratio alike."""
    records = {i: [] for i in range(len(pairs))}
    per_round = {i: [] for i in range(len(pairs))}  # (ok, output tokens, seconds) of each round
    for _ in range(rounds):
        for i, (s, c) in enumerate(pairs):
            recs, seconds = asyncio.run(_run(s.url, body[0], workload, body[1], c, duration / rounds, warmup=0.5))
            records[i] += recs
            ok = [r for r in recs if r[0] == 200]
            per_round[i].append((len(ok), sum(r[4] for r in ok), seconds))
    results = [_summarise(records[i], per_round[i], workload, s.name, c, s.rss_mib(), _bundle(s, workload, body),
                          body[1].get("max_tokens")) for i, (s, c) in enumerate(pairs)]
    for r in results:
        tok = _value(r, "output_tok_s")
        log(f"{r.params['server']:<9} {workload:<11} c={r.params['concurrency']:<3} "
            f"{_value(r, 'throughput_rps'):8.1f} req/s  p50 {_value(r, 'latency_ms')} ms  ok {_value(r, 'ok'):.0f} "
            f"rejected {_value(r, 'rejected'):.0f} errors {_value(r, 'errors'):.0f}" + (f"  {tok} tok/s" if tok else ""))
    return results


def _bundle(server, workload: str, body: tuple[str, dict]) -> str:
    """The bundle a row measured: of a started server, the one serving the workload; else the model id."""
    names = getattr(server, "bundles", None)
    if not names:
        return body[1]["model"]
    return names[0] if len(names) == 1 or workload.startswith("embed") else names[-1]


def soak(server: ServerProcess, bodies: dict, workloads: list[str], seconds: float, concurrency: int,
         log=print) -> Row:
    """All `workloads` together for `seconds`; the server's RSS every 5 s. -> one "load" row (workload "soak"): the
    counts, and the RSS series as the samples of server_rss_mib (in time order: 0, 5, 10, ... s)."""
    samples = [(0.0, server.rss_mib())]

    async def sample():
        t0 = time.perf_counter()
        while (t := time.perf_counter() - t0) < seconds:
            await asyncio.sleep(5.0)
            samples.append((round(t + 5.0, 1), server.rss_mib()))

    async def run_all():
        jobs = [_run(server.url, bodies[w][0], w, bodies[w][1], 4 if w == "chat-stream" else concurrency, seconds, 0.5)
                for w in workloads if w in bodies]
        *runs, _ = await asyncio.gather(*jobs, sample())
        return runs

    runs = asyncio.run(run_all())
    records = [r for recs, _ in runs for r in recs]
    rss = [m for _, m in samples if m is not None]
    late = max((m for t, m in samples if t >= 60 and m is not None), default=None)
    counts = {"ok": sum(r[0] == 200 for r in records), "rejected": sum(r[0] in (429, 503) for r in records),
              "errors": sum(r[0] not in (200, 429, 503) for r in records)}
    used = [w for w in workloads if w in bodies]
    metrics = [Metric.of(k, "count", [v]) for k, v in counts.items()]
    if rss:
        metrics.append(Metric.of("server_rss_mib", "MiB", rss))
    notes = [(f"soak: {len(records)} requests in {seconds:.0f} s, {', '.join(used)} at once"
              f"{' (chat at concurrency 4)' if 'chat-stream' in used else ''}; "
              f"RSS MiB start {rss[0] if rss else None}, max {max(rss, default=None)}, end {rss[-1] if rss else None}, "
              f"max after the first minute {late}")]
    row = Row("load", "+".join(getattr(server, "bundles", []) or ["external"]), "server",
              {"workload": "soak", "server": server.name, "concurrency": concurrency, "seconds": seconds,
               "workloads": ",".join(used)}, metrics, notes=notes)
    log(notes[0])
    return row


def in_process(bundle: str, threads: int | None = None, repeat: int = 300) -> Row:
    """The same one-text embedding through medc.runtime, without HTTP: a row of server "in-process"."""
    import medc.runtime

    with medc.runtime.load(bundle, threads=threads) as m:
        for _ in range(20):
            m.embed_texts([TEXT])
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            m.embed_texts([TEXT])
            times.append(time.perf_counter() - t0)
    return Row("load", Path(bundle).name, "onnxruntime", {"workload": "embed-text", "server": "in-process",
                                                          "concurrency": 1},
               [Metric.of("latency_ms", "ms", [t * 1e3 for t in times])])


# -- output ---------------------------------------------------------------------------------------------------------
def headline(rows: list[Row]) -> list[str]:
    """The figures the sweep is for, as notes of the run: HTTP overhead, batched / unbatched, chat c4 / c1, overload."""
    def get(workload, server, c):
        return next((r for r in rows if (r.params["workload"], r.params["server"], r.params["concurrency"])
                     == (workload, server, c)), None)

    h = []
    one, local = get("embed-text", "batched", 1), get("embed-text", "in-process", 1)
    if one and local and one.metric("latency_ms"):
        h.append(f"HTTP overhead: text-embedding p50 at concurrency 1 minus in-process p50 = "
                 f"{_value(one, 'latency_ms') - _value(local, 'latency_ms'):.3f} ms")
    top = max((r.params["concurrency"] for r in rows if r.params["server"] == "unbatched"), default=None)
    for w in ("embed-text", "embed-image"):
        for c in sorted({16, top} - {None}):  # the target is at 16
            b, u = get(w, "batched", c), get(w, "unbatched", c)
            if b and u and _value(u, "throughput_rps"):
                h.append(f"{w} throughput batched / unbatched at c{c}: "
                         f"{_value(b, 'throughput_rps') / _value(u, 'throughput_rps'):.2f}")
    c1, c4 = get("chat-stream", "batched", 1), get("chat-stream", "batched", 4)
    if c1 and c4 and _value(c1, "output_tok_s"):
        h.append(f"chat output tokens/s c4 / c1: {_value(c4, 'output_tok_s') / _value(c1, 'output_tok_s'):.2f}")
    sweep = [r for r in rows if r.params["server"] in ("batched", "unbatched", "external")]
    h.append("errors and rejections below the queue limit: "
             f"{sum(_value(r, 'errors') + _value(r, 'rejected') for r in sweep if r.metric('errors')):.0f}")
    over = [r for r in rows if r.params["server"] == "overload"]
    if over:
        h.append("overload (--max-queue 4 --max-concurrency 2, chat at c64): " + ", ".join(
            f"{k} {sum(_value(r, k) for r in over):.0f}" for k in ("ok", "rejected", "errors")))
    return h


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundles", nargs="*", help="Bundles to serve (a MedSigLIP and/or a MedGemma bundle).")
    ap.add_argument("--server", help="Benchmark this running server instead of starting one.")
    ap.add_argument("--concurrency", default="1,4,16,64")
    ap.add_argument("--duration", type=float, default=6.0, help="Measured seconds per point and server.")
    ap.add_argument("--rounds", type=int, default=3, help="Alternating rounds the duration is split into.")
    ap.add_argument("--max-tokens", type=int, default=32, help="Chat: tokens decoded per request.")
    ap.add_argument("--workloads", default="embed-text,embed-image,chat-stream")
    ap.add_argument("--threads", type=int, help="Passed to medc serve: ONNX Runtime intra-op threads per session.")
    ap.add_argument("--soak", type=float, default=0.0, help="Seconds of every workload at once (RSS sampled).")
    ap.add_argument("--out", type=Path, help="Write OUT.json and OUT.md.")
    args = ap.parse_args(argv)
    if bool(args.bundles) == bool(args.server):
        ap.error("give bundles (the script starts medc serve) or --server URL, not both")
    from medc.benchmarks.host import bundle_info, run_info

    conc = [int(c) for c in args.concurrency.split(",")]
    workloads = args.workloads.split(",")
    results: list[Row] = []
    load_before = os.getloadavg()
    common = ["--threads", str(args.threads)] if args.threads else []
    if args.server:
        external = types.SimpleNamespace(name="external", url=args.server, rss_mib=lambda: None)
        bodies = _bodies(args.server, args.max_tokens)
        for w in (w for w in workloads if w in bodies):
            for c in conc:
                results += point([external], w, bodies[w], c, args.duration, args.rounds)
    else:
        family = lambda b: json.loads((Path(b) / "manifest.json").read_text())["model"]["family"]
        siglip = next((b for b in args.bundles if family(b) == "siglip"), None)
        if siglip:
            results.append(in_process(siglip, args.threads))
        with ServerProcess("batched", args.bundles, common) as main_server:
            bodies = _bodies(main_server.url, args.max_tokens)
            unbatched = ServerProcess("unbatched", [siglip], ["--max-batch", "1", *common]) if siglip else None
            try:
                for w in (w for w in workloads if w.startswith("embed") and w in bodies):
                    for c in conc:
                        results += point([main_server, unbatched], w, bodies[w], c, args.duration, args.rounds)
            finally:
                if unbatched:
                    unbatched.stop()
            if "chat-stream" in bodies and "chat-stream" in workloads:  # concurrencies alternate, round by round
                results += arms([(main_server, c) for c in conc], "chat-stream", bodies["chat-stream"],
                                args.duration, args.rounds)
            if args.soak:
                results.append(soak(main_server, bodies, workloads, args.soak, max(conc)))
        if "chat-stream" in bodies and "chat-stream" in workloads:
            chat = [b for b in args.bundles if b != siglip]
            with ServerProcess("overload", chat, ["--max-queue", "4", "--max-concurrency", "2", *common]) as s:
                results += point([s], "chat-stream", bodies["chat-stream"], 64, min(args.duration, 5.0), 1)
    argv = sys.argv[1:] if argv is None else argv
    run = run_info(args.threads, bundles=[bundle_info(Path(b)) for b in args.bundles],
                   command=shlex.join(["python", "benchmarks/serve_load.py", *argv]))
    run.notes = [f"{args.duration} s per point and server ({args.rounds} alternating rounds, each after 0.5 s "
                 f"warm-up); chat decodes {args.max_tokens} tokens per request; load generator on the same machine"
                 + (f"; server {args.server}" if args.server else ""),
                 f"1-minute load average before / after: {load_before[0]:.2f} / {os.getloadavg()[0]:.2f}",
                 *headline(results)]
    result = schema.Result(run, results, f"medc serve under load: "
                                         f"{', '.join(Path(b).name for b in args.bundles) or args.server}")
    print("\n".join(run.notes[2:]))
    if args.out:
        j, m = schema.save(result, args.out)
        print(f"wrote {j} and {m}")

if __name__ == "__main__":
    main()
