"""What `medc serve`'s hostile-input limits cost and guarantee: one run, written as a benchmark result.

    python -m medc.benchmarks.serve_hostile                  # builds the tiny bundles in a temporary folder
    python -m medc.benchmarks.serve_hostile --siglip B1 --gemma B2 --out benchmarks/results/serve-hostile-input

About two and a half minutes on 2 cores (the tiny builds included), in three parts:
1. Text stream. Per-token cost of streaming detokenisation + stop matching (runtime/textstream.py: TextStream, its
   DecodeStream and StopMatcher) on answers of 512, 2048 and 8192 ids of the real Gemma 3 tokenizer (the one the
   real-weights tests assemble under ~/.cache/medc/gguf/), with no stop strings and with 4 of 256 characters that
   never match (the whole answer is scanned). A/B baseline: the server's TextStream before it (runtime/serve.py at
   61b4c10, verbatim below: the whole answer re-decoded every token, the whole text searched for each stop, the
   held tail found by `endswith`), interleaved with it round by round in alternating order, the same ids; the
   ratio is old / new per round, then the median. Both must give the same text.
2. A live `medc serve` (a subprocess, with an API key, default limits) on the tiny MedSigLIP + MedGemma bundles:
   the 400 for a 1M-character stop string; the 400 for a 31 MiB body of 1M empty messages and for a 28 MiB body of
   empty arrays, /health probed on fresh connections all the while (its worst latency); storms of 20 concurrent
   image bombs (PNG 25000x2000 and 7000x7000, blank, zlib: ~140 KiB each) to a pad_to_square copy of the MedSigLIP
   bundle, one after another (--storms), the server's RSS sampled with psutil (peak growth, per storm and over the
   first) and /health probed; 2,000 idle sockets against the default --max-connections 256 (RLIMIT_NOFILE raised
   to the hard limit first, children inherit it; fewer sockets, said in the results, if the hard limit is lower),
   then the time for an authenticated request to be answered.
3. Bundle opening. `open_bundle` on copies of the tiny bundles: unverified, unsigned (sha256 + external-data
   checks) and signed with trust configured (+ the Ed25519 signature), interleaved; and
   `medc.runtime.onnxrefs.external_locations` on a synthetic ~500 MB ONNX model with embedded weights and on the
   same model with external data, against sha256 of the same file (the check every bundle open does anyway).

The measurements are gathered in one dict (`res`, the form of the JSON this script wrote before the shared result
schema) and `to_result` turns it into a benchmarks/schema.py Result: rows of kind "textstream" (one per answer length
and stops), "hostile" (one per attack: latency_ms of its requests, health_ms of the /health probes during it, the
answers' status counts, RSS), "bundle-open" and "onnx-refs"; what each part measured is in the run's notes.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import random
import re
import resource
import secrets
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
from medc.benchmarks import schema
from medc.benchmarks.schema import Metric, Row
from medc.benchmarks.serve_load import ServerProcess

OUT = Path("benchmarks/results/serve-hostile-input")
TAIL = 64  # the last ids of an answer: their cost per token is the cost at that answer length


# -- 1. the text stream -------------------------------------------------------------------------------------------------
class OldTextStream:
    """runtime/serve.py's TextStream at 61b4c10 (before runtime/textstream.py), verbatim: the A/B baseline."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.sent = 0  # characters already given out

    def push(self, token: int) -> tuple[str, bool]:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return "", False
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            return self._take(text[:min(hits)]), True
        hold = max((n for s in self.stop for n in range(len(s) - 1, 0, -1) if text.endswith(s[:n])), default=0)
        return self._take(text[:len(text) - hold]), False

    def flush(self) -> str:
        return self._take(self.tokenizer.decode(self.ids, skip_special_tokens=True))

    def _take(self, text: str) -> str:
        delta = text[self.sent:]
        self.sent = max(self.sent, len(text))
        return delta


# A radiology answer as a model writes one: sentences, markdown, numbers, non-ASCII (multi-byte UTF-8 ids).
PHRASES = [
    "The lungs are clear.", "No pleural effusion or pneumothorax.", "Heart size is normal (cardiothoracic ratio 0.48).",
    "Mild degenerative change of the thoracic spine.", "There is a 6 mm nodule in the right upper lobe.",
    "Follow-up CT in 6–12 months is suggested.", "Compared with the prior study of 12/03, the opacity has resolved.",
    "Temperature 38.2 °C; SpO₂ 94 %.", "Dose: 5 µg/kg.", "Findings are consistent with basal atelectasis ≥ 2 cm.",
    "The costophrenic angles are sharp.", "Café-au-lait macules are noted on the skin.", "\n\n**Impression:**\n",
    "\n- ", "Endotracheal tube tip 4 cm above the carina.", "No acute osseous abnormality.", "\n\n### Findings\n",
]


def answer(tokenizer, n: int) -> tuple[list[int], str]:
    """n ids of a deterministic answer, and its text."""
    rng, text = random.Random(0), ""
    while len(ids := tokenizer.encode(text, add_special_tokens=False).ids) < n:
        text += " ".join(rng.choice(PHRASES) for _ in range(400)) + " "
    ids = ids[:n]
    return ids, tokenizer.decode(ids, skip_special_tokens=True)


