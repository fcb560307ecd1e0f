"""Load generator for `medc serve`: a concurrency sweep on loopback, written as JSON + Markdown.

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
medc.runtime in this process (no HTTP).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import types
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

TEXT = "pleural effusion in the left lower lobe"
QUESTION = "Describe the findings in this chest x-ray."


@dataclass
class LoadResult:
    workload: str  # embed-text | embed-image | chat-stream
    server: str  # batched | unbatched | overload | external
    concurrency: int
    requests: int
    ok: int
    rejected: int  # 429 / 503 with Retry-After: back-pressure, as intended
    errors: int  # anything else: 5xx, other 4xx, broken connections
    error_kinds: str  # e.g. "500:2,ConnectionResetError:1"
    seconds: float
    throughput_rps: float
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None
    ttft_p50_ms: float | None = None
    ttft_p90_ms: float | None = None
    itl_p50_ms: float | None = None
    itl_p90_ms: float | None = None
    output_tokens_per_s: float | None = None
    server_rss_mib: float | None = None


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


def _summarise(records, seconds, workload, server, concurrency, rss) -> LoadResult:
    ok = [r for r in records if r[0] == 200]
    bad = collections.Counter(str(r[0]) for r in records if r[0] not in (200, 429, 503))
    lat = np.array([r[1] for r in ok]) * 1e3
    ttft = np.array([r[2] for r in ok if r[2] is not None]) * 1e3
    itl = np.array([g for r in ok for g in r[3]]) * 1e3
    pct = lambda a, q: round(float(np.percentile(a, q)), 3) if len(a) else None  # noqa: E731
    tokens = sum(r[4] for r in ok)
    return LoadResult(
        workload=workload, server=server, concurrency=concurrency, requests=len(records), ok=len(ok),
        rejected=sum(r[0] in (429, 503) for r in records), errors=sum(bad.values()),
        error_kinds=",".join(f"{k}:{n}" for k, n in sorted(bad.items())), seconds=round(seconds, 2),
        throughput_rps=round(len(ok) / seconds, 2), p50_ms=pct(lat, 50), p90_ms=pct(lat, 90), p99_ms=pct(lat, 99),
        ttft_p50_ms=pct(ttft, 50), ttft_p90_ms=pct(ttft, 90), itl_p50_ms=pct(itl, 50), itl_p90_ms=pct(itl, 90),
        output_tokens_per_s=round(tokens / seconds, 1) if workload == "chat-stream" else None, server_rss_mib=rss)


# -- servers --------------------------------------------------------------------------------------------------------
class ServerProcess:
    """`medc serve` in a child process on a free loopback port; SIGTERM (graceful) on exit."""

    def __init__(self, name: str, bundles: list[str], extra: list[str]):
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
          rounds: int, log=print) -> list[LoadResult]:
    """`rounds` runs per server, alternating servers, pooled per server."""
    return arms([(s, concurrency) for s in servers], workload, body, duration, rounds, log)


def arms(pairs: list[tuple[ServerProcess, int]], workload: str, body: tuple[str, dict], duration: float, rounds: int,
         log=print) -> list[LoadResult]:
    """`rounds` runs of each (server, concurrency) pair, alternating pairs, pooled per pair: two servers at one
    concurrency (batched vs unbatched), or one server at several (chat's c4 / c1), so a load change on a shared
    machine hits every arm of a ratio alike."""
    pooled = {i: ([], 0.0) for i in range(len(pairs))}
    for _ in range(rounds):
        for i, (s, c) in enumerate(pairs):
            records, seconds = asyncio.run(_run(s.url, body[0], workload, body[1], c, duration / rounds, warmup=0.5))
            pooled[i] = (pooled[i][0] + records, pooled[i][1] + seconds)
    results = [_summarise(*pooled[i], workload, s.name, c, s.rss_mib()) for i, (s, c) in enumerate(pairs)]
    for r in results:
        log(f"{r.server:<9} {workload:<11} c={r.concurrency:<3} {r.throughput_rps:8.1f} req/s  p50 {r.p50_ms} ms  "
            f"ok {r.ok} rejected {r.rejected} errors {r.errors}"
            + (f"  {r.output_tokens_per_s} tok/s" if r.output_tokens_per_s else ""))
    return results


def soak(server: ServerProcess, bodies: dict, workloads: list[str], seconds: float, concurrency: int,
         log=print) -> dict:
    """All `workloads` together for `seconds`; the server's RSS every 5 s. -> counts and the RSS series."""
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
    out = {"seconds": seconds, "workloads": [w for w in workloads if w in bodies], "requests": len(records),
           "ok": sum(r[0] == 200 for r in records), "errors": sum(r[0] not in (200, 429, 503) for r in records),
           "rejected": sum(r[0] in (429, 503) for r in records),
           "rss_mib": {"start": rss[0], "max": max(rss), "end": rss[-1],
                       "after_first_minute_max": max((m for t, m in samples if t >= 60 and m is not None),
                                                     default=None)},
           "rss_series": samples}
    log(f"soak {seconds:.0f} s: {out['ok']} ok, {out['errors']} errors, RSS MiB {out['rss_mib']}")
    return out


def in_process_ms(bundle: str, threads: int | None = None, repeat: int = 300) -> float:
    """p50 of the same one-text embedding through medc.runtime, without HTTP."""
    import medc.runtime

    with medc.runtime.load(bundle, threads=threads) as m:
        for _ in range(20):
            m.embed_texts([TEXT])
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            m.embed_texts([TEXT])
            times.append(time.perf_counter() - t0)
    return round(float(np.median(times)) * 1e3, 3)


# -- output ---------------------------------------------------------------------------------------------------------
def headline(results: list[LoadResult], in_process: float | None) -> dict:
    def get(workload, server, c):
        return next((r for r in results if (r.workload, r.server, r.concurrency) == (workload, server, c)), None)

    h = {}
    one = get("embed-text", "batched", 1)
    if one and in_process is not None:
        h["http_overhead_p50_ms"] = round(one.p50_ms - in_process, 3)
    top = max((r.concurrency for r in results if r.server == "unbatched"), default=None)
    for w in ("embed-text", "embed-image"):
        for c in sorted({16, top} - {None}):  # the target is at 16
            b, u = get(w, "batched", c), get(w, "unbatched", c)
            if b and u and u.throughput_rps:
                h[f"{w}_batched_over_unbatched_c{c}"] = round(b.throughput_rps / u.throughput_rps, 2)
    c1, c4 = get("chat-stream", "batched", 1), get("chat-stream", "batched", 4)
    if c1 and c4 and c1.output_tokens_per_s:
        h["chat_tokens_per_s_c4_over_c1"] = round(c4.output_tokens_per_s / c1.output_tokens_per_s, 2)
    h["errors_and_rejections_below_queue_limit"] = sum(r.errors + r.rejected for r in results
                                                       if r.server != "overload")
    over = [r for r in results if r.server == "overload"]
    if over:
        h["overload"] = {"ok": sum(r.ok for r in over), "rejected_429_503": sum(r.rejected for r in over),
                         "errors": sum(r.errors for r in over)}
    return h


def to_markdown(results: list[LoadResult], meta: dict) -> str:
    cols = [f.name for f in fields(LoadResult)]
    lines = [f"# medc serve under load: {', '.join(meta['bundles']) or meta.get('server_url')}", "",
             f"{meta['cpu']}; {meta['duration_s']} s per point and server ({meta['rounds']} alternating rounds, "
             f"each after 0.5 s warm-up); load generator on the same machine; ONNX Runtime threads per session: "
             f"{meta['threads'] or 'default'}; 1-minute load average before / after: {meta['loadavg_before_after']}; "
             f"commit {meta['commit']}.", "", "## Headline", ""]
    lines += [f"- {k}: {v}" for k, v in meta["headline"].items()]
    if meta.get("in_process_p50_ms") is not None:
        lines.append(f"- one-text embedding p50 in-process (no HTTP): {meta['in_process_p50_ms']} ms")
    lines += ["", "## All points", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join("" if getattr(r, c) in (None, "") else str(getattr(r, c)) for c in cols) + " |"
              for r in results]
    return "\n".join(lines) + "\n"


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
    from medc.system import cpu_info, git_commit

    conc = [int(c) for c in args.concurrency.split(",")]
    workloads = args.workloads.split(",")
    results, in_process, soaked = [], None, None
    load_before = os.getloadavg()
    common = ["--threads", str(args.threads)] if args.threads else []
    if args.server:
        external = types.SimpleNamespace(name="external", url=args.server, rss_mib=lambda: None)
        bodies = _bodies(args.server, args.max_tokens)
        for w in (w for w in workloads if w in bodies):
            for c in conc:
                results += point([external], w, bodies[w], c, args.duration, args.rounds)
    else:
        family = lambda b: json.loads((Path(b) / "manifest.json").read_text())["model"]["family"]  # noqa: E731
        siglip = next((b for b in args.bundles if family(b) == "siglip"), None)
        if siglip:
            in_process = in_process_ms(siglip, args.threads)
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
                soaked = soak(main_server, bodies, workloads, args.soak, max(conc))
        if "chat-stream" in bodies and "chat-stream" in workloads:
            chat = [b for b in args.bundles if b != siglip]
            with ServerProcess("overload", chat, ["--max-queue", "4", "--max-concurrency", "2", *common]) as s:
                results += point([s], "chat-stream", bodies["chat-stream"], 64, min(args.duration, 5.0), 1)
    meta = {"bundles": [Path(b).name for b in args.bundles], "server_url": args.server, "cpu": cpu_info(),
            "cpu_count": os.cpu_count(), "commit": git_commit(), "duration_s": args.duration, "rounds": args.rounds,
            "max_tokens": args.max_tokens, "threads": args.threads, "in_process_p50_ms": in_process,
            "loadavg_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)]}
    meta["headline"] = headline(results, in_process)
    if soaked:
        meta["soak"] = soaked
        meta["headline"]["soak"] = {k: soaked[k] for k in ("seconds", "ok", "errors", "rss_mib")}
    print(json.dumps(meta["headline"], indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps({**meta, "results": [asdict(r) for r in results]},
                                                            indent=2) + "\n")
        args.out.with_suffix(".md").write_text(to_markdown(results, meta))
        print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
