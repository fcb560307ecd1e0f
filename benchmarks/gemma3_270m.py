"""Gemma 3 270M (real weights, text only) on this CPU: medc bundles vs llama.cpp vs HF transformers, 2 threads.

    python benchmarks/gemma3_270m.py bundles/g270-fp32 bundles/g270-int8 bundles/g270-int4 --rounds 3

Every backend gets the same 512 token ids (medc's tokenizer; BOS included, the base model has no chat template) and
decodes 128 greedy tokens without stopping at EOS, on 2 threads:

- medc: each bundle through `GemmaPipeline.stream` (ONNX Runtime, intra-op threads 2), as `medc bench` times it
- llama.cpp (llama-cpp-python) on the GGUF the bundles were built from (Q4_K_M): like llama-bench, prefill is one
  `eval` of the 512 prompt ids (pp512), decode is single-token `eval`s, each followed by a greedy argmax (tg128)
- HF transformers fp32 (the GGUF dequantised, as medc's fidelity reference), PyTorch eager: a manual loop with the
  KV cache and `logits_to_keep=1`, so it computes no logits it does not use

Prefill tok/s = 512 / (prompt in -> first token); decode tok/s = 127 / (first token -> 128th token). One round runs
every backend once, in a fixed order (A B C A B C ...), with a pause between backends so one's spinning threads do not
eat into the next; this machine's speed drifts by up to 2x over minutes, so the ratios are taken per round (same
drift on both sides) and the headline is their median. Each medc bundle is also timed decoding at past 128 and past
2048 (32 tokens each), interleaved the same way. Writes benchmarks/results/gemma3-270m-cpu.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DEFAULT_GGUF = Path.home() / ".cache" / "medc" / "gemma3-270m-q4_k_m.gguf"


def rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


class OtherLoad:
    """CPU cores kept busy by everything but this process (VM steal included) since it was made.

    Spin-waiting thread pools (llama.cpp, OpenMP, ONNX Runtime) slow down far more than 2x when 2 threads share 2
    cores with other work: each run records the other load before and during it, and a round in which it reached
    --quiet cores is kept in the report but left out of the headline."""

    def __init__(self):
        import psutil

        self._me = psutil.Process()
        self._start = (self._own(), self._busy(), time.perf_counter())

    def _own(self) -> float:
        return sum(self._me.cpu_times()[:2])

    @staticmethod
    def _busy() -> float:
        import psutil

        t = psutil.cpu_times()
        return sum(getattr(t, k, 0.0) for k in ("user", "nice", "system", "irq", "softirq", "steal"))

    def cores(self) -> float:
        own, busy, wall = self._start
        return max(0.0, (self._busy() - busy - (self._own() - own)) / (time.perf_counter() - wall))


def background_cores(seconds: float) -> float:
    """Other processes' CPU load over `seconds` of this process idling."""
    load = OtherLoad()
    time.sleep(seconds)
    return load.cores()


# -- llama.cpp ----------------------------------------------------------------------------------------------------------
def load_llama(gguf: Path, threads: int, n_ctx: int):
    from llama_cpp import Llama

    return Llama(model_path=str(gguf), n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx, n_batch=512,
                 n_ubatch=512, logits_all=False, verbose=False)


def llama_generate_timed(llm, ids: list[int], new_tokens: int) -> tuple[float, list[float], list[int]]:
    """pp then tg, as llama-bench: one eval of the prompt, then one eval per token, greedy on the last logits."""
    n_vocab = llm.n_vocab()

    def greedy() -> int:
        return int(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,)).argmax())

    llm.reset()  # n_tokens = 0: the next eval clears the KV cache from position 0
    stamps, tokens = [], []
    t0 = time.perf_counter()
    llm.eval(ids)
    for i in range(new_tokens):
        tok = greedy()
        stamps.append(time.perf_counter())
        tokens.append(tok)
        if i + 1 < new_tokens:
            llm.eval([tok])
    return t0, stamps, tokens


# -- HF transformers ----------------------------------------------------------------------------------------------------
def load_hf(gguf: Path, threads: int):
    import torch
    from transformers import Gemma3ForCausalLM

    torch.set_num_threads(threads)
    return Gemma3ForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                             trust_remote_code=False).eval()


