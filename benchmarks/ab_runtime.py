"""Two medc versions on the same generative bundle, interleaved round by round: decode and prefill speed, A vs B.

For changes to the runtime that must not slow it down. Each side is a regular install of one medc version (for the
working tree: `pip install --no-deps --target DIR .`); each round runs `medc bench` once per side, alternating
which goes first, in fresh processes from a neutral folder (so neither side imports the other's source). The
ratios are B / A per round, and their median: this machine's speed drifts over minutes, so only interleaved ratios
compare.

    python benchmarks/ab_runtime.py BUNDLE --a /tmp/site-main --b /tmp/site-new --rounds 4 \\
        --out benchmarks/results/NAME
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from medc.benchmarks.schema import Metric, Result, Row

# name -> unit; tpot_p50_ms is the median inter-token latency of a run (the ratios are per round, not per token)
METRICS = {"decode_tok_s": "tok/s", "prefill_tok_s": "tok/s", "ttft_ms": "ms", "tpot_p50_ms": "ms"}


def _medians(doc) -> dict:
    """Per metric, the median over `medc bench`'s runs: from a result-schema file (this medc) or the list of rows an
    older medc wrote (side A is often an older version)."""
    if isinstance(doc, dict) and doc.get("schema"):
        rows = [r for r in doc["rows"] if r["kind"] == "generation" and not r["params"].get("past")]
        got = {}
        for m in METRICS:
            name = "tpot_ms" if m == "tpot_p50_ms" else m
            vals = [x["p50"] if x["p50"] is not None else x["avg"] for r in rows for x in r["metrics"]
                    if x["name"] == name]
            got[m] = statistics.median(vals)
        return got
    rows = [r for r in doc if r.get("kind", "run") == "run"]
    return {m: statistics.median(r[m] for r in rows) for m in METRICS}


def bench(site: str, bundle: Path, args, out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": site, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "medc.cli", "bench", str(bundle), "--prompt-tokens", str(args.prompt_tokens),
           "--new-tokens", str(args.new_tokens), "--past", "", "--repeat", str(args.repeat), "--warmup", "1",
           "--threads", str(args.threads), "--json", str(out)]
    subprocess.run(cmd, env=env, cwd=tempfile.gettempdir(), check=True, capture_output=True, text=True)
    return _medians(json.loads(out.read_text()))


def result(rounds: list[dict], bundle: str, a: str, b: str, params: dict, run=None) -> Result:
    """Rows: side A, side B (per-round medians as samples) and B / A (per-round ratios: their p50 is the headline)."""
    from medc.benchmarks.host import run_info

    rows = []
    for side, site in (("A", a), ("B", b)):
        rows.append(Row("ab", bundle, "onnxruntime", {"side": side, "site": site, **params},
                        [Metric.of(m, unit, [x[f"{side.lower()}_{m}"] for x in rounds]) for m, unit in METRICS.items()]))
    rows.append(Row("ab", bundle, "onnxruntime", {"side": "B/A", "site": f"{b} / {a}", **params},
                    [Metric.of(f"ratio_{m}", "x", [x[f"ratio_{m}"] for x in rounds]) for m in METRICS]))
    run = run or run_info(params.get("threads"), ["CPUExecutionProvider"])
    order = ", ".join(f"round {x['round'] + 1}: {x['first'].upper()} first" for x in rounds)
    run.notes = [(f"A: {a}; B: {b}. One `medc bench` per side per round, in fresh processes, alternating which goes "
                  "first; ratios are B / A per round (tokens/s: above 1 is B faster; ms: below 1 is), the headline is "
                  "their median (the p50 of the ratio_* metrics)"),
                 f"order: {order}", *run.notes]
    title = (f"A/B runtime: {bundle}, {params['prompt_tokens']}-token prompt + {params['new_tokens']} greedy tokens, "
             f"{params['threads']} threads, {len(rounds)} interleaved rounds")
    return Result(run, rows, title)


def main() -> None:
    from medc.benchmarks import schema

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--a", required=True, help="PYTHONPATH of version A (a regular install)")
    ap.add_argument("--b", required=True, help="PYTHONPATH of version B")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, required=True, help="results path without suffix (.json and .md written)")
    args = ap.parse_args()
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = ("a", "b") if r % 2 == 0 else ("b", "a")
            got = {side: bench(getattr(args, side), args.bundle, args, Path(tmp) / f"{side}{r}.json") for side in order}
            rounds.append({"round": r, "first": order[0], **{f"{s}_{m}": got[s][m] for s in "ab" for m in METRICS},
                           **{f"ratio_{m}": got["b"][m] / got["a"][m] for m in METRICS}})
            print(f"round {r + 1}: decode B/A {rounds[-1]['ratio_decode_tok_s']:.3f}, "
                  f"prefill B/A {rounds[-1]['ratio_prefill_tok_s']:.3f}", flush=True)
    params = {"prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "threads": args.threads,
              "repeat": args.repeat}
    res = result(rounds, args.bundle.name, args.a, args.b, params)
    res.run.command = " ".join(["python benchmarks/ab_runtime.py", *sys.argv[1:]])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    schema.save(res, args.out)
    print(schema.to_markdown(res))


if __name__ == "__main__":
    main()