def stop_strings(text: str) -> list[str]:
    """4 stop strings of 256 characters, none in the answer: two begin as the answer does in places (the matcher
    climbs along them, holding up to 255 characters), two are runs of one character."""
    stops = [text[100:355] + "\x00", (PHRASES[0] + " ") * 13, "é" * 256, "-" * 256]
    stops[1] = stops[1][:255] + "\x00"
    assert all(len(s) == 256 and s not in text for s in stops)
    return stops


def _run_stream(stream, ids: list[int], old: bool) -> tuple[float, float, str]:
    """-> (mean s per token, mean s per token over the last TAIL ids, the text given out)."""
    out, head = [], len(ids) - TAIL
    t0 = time.perf_counter()
    for token in ids[:head]:
        out.append(stream.push(token)[0])
    t1 = time.perf_counter()
    for token in ids[head:]:
        out.append(stream.push(token)[0])
    t2 = time.perf_counter()
    out.append(stream.flush() if old else stream.flush()[0])
    return (t2 - t0) / len(ids), (t2 - t1) / TAIL, "".join(out)


def text_stream(tokenizer, lengths: list[int], rounds: int, log=print) -> list[dict]:
    """New vs old per (answer length, stops): each round runs both back to back (order alternating), each
    max(1, 8192 // length) times (median per round). -> one row per point, µs per token, medians over rounds."""
    from medc.runtime.textstream import TextStream

    ids_all, text = answer(tokenizer, max(lengths))
    configs = {"none": [], "4 x 256 chars": stop_strings(text)}
    raw = {(n, c): {"new": [], "old": [], "new_tail": [], "old_tail": [], "ratio": []} for n in lengths for c in configs}
    same = {}
    for r in range(rounds):
        for n in lengths:
            ids = ids_all[:n]
            for k, (cname, stops) in enumerate(configs.items()):
                got = {}
                for side in (("new", "old") if (r + k) % 2 == 0 else ("old", "new")):
                    runs = [_run_stream(TextStream(tokenizer, stops) if side == "new" else OldTextStream(tokenizer,
                                        stops), ids, side == "old") for _ in range(max(1, 8192 // n))]
                    got[side] = (statistics.median(x[0] for x in runs), statistics.median(x[1] for x in runs),
                                 runs[0][2])
                row = raw[(n, cname)]
                for side in ("new", "old"):
                    row[side].append(got[side][0])
                    row[side + "_tail"].append(got[side][1])
                row["ratio"].append(got["old"][0] / got["new"][0])
                same[(n, cname)] = same.get((n, cname), True) and got["new"][2] == got["old"][2]
        log(f"text stream round {r + 1}/{rounds}: " + ", ".join(
            f"{n}/{c[:4]} {raw[(n, c)]['ratio'][-1]:.1f}x" for n in lengths for c in configs))
    us = lambda xs: round(statistics.median(xs) * 1e6, 2)
    return [{"answer_ids": n, "answer_chars": len(tokenizer.decode(ids_all[:n], skip_special_tokens=True)),
             "stops": c, "new_us_per_token": us(v["new"]), "new_last64_us_per_token": us(v["new_tail"]),
             "old_us_per_token": us(v["old"]), "old_last64_us_per_token": us(v["old_tail"]),
             "old_over_new": round(statistics.median(v["ratio"]), 2),
             "old_over_new_per_round": [round(x, 2) for x in v["ratio"]], "same_text": same[(n, c)],
             **{f"{k}_us_per_round": [x * 1e6 for x in v[k]] for k in ("new", "new_tail", "old", "old_tail")}}
            for (n, c), v in raw.items()]


# -- 2. a live server -------------------------------------------------------------------------------------------------
def _request(url: str, method: str, path: str, body: bytes | None = None, key: str | None = None,
             timeout: float = 120) -> tuple[int | str, bytes, float]:
    """One request on a fresh connection -> (status, or the exception's name; body; seconds to the whole answer)."""
    u = urlsplit(url)
    headers = {"Content-Type": "application/json"} if body is not None else {}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    t = time.perf_counter()
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers)
        r = conn.getresponse()
        status, data = r.status, r.read()
    except OSError as e:
        status, data = type(e).__name__, b""
    finally:
        conn.close()
    return status, data, time.perf_counter() - t


def _code(data: bytes) -> str | None:
    try:
        return json.loads(data)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None


class Server(ServerProcess):
    """`medc serve` in a child process on a free loopback port, with an API key; SIGTERM on exit (serve_load's)."""

    def __init__(self, bundles: list[Path], key_file: Path, log_file: Path, extra: tuple = ()):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url, self.key, self.log_file = f"http://127.0.0.1:{port}", key_file.read_text().strip(), log_file
        with open(log_file, "wb") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "medc.cli", "-q", "serve", *map(str, bundles),
                                          "--port", str(port), "--api-key-file", str(key_file), *extra],
                                         stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"medc serve exited with {self.proc.returncode}:\n{log_file.read_text()[-2000:]}")
            if _request(self.url, "GET", "/ready", key=self.key, timeout=5)[0] == 200:
                models = json.loads(_request(self.url, "GET", "/v1/models", key=self.key)[1])["data"]
                self.models = {m["kind"]: m["id"] for m in models}
                return
            time.sleep(0.2)
        self.stop()
        raise SystemExit("medc serve did not become ready in 120 s")

    def rss(self) -> int:
        import psutil

        return psutil.Process(self.proc.pid).memory_info().rss


