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

METRICS = ("decode_tok_s", "prefill_tok_s", "ttft_ms", "tpot_p50_ms")


def bench(site: str, bundle: Path, args, out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": site, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "medc.cli", "bench", str(bundle), "--prompt-tokens", str(args.prompt_tokens),
           "--new-tokens", str(args.new_tokens), "--past", "", "--repeat", str(args.repeat), "--warmup", "1",
           "--threads", str(args.threads), "--json", str(out)]
    subprocess.run(cmd, env=env, cwd=tempfile.gettempdir(), check=True, capture_output=True, text=True)
    rows = [r for r in json.loads(out.read_text()) if r.get("kind", "run") == "run"]
    return {m: statistics.median(r[m] for r in rows) for m in METRICS}


def main() -> None:
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
    summary = {m: statistics.median(x[f"ratio_{m}"] for x in rounds) for m in METRICS}
    result = {"bundle": str(args.bundle), "a": args.a, "b": args.b, "prompt_tokens": args.prompt_tokens,
              "new_tokens": args.new_tokens, "threads": args.threads, "repeat": args.repeat, "rounds": rounds,
              "median_ratio_b_over_a": summary}
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    md = [f"# A/B runtime: {args.bundle.name}, {args.prompt_tokens}-token prompt + {args.new_tokens} greedy tokens, "
          f"{args.threads} threads, {args.rounds} interleaved rounds", "",
          f"A: `{args.a}`; B: `{args.b}`. Ratios are B / A (tokens/s: above 1 is B faster; ms: below 1 is).", "",
          "| round | first | decode tok/s A | decode tok/s B | B/A | prefill tok/s A | prefill tok/s B | B/A | "
          "TPOT p50 ms A | B | B/A |", "|" + "---|" * 11]
    for x in rounds:
        md.append(f"| {x['round'] + 1} | {x['first'].upper()} | {x['a_decode_tok_s']:.1f} | {x['b_decode_tok_s']:.1f} | "
                  f"{x['ratio_decode_tok_s']:.3f} | {x['a_prefill_tok_s']:.1f} | {x['b_prefill_tok_s']:.1f} | "
                  f"{x['ratio_prefill_tok_s']:.3f} | {x['a_tpot_p50_ms']:.2f} | {x['b_tpot_p50_ms']:.2f} | "
                  f"{x['ratio_tpot_p50_ms']:.3f} |")
    md += ["", "Median of per-round ratios: " + ", ".join(f"{m} {v:.3f}" for m, v in summary.items())]
    args.out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