# -- the comparison -----------------------------------------------------------------------------------------------------
def prefix_agreement(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundles", nargs="+", type=Path, help="medc bundle directories of Gemma 3 270M")
    ap.add_argument("--gguf", type=Path, default=DEFAULT_GGUF)
    ap.add_argument("--rounds", type=int, default=3, help="clean rounds wanted (see --quiet)")
    ap.add_argument("--max-rounds", type=int, default=None, help="give up after this many rounds (default 2x+2)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--past", default="128,2048", help="medc decode speed at these KV-cache lengths ('' = skip)")
    ap.add_argument("--past-new-tokens", type=int, default=32)
    ap.add_argument("--pause", type=float, default=1.0, help="seconds between backends (background CPU is sampled)")
    ap.add_argument("--quiet", type=float, default=0.5, help="a round is clean when other processes used fewer CPU "
                    "cores than this during each of its runs; before each round, wait for that ...")
    ap.add_argument("--max-wait", type=float, default=180, help="... but at most this many seconds")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "gemma3-270m-cpu")
    args = ap.parse_args()
    pasts = [int(p) for p in args.past.split(",") if p.strip()]

    import medc.runtime
    from medc.benchmarks.generation import (
        GenResult,
        fixed_prompt,
        hf_generate_timed,
        medc_generate_timed,
        medc_info,
    )
    from medc.runtime.gemma import encode_prompt

    from medc.system import cpu_info, git_commit, toolchain_versions

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    # -- load everything once ------------------------------------------------------------------------------------------
    loads = {}
    pipes = {}
    for b in args.bundles:
        before = rss_mib()
        pipe = medc.runtime.load(b, threads=args.threads)
        text = fixed_prompt(pipe.assets, args.prompt_tokens)
        medc_generate_timed(pipe, text, 2)  # opens the sessions (timed separately, below)
        loads[f"medc {b.name}"] = rss_mib() - before
        pipes[b.name] = pipe
    first = next(iter(pipes.values()))
    prompt = fixed_prompt(first.assets, args.prompt_tokens)
    ids = encode_prompt(first.assets, prompt)
    for name, pipe in pipes.items():
        if encode_prompt(pipe.assets, prompt) != ids:
            raise SystemExit(f"{name} tokenises the prompt differently from {next(iter(pipes))}: not the same model?")
        if pipe.bundle.manifest.model["source"].get("sha256") != first.bundle.manifest.model["source"].get("sha256"):
            log(f"warning: {name} was built from another checkpoint than {next(iter(pipes))}")
    past_prompts = {p: fixed_prompt(first.assets, p) for p in pasts}
    assert len(ids) == args.prompt_tokens, len(ids)

    before = rss_mib()
    llm = load_llama(args.gguf, args.threads, n_ctx=max(1024, args.prompt_tokens + args.new_tokens))
    loads["llama.cpp"] = rss_mib() - before
    before = rss_mib()
    hf = load_hf(args.gguf, args.threads)
    loads["hf"] = rss_mib() - before

    import llama_cpp
    import onnxruntime as ort
    import torch

    common = {"model": "gemma3-270m", "ort_version": ort.__version__, "cpu": cpu_info(), "commit": git_commit(),
              "vision_ms": None}
    infos = {name: dict(medc_info(pipe, args.threads), model="gemma3-270m", vision_ms=None)
             for name, pipe in pipes.items()}
    infos["llama.cpp"] = dict(common, bundle=args.gguf.name, backend="llama.cpp", precision="q4_k_m",
                              method="gguf Q4_K_M", threads=args.threads, providers="llama.cpp cpu")
    infos["hf"] = dict(common, bundle=args.gguf.name, backend="torch-eager", precision="fp32", method="none",
                       threads=torch.get_num_threads(), providers=f"torch-cpu attn={hf.config._attn_implementation}")
    runners = {name: (lambda n, pipe=pipe, text=prompt: medc_generate_timed(pipe, text, n))
               for name, pipe in pipes.items()}
    runners["llama.cpp"] = lambda n: llama_generate_timed(llm, ids, n)
    runners["hf"] = lambda n: hf_generate_timed(hf, ids, n)
    labels = {name: f"medc {name}" for name in pipes} | {"llama.cpp": "llama.cpp", "hf": "HF fp32"}

    log("warm-up")
    for name, run in runners.items():
        run(4)
    for name, pipe in pipes.items():
        for text in past_prompts.values():
            medc_generate_timed(pipe, text, 2)

    # -- interleaved rounds --------------------------------------------------------------------------------------------
    rows: list[GenResult] = []
    load: list[tuple[float, float]] = []  # per row: other processes' cores just before it and during it
    waited: list[float] = []
    clean: list[int] = []
    max_rounds = args.max_rounds or 2 * args.rounds + 2
    r = 0

    def timed(kind: str, name: str, prompt_tokens: int, fn) -> GenResult:
        before = background_cores(args.pause)
        during = OtherLoad()
        out = fn()
        load.append((before, during.cores()))
        row = GenResult.from_timed(out, batch=1, prompt_tokens=prompt_tokens, kind=kind, run=r, **infos[name])
        rows.append(row)
        what = (f"prefill {row.prefill_tok_s:8.1f} tok/s" if kind == "run" else f"past {prompt_tokens:5d}:") + (
            f"  decode {row.decode_tok_s:7.2f} tok/s (median ITL {row.tpot_p50_ms:.2f} ms)")
        log(f"round {r + 1} {labels[name]:<16} {what}  other load {load[-1][0]:.2f} / {load[-1][1]:.2f} cores")
        return row

    while len(clean) < args.rounds and r < max_rounds:
        t = time.perf_counter()
        while (bg := background_cores(args.pause)) >= args.quiet and time.perf_counter() - t < args.max_wait:
            pass
        waited.append(time.perf_counter() - t)
        log(f"round {r + 1}: other processes use {bg:.2f} cores (waited {waited[-1]:.0f} s)")
        first = len(rows)
        for name, run in runners.items():
            timed("run", name, args.prompt_tokens, lambda run=run: run(args.new_tokens))
        for name, pipe in pipes.items():
            for p, text in past_prompts.items():
                timed("past", name, p, lambda pipe=pipe, text=text: medc_generate_timed(pipe, text,
                                                                                        args.past_new_tokens))
        worst = max(during for _, during in load[first:])
        if worst < args.quiet:
            clean.append(r)
        log(f"round {r + 1}: {'clean' if r in clean else 'NOT clean'} (other load up to {worst:.2f} cores); "
            f"{len(clean)}/{args.rounds} clean rounds")
        r += 1
    rounds = list(range(r))
    used = clean or rounds  # the headline's rounds
    if not clean:
        log("warning: no clean round; the summaries use all rounds")

    # -- summaries -----------------------------------------------------------------------------------------------------
    def main_row(name: str, r: int) -> GenResult:
        backend = infos[name]
        return next(x for x in rows if x.kind == "run" and x.run == r and x.bundle == backend["bundle"]
                    and x.backend == backend["backend"])

    med = statistics.median
    per_backend = []
    for name in runners:
        rs = [main_row(name, i) for i in used]
        per_backend.append({"backend": labels[name], "precision": infos[name]["precision"],
                            "method": infos[name]["method"],
                            "prefill_tok_s": med(x.prefill_tok_s for x in rs),
                            "decode_tok_s": med(x.decode_tok_s for x in rs),
                            "ttft_ms": med(x.ttft_ms for x in rs), "tpot_p50_ms": med(x.tpot_p50_ms for x in rs),
                            "tpot_p99_ms": med(x.tpot_p99_ms for x in rs), "load_rss_mib": round(loads.get(
                                "medc " + name if name in pipes else name, 0.0), 1),
                            "greedy_tokens_agreeing_with_hf": prefix_agreement(rs[0].tokens,
                                                                               main_row("hf", used[0]).tokens)})
    ratios = []
    for name in pipes:
        for i in rounds:
            m, lc, h = main_row(name, i), main_row("llama.cpp", i), main_row("hf", i)
            ratios.append({"bundle": name, "round": i, "clean": i in clean,
                           "prefill_vs_llama": m.prefill_tok_s / lc.prefill_tok_s,
                           "decode_vs_llama": m.decode_tok_s / lc.decode_tok_s,
                           "prefill_vs_hf": m.prefill_tok_s / h.prefill_tok_s,
                           "decode_vs_hf": m.decode_tok_s / h.decode_tok_s})
    keys = ("prefill_vs_llama", "decode_vs_llama", "prefill_vs_hf", "decode_vs_hf")
    headline = [{"bundle": name, "rounds": len(used),
                 **{k: med(x[k] for x in ratios if x["bundle"] == name and x["round"] in used) for k in keys}}
                for name in pipes]
    past = []
    if len(pasts) >= 2:
        lo, hi = min(pasts), max(pasts)
        for name, info in infos.items():
            if name not in pipes:
                continue
            for i in rounds:
                at = {x.prompt_tokens: x for x in rows
                      if x.kind == "past" and x.run == i and x.bundle == info["bundle"]}
                past.append({"bundle": name, "round": i, "clean": i in clean, "short": lo, "long": hi,
                             "decode_tok_s_short": at[lo].decode_tok_s, "decode_tok_s_long": at[hi].decode_tok_s,
                             "ratio": at[hi].decode_tok_s / at[lo].decode_tok_s,
                             "ratio_median_itl": at[lo].tpot_p50_ms / at[hi].tpot_p50_ms})
    past_summary = []
    for name in pipes if past else []:
        mine = [x for x in past if x["bundle"] == name and x["round"] in used]
        past_summary.append({"bundle": name, "ratio": med(x["ratio"] for x in mine),
                             "ratio_median_itl": med(x["ratio_median_itl"] for x in mine),
                             "passes_0_80": med(x["ratio"] for x in mine) >= 0.8})

    versions = toolchain_versions() | {"llama_cpp_python": llama_cpp.__version__, "torch": torch.__version__,
                                       "platform": platform.platform()}
    config = {"prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "threads": args.threads,
              "rounds_run": len(rounds), "clean_rounds": clean, "clean_rounds_wanted": args.rounds,
              "quiet_below_cores": args.quiet, "max_wait_s": args.max_wait, "pasts": pasts,
              "past_new_tokens": args.past_new_tokens, "gguf": str(args.gguf),
              "bundles": {name: {"path": str(p.bundle.path), "decoder": infos[name]["precision"],
                                 "method": infos[name]["method"],
                                 "components": {c: v.precision for c, v in p.bundle.manifest.components.items()},
                                 "flavour": p.bundle.manifest.build.get("flavour"),
                                 "gate_passed": p.bundle.manifest.build.get("generation_gate", {}).get("passed"),
                                 "perplexity_increase": p.bundle.manifest.build.get("generation_gate", {}).get(
                                     "perplexity_increase")}
                          for name, p in pipes.items()},
              "llama_cpp": {"n_threads": args.threads, "n_threads_batch": args.threads, "n_ctx": llm.n_ctx(),
                            "n_batch": 512, "n_ubatch": 512},
              "hf": {"class": type(hf).__name__, "dtype": "float32", "attn_implementation":
                     hf.config._attn_implementation, "torch_threads": torch.get_num_threads()},
              "ort_intra_op_threads": args.threads, "cpu": cpu_info(), "os_cpu_count": os.cpu_count(),
              "versions": versions, "prompt_ids_head": ids[:8]}
    result = {"config": config, "per_backend": per_backend, "headline_median_ratios": headline,
              "ratios_per_round": ratios, "past": past, "past_summary": past_summary,
              "waited_s_per_round": waited,
              "rows": [asdict(x) | {"other_load_before": before, "other_load_during": during, "clean": x.run in clean}
                       for x, (before, during) in zip(rows, load)]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    md = markdown(result)
    args.out.with_suffix(".md").write_text(md)
    print(md)


def markdown(res: dict) -> str:
    c = res["config"]
    v = c["versions"]
    during = [r["other_load_during"] for r in res["rows"]]
    n_used = res["headline_median_ratios"][0]["rounds"]
    used = "clean" if c["clean_rounds"] else "(no clean round: all)"

    def f(x: float) -> str:
        return f"{x:.2f}"

    md = [f"# Gemma 3 270M on {c['cpu']}: medc vs llama.cpp vs HF transformers", "",
          (f"Text only, {c['threads']} threads everywhere, {c['prompt_tokens']}-token prompt (same ids for all) then "
           f"{c['new_tokens']} greedy tokens (no EOS stop); {c['rounds_run']} interleaved rounds, {len(c['clean_rounds'])} "
           f"of them clean (other processes below {c['quiet_below_cores']} CPU cores during every run). onnxruntime "
           f"{v.get('onnxruntime')}, llama-cpp-python {v['llama_cpp_python']}, torch {v['torch']}, transformers "
           f"{v.get('transformers')}, HF attention {c['hf']['attn_implementation']}; commit {v.get('git_commit')}."),
          "", (f"Other processes used a median {statistics.median(during):.2f} CPU cores (max {max(during):.2f}) "
               "during the runs. This 2-core machine is shared, and 2 threads on 2 busy cores slow down by far more "
               "than 2x (spin-waiting thread pools), unevenly across backends: only the clean rounds count, and "
               "the ratios (taken side by side, per round) mean more than the absolute speeds."),
          "", f"## Headline: medc / other, median of the per-round ratios of {n_used} {used} rounds (> 1: medc faster)", "",
          ("| medc bundle | decoder | whole-model gate vs HF fp32 | prefill vs llama.cpp | decode vs llama.cpp | "
           "prefill vs HF fp32 | decode vs HF fp32 |"),
          "|---|---|---|---|---|---|---|"]
    for h in res["headline_median_ratios"]:
        b = c["bundles"][h["bundle"]]
        gate = {True: "pass", False: "DEGRADED", None: "-"}[b["gate_passed"]]
        ppl = "" if b["perplexity_increase"] is None else f", perplexity {b['perplexity_increase']:+.2%}"
        md.append(f"| {h['bundle']} | {b['decoder']} ({b['method']}) | {gate}{ppl} | {f(h['prefill_vs_llama'])}x | "
                  f"{f(h['decode_vs_llama'])}x | {f(h['prefill_vs_hf'])}x | {f(h['decode_vs_hf'])}x |")
    md += ["", f"## Per backend (medians over the {used} rounds)", "",
           ("| backend | weights | prefill tok/s | decode tok/s | TTFT ms | TPOT p50 ms | TPOT p99 ms | "
            "greedy tokens = HF fp32 | RSS at load MiB |"), "|---|---|---|---|---|---|---|---|---|"]
    for b in res["per_backend"]:
        md.append(f"| {b['backend']} | {b['precision']} ({b['method']}) | {b['prefill_tok_s']:.1f} | "
                  f"{f(b['decode_tok_s'])} | {b['ttft_ms']:.1f} | {f(b['tpot_p50_ms'])} | {f(b['tpot_p99_ms'])} | "
                  f"{b['greedy_tokens_agreeing_with_hf']}/{c['new_tokens']} | {b['load_rss_mib']:.0f} |")
    md += ["", "## Per round", "", ("| round | clean | backend | prefill tok/s | decode tok/s | TPOT p50 ms | "
                                    "other load before / during, cores |"), "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        if r["kind"] == "run":
            name = f"medc {r['bundle']}" if r["backend"] == "onnxruntime" else r["backend"]
            md.append(f"| {r['run'] + 1} | {'yes' if r['clean'] else 'no'} | {name} | {r['prefill_tok_s']:.1f} | "
                      f"{f(r['decode_tok_s'])} | {f(r['tpot_p50_ms'])} | {f(r['other_load_before'])} / "
                      f"{f(r['other_load_during'])} |")
    md += ["", "## Per-round ratios (medc / other)", "",
           "| round | clean | medc bundle | prefill vs llama.cpp | decode vs llama.cpp | prefill vs HF | decode vs HF |",
           "|---|---|---|---|---|---|---|"]
    for x in res["ratios_per_round"]:
        md.append(f"| {x['round'] + 1} | {'yes' if x['clean'] else 'no'} | {x['bundle']} | {f(x['prefill_vs_llama'])} | {f(x['decode_vs_llama'])} | "
                  f"{f(x['prefill_vs_hf'])} | {f(x['decode_vs_hf'])} |")
    if res["past"]:
        lo, hi = res["past"][0]["short"], res["past"][0]["long"]
        md += ["", (f"## medc decode speed at past {hi} vs past {lo} ({c['past_new_tokens']} tokens each; target: "
                f"past {hi} >= 80% of past {lo})"), "",
               f"| medc bundle | round | clean | decode tok/s at {lo} | at {hi} | ratio | ratio of median ITL |",
               "|---|---|---|---|---|---|---|"]
        for x in res["past"]:
            md.append(f"| {x['bundle']} | {x['round'] + 1} | {'yes' if x['clean'] else 'no'} | {f(x['decode_tok_s_short'])} | "
                      f"{f(x['decode_tok_s_long'])} | {f(x['ratio'])} | {f(x['ratio_median_itl'])} |")
        md += ["", f"Over the {used} rounds:", "",
               "| medc bundle | median ratio | median ratio of median ITL | ratio >= 0.80 |", "|---|---|---|---|"]
        for x in res["past_summary"]:
            md.append(f"| {x['bundle']} | {f(x['ratio'])} | {f(x['ratio_median_itl'])} | "
                      f"{'yes' if x['passes_0_80'] else 'NO'} |")
    md += ["", ("Prefill tok/s = prompt tokens / (prompt in -> first token: for medc this includes tokenising and the "
            "embedding lookup); decode tok/s = (new tokens - 1) / (first -> last token), each step including the greedy "
            "argmax. llama.cpp runs the Q4_K_M weights as stored; HF and the medc fp32 bundle run them dequantised to "
            "fp32. RSS at load: resident memory added by loading that backend (same process). Other load: CPU cores used by other "
            "processes in the second before the run and during it.")]
    return "\n".join(md) + "\n"


if __name__ == "__main__":
    main()