class Sampler:
    """In a thread while a with-block runs: `fn()` every `every` s (/health latency, the server's RSS)."""

    def __init__(self, fn, every: float):
        self.fn, self.every, self.values = fn, every, []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        while not self._done.is_set():
            self.values.append(self.fn())
            self._done.wait(self.every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join()


def health_probe(url: str):
    """/health on a fresh connection -> seconds, or None when it failed."""
    def probe():
        status, _, seconds = _request(url, "GET", "/health", timeout=60)
        return seconds if status == 200 else None
    return probe


def _health(values: list) -> dict:
    ok = [v for v in values if v is not None]
    return {"health_worst_ms": round(max(ok) * 1e3, 1) if ok else None,
            "health_p50_ms": round(statistics.median(ok) * 1e3, 2) if ok else None,
            "health_probes": len(values), "health_failed": len(values) - len(ok), "health_ms": [x * 1e3 for x in ok]}


def _ms(xs: list[float]) -> dict:
    return {"best_ms": round(min(xs) * 1e3, 2), "median_ms": round(statistics.median(xs) * 1e3, 2),
            "runs_ms": [round(x * 1e3, 2) for x in xs]}


def idle_health(server: Server, n: int = 50) -> dict:
    values = [health_probe(server.url)() for _ in range(n)]
    return {"attack": "none (idle server)", **_health(values)}


def long_stop(server: Server, runs: int = 5) -> dict:
    chat = server.models["chat"]
    warm = json.dumps({"model": chat, "messages": [{"role": "user", "content": "Is there a pneumothorax?"}],
                       "max_tokens": 4}).encode()
    assert _request(server.url, "POST", "/v1/chat/completions", warm, server.key)[0] == 200
    body = json.dumps({"model": chat, "messages": [{"role": "user", "content": "Is there a pneumothorax?"}],
                       "max_tokens": 8, "stop": ["x" * 1_000_000]}).encode()
    got = [_request(server.url, "POST", "/v1/chat/completions", body, server.key) for _ in range(runs)]
    return {"attack": "1M-character stop string", "body_mib": round(len(body) / 2**20, 2), "requests": runs,
            "answers": _answers(got), **_ms([g[2] for g in got])}


def _answers(got) -> str:
    counts = {}
    for status, data, _ in got:
        k = f"{status} {_code(data) or ''}".strip()
        counts[k] = counts.get(k, 0) + 1
    return ", ".join(f"{n}x {k}" for k, n in sorted(counts.items()))


def huge_bodies(server: Server, runs: int = 3, log=print) -> list[dict]:
    messages = json.dumps({"model": server.models["chat"],
                           "messages": [{"role": "user", "content": ""}] * 1_000_000}).encode()
    n = (28 * 2**20 - 15) // 3
    arrays = b'{"input": [' + b"[]," * n + b"[]]}"
    rows = []
    for name, path, body in (("1M empty messages", "/v1/chat/completions", messages),
                             (f"{n + 1:,} empty arrays", "/v1/embeddings", arrays)):
        got, health = [], []
        for _ in range(runs):
            with Sampler(health_probe(server.url), 0.005) as probe:
                got.append(_request(server.url, "POST", path, body, server.key))
            health += probe.values
        rows.append({"attack": f"{name} ({len(body) / 2**20:.1f} MiB body)", "body_mib": round(len(body) / 2**20, 2),
                     "requests": runs, "answers": _answers(got), **_ms([g[2] for g in got]), **_health(health)})
        log(f"{rows[-1]['attack']}: {rows[-1]['answers']}, best {rows[-1]['best_ms']} ms, /health worst "
            f"{rows[-1]['health_worst_ms']} ms")
    after = _request(server.url, "POST", "/v1/embeddings", json.dumps({"input": ["still serving"]}).encode(),
                     server.key)
    rows[-1]["embedding_after"] = after[0]
    return rows


def _png(size: tuple[int, int], fill: int = 0) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, fill).save(buf, format="PNG")  # zlib-compressed blank: a small file, a large image
    return buf.getvalue()


