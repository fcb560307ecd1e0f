"""Load through `medc listen`: C-STORE acknowledgement latency and instances/s, written as a benchmark result.

    python benchmarks/listen_load.py bundles/medsiglip-tiny /tmp/medsiglip-448-int8:20:1.0 --out benchmarks/results/listen-load

Each bundle (BUNDLE[:N instances[:seconds between sends]]; default --instances, back to back) is run through a `medc listen` subprocess in two arms:
`process` (the default: inference in a separate worker process) and `inline` (--inline-workers: inference in threads of
the SCP's own process, as before the worker process existed). The arms alternate for --rounds rounds and the rounds are
pooled, so a drift of the machine's speed over minutes hits both. Each run sends N instances made from pydicom's
CT_small.dcm (new UIDs each, built in memory before the clock starts) back to back over one association from a
pynetdicom client in this process (TCP_NODELAY set, see run_once); the ack latency is the client's time around each send_c_store (encode, send,
fsync'd store, response). Instances/s is N over the time from the first send to the last result JSON on disk.

The result (benchmarks/schema.py, JSON + Markdown) has one row of kind "listen" per bundle and arm, the rounds pooled:
params {arm, instances, interval_s, rounds}; metrics latency_ms (every C-STORE's ack latency, all rounds),
instances_per_s, send_s, total_s and stored_ok (one sample per round, in round order).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from medc.benchmarks import schema
from medc.benchmarks.schema import Metric, Row


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
    acks_ms: list[float] = field(default_factory=list, repr=False)  # every C-STORE's ack latency


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
                     instances_per_s=round(n / total, 2), acks_ms=acks)


def rows(runs: list[RunResult]) -> list[Row]:
    """One "listen" row per bundle and arm: every ack of every round, and the per-round figures in round order."""
    out = []
    for bundle, arm in dict.fromkeys((r.bundle, r.arm) for r in runs):
        rs = sorted((r for r in runs if (r.bundle, r.arm) == (bundle, arm)), key=lambda r: r.round)
        per_round = [Metric.of(name, unit, [getattr(r, name) for r in rs]) for name, unit in
                     (("instances_per_s", "instances/s"), ("send_s", "s"), ("total_s", "s"), ("stored_ok", "count"))]
        out.append(Row("listen", bundle, "server",
                       {"arm": arm, "instances": rs[0].instances, "interval_s": rs[0].interval_s, "rounds": len(rs)},
                       [Metric.of("latency_ms", "ms", [a for r in rs for a in r.acks_ms]), *per_round]))
    return out


def main(argv=None) -> None:
    from medc.benchmarks.host import bundle_info, run_info

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
    paths = []
    for spec in args.bundles:
        path, n, interval = ([*spec.split(":"), "", ""] if not os.path.isdir(spec) else [spec, "", ""])[:3]
        paths.append(Path(path))
        for rnd in range(args.rounds):
            arms = args.arms.split(",")
            for arm in arms if rnd % 2 == 0 else arms[::-1]:
                r = run_once(Path(path), arm, int(n or args.instances), rnd, args.threads, args.timeout,
                             float(interval or 0))
                print(json.dumps({k: v for k, v in asdict(r).items() if k != "acks_ms"}), flush=True)
                runs.append(r)
    argv = sys.argv[1:] if argv is None else argv
    run = run_info(args.threads, bundles=[bundle_info(p) for p in paths],
                   command=shlex.join(["python", "benchmarks/listen_load.py", *argv]))
    run.notes = [("client (pynetdicom, one association, TCP_NODELAY) on the same machine; `process` = inference in the "
                  "worker process, `inline` = in threads of the SCP process (before the worker process existed); arms "
                  f"alternate for {args.rounds} rounds"),
                 "1-minute load average after: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())]
    result = schema.Result(run, rows(runs), "medc listen: C-STORE ack latency and instances/s")
    for r in result.rows:
        print(f"{r.bundle}/{r.params['arm']}: ack p50 {r.metric('latency_ms').p50} ms, p99 "
              f"{r.metric('latency_ms').p99} ms, {r.metric('instances_per_s').p50} instances/s")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        schema.save(result, args.out)

if __name__ == "__main__":
    main()
