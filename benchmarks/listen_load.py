"""Load through `medc listen`: C-STORE acknowledgement latency and instances/s, written as JSON + Markdown.

    python benchmarks/listen_load.py bundles/medsiglip-tiny /tmp/medsiglip-448-int8:20:1.0 --out benchmarks/results/listen-load

Each bundle (BUNDLE[:N instances[:seconds between sends]]; default --instances, back to back) is run through a `medc listen` subprocess in two arms:
`process` (the default: inference in a separate worker process) and `inline` (--inline-workers: inference in threads of
the SCP's own process, as before the worker process existed). The arms alternate for --rounds rounds and the rounds are
pooled, so a drift of the machine's speed over minutes hits both. Each run sends N instances made from pydicom's
CT_small.dcm (new UIDs each, built in memory before the clock starts) back to back over one association from a
pynetdicom client in this process (TCP_NODELAY set, see run_once); the ack latency is the client's time around each send_c_store (encode, send,
fsync'd store, response). Instances/s is N over the time from the first send to the last result JSON on disk.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np


@dataclass
class RunResult:
    bundle: str
    arm: str  # process | inline
    round: int
    instances: int
    stored_ok: int
    ack_p50_ms: float
    ack_p99_ms: float
    ack_max_ms: float
    interval_s: float  # pause between sends (0: back to back)
    send_s: float  # first send to last ack
    total_s: float  # first send to last result
    instances_per_s: float


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _datasets(n: int) -> list:
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    base = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    base.StudyInstanceUID, base.SeriesInstanceUID = generate_uid(), generate_uid()
    out = []
    for i in range(n):
        ds = copy.deepcopy(base)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = i + 1
        out.append(ds)
    return out


def run_once(bundle: Path, arm: str, n: int, rnd: int, threads: int | None, timeout: float,
             interval: float = 0.0) -> RunResult:
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage

    datasets = _datasets(n)
    work = Path(tempfile.mkdtemp(prefix="medc-listen-load-"))
    port = _free_port()
    log = open(work / "listen.log", "w")  # noqa: SIM115
    cmd = [sys.executable, "-m", "medc.cli", "listen", str(bundle), "--out", str(work / "out"), "--port", str(port)]
    cmd += ["--inline-workers"] if arm == "inline" else []
    cmd += ["--threads", str(threads)] if threads else []
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        end = time.time() + 300
        while "listening as" not in (work / "listen.log").read_text():
            if proc.poll() is not None or time.time() > end:
                raise SystemExit((work / "listen.log").read_text())
            time.sleep(0.1)
        ae = AE(ae_title="LOADGEN")
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", port, ae_title="MEDC")
        assert assoc.is_established, "no association"
        # Without it the client's Nagle waits for the listener's delayed ACK: +40 ms on every C-STORE of a dataset
        # larger than one PDU (dcmtk's storescu shows the same 40 ms), which is the client's doing, not the listener's.
        assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        acks, ok = [], 0
        t0 = time.perf_counter()
        for i, ds in enumerate(datasets):
            if interval and i:
                time.sleep(interval)  # a slower sender: its C-STOREs arrive while the worker infers
            t = time.perf_counter()
            status = assoc.send_c_store(ds)
            acks.append((time.perf_counter() - t) * 1e3)
            ok += getattr(status, "Status", None) == 0x0000
        t_sent = time.perf_counter()
        assoc.release()
        results = work / "out" / "results"
        end = time.time() + timeout
        while sum(1 for p in results.glob("*.json")) < ok:
            if time.time() > end:
                raise SystemExit(f"{arm}: results missing after {timeout} s")
            time.sleep(0.02)
        total = time.perf_counter() - t0
    finally:
        proc.terminate()
        proc.wait(60)
        log.close()
        shutil.rmtree(work, ignore_errors=True)
    a = np.array(acks)
    return RunResult(bundle=bundle.name, arm=arm, round=rnd, instances=n, stored_ok=ok,
                     ack_p50_ms=round(float(np.percentile(a, 50)), 2), ack_p99_ms=round(float(np.percentile(a, 99)), 2),
                     ack_max_ms=round(float(a.max()), 2), interval_s=interval, send_s=round(t_sent - t0, 3), total_s=round(total, 3),
                     instances_per_s=round(n / total, 2))


def pooled(runs: list[RunResult]) -> dict:
    """Per bundle and arm: medians over rounds of p50, p99 and instances/s."""
    out = {}
    for key in sorted({(r.bundle, r.arm) for r in runs}):
        rs = [r for r in runs if (r.bundle, r.arm) == key]
        out[f"{key[0]}/{key[1]}"] = {
            "rounds": len(rs), "instances": rs[0].instances, "interval_s": rs[0].interval_s,
            "ack_p50_ms": round(float(np.median([r.ack_p50_ms for r in rs])), 2),
            "ack_p99_ms": round(float(np.median([r.ack_p99_ms for r in rs])), 2),
            "instances_per_s": round(float(np.median([r.instances_per_s for r in rs])), 2)}
    return out


def markdown(meta: dict, runs: list[RunResult]) -> str:
    lines = ["# medc listen: C-STORE ack latency and instances/s", "",
             (f"{meta['cpu']} ({meta['cpu_count']} cores), commit {meta['commit']}; client (pynetdicom, one "
              f"association, TCP_NODELAY) on the same machine; `process` = inference in the worker process, `inline` = "
              f"in threads of the SCP process (before); arms alternate for {meta['rounds']} rounds; ONNX Runtime "
              f"threads: {meta['threads'] or 'default'}."), "", "## Pooled (median over rounds)", "",
             "| bundle / arm | instances | ack p50 ms | ack p99 ms | instances/s |", "|---|---|---|---|---|"]
    for k, v in meta["pooled"].items():
        lines.append(f"| {k} | {v['instances']} | {v['ack_p50_ms']} | {v['ack_p99_ms']} | {v['instances_per_s']} |")
    lines += ["", "## Runs", "", "| " + " | ".join(RunResult.__dataclass_fields__) + " |",
              "|" + "---|" * len(RunResult.__dataclass_fields__)]
    lines += ["| " + " | ".join(str(v) for v in asdict(r).values()) + " |" for r in runs]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    from medc.system import cpu_info, git_commit

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundles", nargs="+", help="BUNDLE or BUNDLE:N (instances for that bundle)")
    ap.add_argument("--instances", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--arms", default="inline,process")
    ap.add_argument("--threads", type=int, default=None, help="--threads for medc listen")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for the results of one run")
    ap.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.md")
    args = ap.parse_args(argv)
    runs: list[RunResult] = []
    for spec in args.bundles:
        path, n, interval = ([*spec.split(":"), "", ""] if not os.path.isdir(spec) else [spec, "", ""])[:3]
        for rnd in range(args.rounds):
            arms = args.arms.split(",")
            for arm in arms if rnd % 2 == 0 else arms[::-1]:
                r = run_once(Path(path), arm, int(n or args.instances), rnd, args.threads, args.timeout,
                             float(interval or 0))
                print(json.dumps(asdict(r)), flush=True)
                runs.append(r)
    meta = {"cpu": cpu_info(), "cpu_count": os.cpu_count(), "commit": git_commit(), "rounds": args.rounds,
            "threads": args.threads, "loadavg_after": list(os.getloadavg()), "pooled": pooled(runs)}
    print(json.dumps(meta["pooled"], indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps({**meta, "runs": [asdict(r) for r in runs]}, indent=1))
        args.out.with_suffix(".md").write_text(markdown(meta, runs))


if __name__ == "__main__":
    main()