def image_storm(siglip: Path, tmp: Path, key_file: Path, storms: int, concurrent: int = 20, log=print) -> dict:
    padded = tmp / "medsiglip-tiny-pad-to-square"
    shutil.copytree(siglip, padded)
    manifest = json.loads((padded / "manifest.json").read_text())
    manifest["preprocessing"]["image"]["pad_to_square"] = True
    (padded / "manifest.json").write_text(json.dumps(manifest, indent=2))
    pngs = {"25000x2000": _png((25000, 2000)), "7000x7000": _png((7000, 7000))}
    with Server([padded], key_file, tmp / "serve-storm.log") as server:
        model = server.models["embeddings"]
        bodies = {k: json.dumps({"model": model, "images": ["data:image/png;base64," + base64.b64encode(v).decode()]
                                 }).encode() for k, v in pngs.items()}
        small = json.dumps({"model": model, "images": ["data:image/png;base64," + base64.b64encode(
            _png((640, 480), 128)).decode()]}).encode()
        assert _request(server.url, "POST", "/v1/embeddings", small, server.key)[0] == 200
        rounds, every = [], []
        for s in range(storms):
            base = server.rss()
            kinds = [list(bodies)[i % 2] for i in range(concurrent)]
            with Sampler(server.rss, 0.005) as rss, Sampler(health_probe(server.url), 0.005) as health, \
                    ThreadPoolExecutor(concurrent) as pool:
                t = time.perf_counter()
                got = list(pool.map(lambda k: _request(server.url, "POST", "/v1/embeddings", bodies[k], server.key),
                                    kinds))
                seconds = time.perf_counter() - t
            every += zip(got, kinds)
            time.sleep(1.0)
            rounds.append({"storm": s + 1, "seconds": round(seconds, 2),
                           "answers": "; ".join(f"{k}: {_answers([g for g, kk in zip(got, kinds) if kk == k])}"
                                                for k in bodies),
                           "rss_base_mib": round(base / 2**20, 1),
                           "rss_peak_growth_mib": round((max(rss.values) - base) / 2**20, 1),
                           "rss_after_1s_mib": round(server.rss() / 2**20, 1), "rss_samples": len(rss.values),
                           **_health(health.values)})
            log(f"image storm {s + 1}: {rounds[-1]}")
        after = _request(server.url, "POST", "/v1/embeddings", small, server.key)[0]
    return {"attack": f"image storm: {concurrent} concurrent, PNG 25000x2000 / 7000x7000 alternating",
            "png_kib": {k: round(len(v) / 1024, 1) for k, v in pngs.items()}, "requests": concurrent * storms,
            "answers": "; ".join(f"{k}: {_answers([g for g, kk in every if kk == k])}" for k in bodies),
            "storms": rounds, "small_image_after": after,
            "rss_peak_growth_mib": max(r["rss_peak_growth_mib"] for r in rounds),  # over each storm's own base
            "rss_peak_over_first_base_mib": round(max(r["rss_base_mib"] + r["rss_peak_growth_mib"] for r in rounds)
                                                  - rounds[0]["rss_base_mib"], 1),
            "health_worst_ms": max((r["health_worst_ms"] for r in rounds if r["health_worst_ms"] is not None),
                                   default=None),
            "runs_ms": [round(r["seconds"] * 1e3, 1) for r in rounds],
            "best_ms": round(min(r["seconds"] for r in rounds) * 1e3, 1),
            "median_ms": round(statistics.median(r["seconds"] for r in rounds) * 1e3, 1)}


def _closed(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        sock.setblocking(True)


def idle_sockets(server: Server, n: int, nofile: dict, log=print) -> dict:
    models = lambda: _request(server.url, "GET", "/v1/models", key=server.key)
    embed_body = json.dumps({"model": server.models["embeddings"], "input": ["pleural effusion"]}).encode()
    embed = lambda: _request(server.url, "POST", "/v1/embeddings", embed_body, server.key)
    before = [models()[2] for _ in range(5)]
    before_embed = [embed()[2] for _ in range(5)]
    u = urlsplit(server.url)
    socks = []
    try:
        t = time.perf_counter()
        for _ in range(n):
            socks.append(socket.create_connection((u.hostname, u.port), timeout=10))
        opened = time.perf_counter() - t
        first = models()
        first_embed = embed()
        after = [models()[2] for _ in range(5)]
        time.sleep(0.2)
        still_open = sum(not _closed(s) for s in socks)
    finally:
        for s in socks:
            s.close()
    row = {"attack": f"{n:,} idle sockets, then an authenticated request", "requests": 2 + len(after),
           "answers": _answers([first, first_embed]), "sockets_open_s": round(opened, 3),
           "first_models_ms": round(first[2] * 1e3, 2), "first_embedding_ms": round(first_embed[2] * 1e3, 2),
           "models_ms_without_idle_sockets": round(statistics.median(before) * 1e3, 2),
           "embedding_ms_without_idle_sockets": round(statistics.median(before_embed) * 1e3, 2),
           "models_runs_ms_without_idle_sockets": [x * 1e3 for x in before],
           "embedding_runs_ms_without_idle_sockets": [x * 1e3 for x in before_embed],
           "idle_sockets_left_open_by_server": still_open, "max_connections": 256, "nofile": nofile,
           **_ms([first[2], *after])}
    log(f"idle sockets: {row}")
    return row


def raise_nofile(need: int) -> dict:
    """Soft RLIMIT_NOFILE up to the hard limit (children inherit it) when `need` descriptors would not fit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    before = soft
    if soft < need:
        soft = hard if hard != resource.RLIM_INFINITY else need
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return {"soft_before": before, "soft": soft, "hard": hard}


# -- 3. bundle opening -----------------------------------------------------------------------------------------------
def bundle_open(bundles: dict[str, Path], tmp: Path, rounds: int, log=print) -> list[dict]:
    from medc.runtime.bundle import open_bundle, sign_bundle
    from medc.signing import Trust, generate, load_private

    key_path, pub_path = generate(tmp / "bench-signing")
    key, trust = load_private(key_path), Trust.load([pub_path])
    rows = []
    for name, src in bundles.items():
        unsigned, signed = tmp / f"{name}-unsigned", tmp / f"{name}-signed"
        shutil.copytree(src, unsigned)
        shutil.copytree(src, signed)
        sign_bundle(signed, key)
        assert open_bundle(signed, trust=trust).check.trusted and not open_bundle(unsigned).check.signed
        arms = {"unverified": lambda u=unsigned: open_bundle(u, verify=False),
                "unsigned": lambda u=unsigned: open_bundle(u, trust=None),
                "signed_trusted": lambda s=signed: open_bundle(s, trust=trust)}
        times = {a: [] for a in arms}
        for r in range(rounds):
            for a in (list(arms) if r % 2 == 0 else list(arms)[::-1]):
                t = time.perf_counter()
                arms[a]()
                times[a].append(time.perf_counter() - t)
        files = [p for p in unsigned.rglob("*") if p.is_file()]
        med = {a: statistics.median(v) * 1e3 for a, v in times.items()}
        rows.append({"bundle": name, "files": len(files), "mib": round(sum(p.stat().st_size for p in files) / 2**20, 2),
                     "rounds": rounds, **{f"{a}_ms": round(v, 2) for a, v in med.items()},
                     "signed_over_unsigned": round(statistics.median(
                         s / u for s, u in zip(times["signed_trusted"], times["unsigned"])), 3),
                     "signature_check_ms": round(med["signed_trusted"] - med["unsigned"], 2),
                     **{f"{a}_runs_ms": [x * 1e3 for x in v] for a, v in times.items()},
                     "signed_over_unsigned_per_round": [s / u for s, u in zip(times["signed_trusted"],
                                                                               times["unsigned"])]})
        log(f"open_bundle {name}: {rows[-1]}")
    return rows


def onnx_refs(tmp: Path, mb: int, repeats: int, log=print) -> list[dict]:
    import onnx
    from medc.manifest import sha256_file
    from medc.runtime.onnxrefs import external_locations
    from onnx import TensorProto, helper, numpy_helper

    n_tensors = 250
    each = mb * 10**6 // n_tensors // 4
    inits = [numpy_helper.from_array(np.full(each, i, np.float32), f"layers.{i}.weight") for i in range(n_tensors)]
    graph = helper.make_graph([helper.make_node("Add", ["x", "layers.0.weight"], ["y"])], "synthetic",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [each])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [each])], initializer=inits)
    model = helper.make_model(graph)
    del inits
    embedded, external = tmp / "embedded.onnx", tmp / "external.onnx"
    onnx.save_model(model, embedded)
    onnx.save_model(model, external, save_as_external_data=True, all_tensors_to_one_file=True,
                    location="external.onnx.data", size_threshold=0)  # converts `model` in place: embedded first
    del model
    data = tmp / "external.onnx.data"
    assert external_locations(embedded) == [] and external_locations(external) == ["external.onnx.data"] * n_tensors
    arms = {("embedded.onnx", "external_locations"): lambda: external_locations(embedded),
            ("embedded.onnx", "sha256"): lambda: sha256_file(embedded),
            ("external.onnx", "external_locations"): lambda: external_locations(external),
            ("external.onnx", "sha256"): lambda: sha256_file(external),
            ("external.onnx.data", "sha256"): lambda: sha256_file(data)}
    times = {a: [] for a in arms}
    for r in range(repeats + 1):  # the first pass warms the page cache and is dropped
        for a in (list(arms) if r % 2 == 0 else list(arms)[::-1]):
            t = time.perf_counter()
            arms[a]()
            if r:
                times[a].append(time.perf_counter() - t)
    rows = []
    for f, path in (("embedded.onnx", embedded), ("external.onnx", external), ("external.onnx.data", data)):
        walk, sha = times.get((f, "external_locations")), times[(f, "sha256")]
        # What a verified open hashes for this graph: the file, and the data file it names.
        every = [a + b for a, b in zip(sha, times[("external.onnx.data", "sha256")])] if f == "external.onnx" else sha
        rows.append({"file": f, "mb": round(path.stat().st_size / 1e6, 3), "tensors": n_tensors,
                     "external_locations_ms": round(statistics.median(walk) * 1e3, 3) if walk else None,
                     "sha256_ms": round(statistics.median(sha) * 1e3, 3),
                     "walk_over_sha256": round(statistics.median(w / s for w, s in zip(walk, sha)), 4) if walk else None,
                     "walk_over_sha256_with_data": round(statistics.median(w / s for w, s in zip(walk, every)), 4)
                     if walk else None, "repeats": repeats,
                     "external_locations_runs_ms": [x * 1e3 for x in walk] if walk else None,
                     "sha256_runs_ms": [x * 1e3 for x in sha]})
        log(f"onnx refs {f}: {rows[-1]}")
    return rows


# -- the result --------------------------------------------------------------------------------------------------------
def _metric(name: str, unit: str, raw, count: int, **stats) -> Metric:
    """From the raw values where the run kept them, else from the statistics it kept (older files)."""
    return Metric.of(name, unit, raw) if raw else Metric.summary(name, unit, count, **stats)


def _statuses(answers: str) -> list[Metric]:
    """"3x 400 too_many_json_values; ..." -> status_400 = 3 (counts of one status summed over the parts)."""
    counts: dict[str, int] = {}
    for n, status in re.findall(r"(\d+)x (\S+)", answers or ""):
        counts[status] = counts.get(status, 0) + int(n)
    return [Metric.of(f"status_{k}", "count", [v]) for k, v in counts.items()]


def stream_rows(ts: dict) -> list[Row]:
    rows = []
    for r in ts["rows"]:
        m = [_metric(f"{k}_us_per_token", "us", r.get(f"{raw}_us_per_round"), ts["rounds"], p50=r[f"{k}_us_per_token"])
             for k, raw in (("new", "new"), ("new_last64", "new_tail"), ("old", "old"), ("old_last64", "old_tail"))]
        m += [Metric.of("old_over_new", "x", r["old_over_new_per_round"]),
              Metric.of("same_text", "bool", [1.0 if r["same_text"] else 0.0])]
        rows.append(Row("textstream", "gemma3-tokenizer", "tokenizers",
                        {"answer_ids": r["answer_ids"], "answer_chars": r["answer_chars"], "stops": r["stops"]}, m))
    return rows


def attack_row(r: dict, bundle: str) -> Row:
    """One attack on a live server: its requests' latency, /health during it, the answers, and what it cost."""
    params: dict = {"attack": r["attack"]}
    for k in ("body_mib", "requests", "max_connections"):
        if k in r:
            params[k] = r[k]
    storms = r.get("storms") or []
    m = []
    if r.get("runs_ms"):
        m.append(Metric.of("latency_ms", "ms", r["runs_ms"]))  # an image storm's: each storm's whole time
    health_raw = [x for s in storms for x in s.get("health_ms", [])] if storms else r.get("health_ms")
    probes = sum(s["health_probes"] for s in storms) if storms else r.get("health_probes", 0)
    if r.get("health_worst_ms") is not None:
        m.append(_metric("health_ms", "ms", health_raw, probes, max=r["health_worst_ms"], p50=r.get("health_p50_ms")))
    if storms or "health_failed" in r:
        m.append(Metric.of("health_failed", "count",
                           [sum(s["health_failed"] for s in storms) if storms else r["health_failed"]]))
    m += _statuses(r.get("answers", ""))
    notes = [f"{r['attack']}: answers {r['answers']}"] if r.get("answers") else []
    if "first_models_ms" in r:  # the idle sockets
        m += [Metric.of("first_models_ms", "ms", [r["first_models_ms"]]),
              Metric.of("first_embedding_ms", "ms", [r["first_embedding_ms"]]),
              _metric("models_ms_without_idle_sockets", "ms", r.get("models_runs_ms_without_idle_sockets"), 5,
                      p50=r["models_ms_without_idle_sockets"]),
              _metric("embedding_ms_without_idle_sockets", "ms", r.get("embedding_runs_ms_without_idle_sockets"), 5,
                      p50=r["embedding_ms_without_idle_sockets"]),
              Metric.of("sockets_open_s", "s", [r["sockets_open_s"]]),
              Metric.of("idle_sockets_left_open_by_server", "count", [r["idle_sockets_left_open_by_server"]])]
    if storms:  # per-storm figures, in storm order
        params |= {"storms": len(storms), **{f"png_{k}_kib": v for k, v in r["png_kib"].items()}}
        for key, unit in (("rss_base_mib", "MiB"), ("rss_peak_growth_mib", "MiB"), ("rss_after_1s_mib", "MiB"),
                          ("rss_samples", "count"), ("health_probes", "count")):
            m.append(Metric.of(key, unit, [s[key] for s in storms]))
        m += [Metric.of("rss_peak_over_first_base_mib", "MiB", [r["rss_peak_over_first_base_mib"]]),
              Metric.of("storm_health_worst_ms", "ms", [s["health_worst_ms"] for s in storms]),
              Metric.of("storm_health_p50_ms", "ms", [s["health_p50_ms"] for s in storms])]
        each = {s["answers"] for s in storms}
        notes.append(f"{r['attack']}: each storm answered " + (each.pop() if len(each) == 1 else
                     "; ".join(f"storm {s['storm']}: {s['answers']}" for s in storms)))
        notes.append(f"{r['attack']}: a small image after the storms: {r['small_image_after']}")
    if "embedding_after" in r:
        notes.append(f"{r['attack']}: an embedding after: {r['embedding_after']}")
    return Row("hostile", bundle, "server", params, m, notes=notes)


def open_rows(res: dict) -> list[Row]:
    rows = []
    for r in res.get("bundle_open") or []:
        m = [_metric(f"{a}_ms", "ms", r.get(f"{a}_runs_ms"), r["rounds"], p50=r[f"{a}_ms"])
             for a in ("unverified", "unsigned", "signed_trusted")]
        m += [_metric("signed_over_unsigned", "x", r.get("signed_over_unsigned_per_round"), r["rounds"],
                      p50=r["signed_over_unsigned"]),
              Metric.of("signature_check_ms", "ms", [r["signature_check_ms"]])]  # signed p50 - unsigned p50
        rows.append(Row("bundle-open", r["bundle"], "medc", {"files": r["files"], "mib": r["mib"],
                                                              "rounds": r["rounds"]}, m))
    for r in res.get("onnx_refs") or []:
        m = []
        if r["external_locations_ms"] is not None:
            m.append(_metric("external_locations_ms", "ms", r.get("external_locations_runs_ms"), r["repeats"],
                             p50=r["external_locations_ms"]))
        m.append(_metric("sha256_ms", "ms", r.get("sha256_runs_ms"), r["repeats"], p50=r["sha256_ms"]))
        for k in ("walk_over_sha256", "walk_over_sha256_with_data"):
            if r[k] is not None:
                m.append(Metric.summary(k, "x", r["repeats"], p50=r[k]))
        rows.append(Row("onnx-refs", r["file"], "medc", {"file": r["file"], "mb": r["mb"], "tensors": r["tensors"],
                                                         "repeats": r["repeats"]}, m))
    return rows


def method_notes(res: dict) -> list[str]:
    """What each part measured and how (the prose of the old Markdown, kept with the numbers)."""
    notes = [f"1-minute load average before / after: {res['loadavg_before_after']}; {res['seconds']} s in all"]
    if res.get("text_stream"):
        ts = res["text_stream"]
        notes.append(
            f"1. Text stream (textstream rows): per-token cost of detokenisation + stop matching. Real Gemma 3 "
            f"tokenizer ({ts['tokenizer_vocab']:,} ids, {ts['tokenizer']}); a deterministic radiology answer "
            "(markdown, numbers, non-ASCII). new = runtime/textstream.py (DecodeStream + KMP StopMatcher); old = the "
            "server's TextStream at 61b4c10 (whole answer re-decoded every token, whole text searched for each stop, "
            f"held tail by `endswith`). {ts['rounds']} rounds, new and old back to back in alternating order, each run "
            "max(1, 8192 / ids) times a round; medians. us per token: mean over the answer, and over its last 64 ids "
            "(the cost of a token at that length). old / new: median of per-round ratios of the means (samples: the "
            "rounds). same_text 1: both gave the same text.")
    if res.get("server"):
        sv = res["server"]
        notes += [
            ("2. A live `medc serve` under attack (hostile rows): a `medc serve` subprocess with an API key and the "
            "default limits (--max-connections 256, --max-body-mb 32, 4 stop strings of 256 characters, 100,000 JSON "
            "objects and arrays, 8192 px a side, 50 MP), on loopback; the client in this process, one fresh "
            "connection per request. /health is probed on a fresh connection every 5 ms while an attack runs "
            "(health_ms; idle server: 50 probes back to back). The image storm goes to a second server on a "
            "pad_to_square copy of the tiny MedSigLIP bundle; its RSS is sampled every 5 ms with psutil (growth over "
            f"the RSS before the storm). RLIMIT_NOFILE: {sv['nofile']}; {sv['idle_sockets']} idle sockets."),
            ("latency_ms samples: every request of the attack in order (the first is the first request); for the image "
            "storm, each storm's whole time; per-storm figures (rss_*, storm_health_*) are samples in storm order; "
            "status_<code>: how many answers had that status (the error codes are in the row's notes).")]
    if res.get("bundle_open"):
        notes.append(
            "3. Bundle opening (bundle-open rows): `medc.runtime.bundle.open_bundle` on copies of the tiny bundles: "
            "unverified (verify=False), unsigned (every file's sha256 + external-data locations), signed and opened "
            "with trust configured (+ the Ed25519 signature over the canonical manifest; `medc.signing.generate`, "
            "`sign_bundle`, `Trust.load`). The three arms interleaved, order alternating by round; medians; signed / "
            "unsigned is the median of per-round ratios; signature_check_ms = signed p50 - unsigned p50.")
    if res.get("onnx_refs"):
        notes.append(
            "onnx-refs rows: `medc.runtime.onnxrefs.external_locations` (a walk of the protobuf wire format over an "
            "mmap) on a synthetic ONNX model of 250 float32 initializers, weights embedded and as external data, "
            "against `medc.manifest.sha256_file` of the same file (which every verified open does anyway). Page cache "
            "warm (one pass dropped), interleaved, medians; walk_over_sha256_with_data: over the sha256 of the file "
            "and its data.")
    return notes


def to_result(res: dict, run: schema.RunInfo) -> schema.Result:
    """The run's measurements (`res`) as a schema Result; `run.notes` gets what each part measured."""
    rows = stream_rows(res["text_stream"]) if res.get("text_stream") else []
    for r in (res.get("server") or {}).get("attacks", []):
        storm = "storms" in r
        rows.append(attack_row(r, "medsiglip-tiny-pad-to-square" if storm else "medsiglip-tiny+medgemma-tiny"))
    rows += open_rows(res)
    run.notes = [*run.notes, *method_notes(res)]
    return schema.Result(run, rows, "medc serve: what the hostile-input limits cost and guarantee")


def run_header(bundles: list[Path], argv: list[str]) -> schema.RunInfo:
    from importlib import metadata

    from medc.benchmarks.host import bundle_info, run_info

    run = run_info(None, bundles=[bundle_info(b) for b in bundles],
                   command=shlex.join(["python", "-m", "medc.benchmarks.serve_hostile", *argv]))
    for pkg in ("tokenizers", "uvicorn", "starlette", "httptools", "uvloop", "orjson", "pillow", "cryptography",
                "psutil"):
        try:
            run.toolchain[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    here = Path(__file__).resolve().parent
    dirty = subprocess.run(["git", "-C", str(here), "diff", "--quiet", "HEAD", "--"], check=False,
                           capture_output=True).returncode
    if dirty == 1:
        run.notes.append("working tree with uncommitted changes")
    return run


def build_bundles(tmp: Path, log=print) -> dict[str, Path]:
    out = {}
    for model in ("medsiglip-tiny", "medgemma-tiny"):
        out[model] = tmp / model
        log(f"building {model} (medc build) ...")
        subprocess.run([sys.executable, "-m", "medc.cli", "-q", "build", model, "-o", str(out[model])], check=True,
                       stdout=subprocess.DEVNULL)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--siglip", type=Path, help="A tiny MedSigLIP bundle (default: built with medc build).")
    ap.add_argument("--gemma", type=Path, help="A tiny MedGemma bundle (default: built with medc build).")
    ap.add_argument("--tokenizer", type=Path, help="Gemma 3's tokenizer.json (default: ~/.cache/medc/gguf/*/).")
    ap.add_argument("--parts", default="stream,server,bundle")
    ap.add_argument("--lengths", default="512,2048,8192", help="Answer lengths in ids.")
    ap.add_argument("--rounds", type=int, default=3, help="Text stream: interleaved rounds.")
    ap.add_argument("--storms", type=int, default=12, help="Image storms, one after another (RSS across them).")
    ap.add_argument("--idle-sockets", type=int, default=2000)
    ap.add_argument("--open-rounds", type=int, default=20, help="Bundle opening: interleaved rounds.")
    ap.add_argument("--onnx-mb", type=int, default=500)
    ap.add_argument("--onnx-repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=OUT, help="Write OUT.json and OUT.md.")
    args = ap.parse_args(argv)
    parts = set(args.parts.split(","))
    os.environ.pop("MEDC_TRUSTED_KEYS", None)  # trust is configured explicitly below; the servers serve unsigned
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t_start, load_before = time.perf_counter(), os.getloadavg()
    res: dict = {}
    used: list[Path] = []
    with tempfile.TemporaryDirectory(prefix="medc-hostile-") as tmp_name:
        tmp = Path(tmp_name)
        if parts & {"server", "bundle"}:
            built = build_bundles(tmp / "built") if not (args.siglip and args.gemma) else {}
            siglip = args.siglip or built["medsiglip-tiny"]
            gemma = args.gemma or built["medgemma-tiny"]
            used = [siglip, gemma]
        if "stream" in parts:
            from tokenizers import Tokenizer

            found = sorted(Path.home().glob(".cache/medc/gguf/*/tokenizer.json"))
            path = args.tokenizer or (found[0] if found else None)
            if path is None:
                raise SystemExit("no Gemma 3 tokenizer.json under ~/.cache/medc/gguf/: run the real-weights tests "
                                 "(pytest tests/test_gemma_real.py) once, or pass --tokenizer")
            tok = Tokenizer.from_file(str(path))
            lengths = [int(x) for x in args.lengths.split(",")]
            res["text_stream"] = {"tokenizer": str(path), "tokenizer_vocab": tok.get_vocab_size(),
                                  "rounds": args.rounds, "lengths": lengths,
                                  "rows": text_stream(tok, lengths, args.rounds)}
        if "server" in parts:
            nofile = raise_nofile(args.idle_sockets + 256)
            n_idle = min(args.idle_sockets, nofile["soft"] - 256)
            key_file = tmp / "api-key"
            key_file.write_text(secrets.token_hex(24) + "\n")
            key_file.chmod(0o600)
            attacks = []
            with Server([siglip, gemma], key_file, tmp / "serve.log") as server:
                attacks.append(idle_health(server))
                attacks.append(long_stop(server))
                print(f"long stop: {attacks[-1]}")
                attacks += huge_bodies(server)
                attacks.append(idle_sockets(server, n_idle, nofile))
            attacks.append(image_storm(siglip, tmp, key_file, args.storms))
            res["server"] = {"nofile": nofile, "idle_sockets": n_idle, "attacks": attacks}
        if "bundle" in parts:
            (tmp / "open").mkdir()
            res["bundle_open"] = bundle_open({"medsiglip-tiny": siglip, "medgemma-tiny": gemma}, tmp / "open",
                                             args.open_rounds)
            res["onnx_refs"] = onnx_refs(tmp, args.onnx_mb, args.onnx_repeats)
        run = run_header(used, sys.argv[1:] if argv is None else argv)  # while the built bundles still exist
    res["loadavg_before_after"] = [round(load_before[0], 2), round(os.getloadavg()[0], 2)]
    res["seconds"] = round(time.perf_counter() - t_start, 1)
    result = to_result(res, run)
    j, md = schema.save(result, args.out)
    print(md.read_text())
    print(f"wrote {j} and {md}")


if __name__ == "__main__":
    main()
