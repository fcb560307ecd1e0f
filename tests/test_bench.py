"""`medc bench`: sweeps, baselines in the same run, the roofline, and the one result schema it writes.

Speed is never asserted (this machine's speed drifts 2x): the tests check structure, counts and the arithmetic that
ties the numbers together (rates are counts over times, floors are work over peaks).
"""

from __future__ import annotations

import csv
import io
import json
import math

import pytest
from click.testing import CliRunner

from medc.benchmarks import roofline, schema
from medc.benchmarks.sweep import Sweep, run
from medc.cli import main
from medc.compile.plan import resolve
from medc.compile.planner import encoder_flops, prefill_flops
from medc.errors import MedcError


@pytest.fixture(scope="module")
def tiny_gemma(tmp_path_factory):
    from medc.compile.build import BuildOptions, build

    out = tmp_path_factory.mktemp("bench-gen") / "medgemma-tiny-fp32"
    build(BuildOptions(model="medgemma-tiny", out=out))
    return out


def _bench(*args) -> tuple[schema.Result, str]:
    """`medc bench … --format json`: stdout is the JSON document alone (progress goes to stderr)."""
    res = CliRunner().invoke(main, ["bench", *map(str, args), "--format", "json"])
    assert res.exit_code == 0, res.output + str(res.stderr)
    doc = json.loads(res.stdout)
    assert schema.validate(doc) == []
    return schema.Result.from_dict(doc), res.stderr


def _metric(row, name):
    m = row.metric(name)
    assert m is not None, f"{row.bundle} {row.params}: no {name}"
    return m


def test_encoder_sweep_with_torch_baseline_and_floor(bundle_int8, bundle_fp32):
    result, progress = _bench(bundle_int8, bundle_fp32, "--batch", "1,2", "--threads", "1", "--repeat", 3,
                              "--warmup", 1, "--baseline", "torch")
    assert "round 3/3" in progress
    ours = [r for r in result.rows if r.backend == "onnxruntime"]
    torch_rows = [r for r in result.rows if r.backend == "torch-eager"]
    # 2 bundles x 2 components x 2 batches, and one torch baseline for the model both were built from
    assert len(ours) == 8 and len(torch_rows) == 4
    assert {r.bundle for r in ours} == {bundle_int8.name, bundle_fp32.name}
    assert {b.name for b in result.run.bundles} >= {bundle_int8.name, bundle_fp32.name}
    assert all(b.weights == "random" for b in result.run.bundles)
    peaks = roofline.Peaks.from_probe(result.run.probe)
    # bf16: OpenVINO's bf16 GEMM, where OpenVINO is installed and the CPU has AVX512_BF16 / AMX
    assert {m.name for m in result.run.probe} - {"bf16_gemm"} == {"fp32_gemm", "int8_gemm", "memory"}
    assert all(m.count == 4 for m in result.run.probe)  # one probe per round, and one after the last
    cfg = resolve("medsiglip-tiny").config
    for r in result.rows:
        lat, ips = _metric(r, "latency_ms"), _metric(r, "items_per_s")
        assert r.params["threads"] == 1 and lat.count == 3 and len(lat.samples) == 3
        assert lat.min <= lat.p50 <= lat.p90 <= lat.p99 <= lat.max
        for ms, rate in zip(lat.samples, ips.samples):  # the rate is the batch over the time, run by run
            assert math.isclose(rate, r.params["batch"] * 1e3 / ms, rel_tol=1e-3)
        assert _metric(r, "load_s").value > 0 and _metric(r, "peak_rss_mib").value > 0
    for r in ours:  # the floor: this component's FLOPs x batch over the probed peak of its precision
        precision = "int8" if r.bundle == bundle_int8.name and r.params["component"] == "image_encoder" else None
        f = r.floor
        assert f is not None and f.metric == "latency_ms" and f.bound == "compute"
        assert f.work == pytest.approx(r.params["batch"] * encoder_flops(cfg, "siglip", r.params["component"]))
        if precision == "int8":
            assert f.peak == pytest.approx(peaks.flops["int8"])
        assert f.ms == pytest.approx(f.work / f.peak * 1e3)
        assert f.fraction == pytest.approx(f.ms / _metric(r, "latency_ms").p50, rel=1e-3)
    assert all(r.floor is None for r in torch_rows)


def test_formats_md_jsonl_csv_and_also_json(bundle_int8, tmp_path):
    r = CliRunner()
    args = ["bench", str(bundle_int8), "--component", "text_encoder", "--repeat", "2", "--warmup", "0", "--no-probe"]
    md = r.invoke(main, [*args, "--json", str(tmp_path / "also.json")])
    assert md.exit_code == 0 and "## encoder" in md.stdout and "| text_encoder |" in md.stdout
    assert schema.load(tmp_path / "also.json").rows[0].params["component"] == "text_encoder"
    lines = r.invoke(main, [*args, "--format", "jsonl"]).stdout.splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["schema"] == schema.SCHEMA_ID
    table = list(csv.DictReader(io.StringIO(r.invoke(main, [*args, "--format", "csv"]).stdout)))
    assert {row["metric"] for row in table} >= {"latency_ms", "items_per_s", "load_s"}
    assert all(row["params"].startswith("component=text_encoder") for row in table)


def test_bad_sweeps_are_clear_errors(bundle_int8, tiny_gemma):
    r = CliRunner()
    for args, says in ((["--batch", "0"], "positive integers"), (["--batch", "a"], "comma-separated integers"),
                       (["--images", "2"], "--images takes 0 and/or 1"),
                       (["--component", "decoder"], "unknown component(s) decoder")):
        res = r.invoke(main, ["bench", str(bundle_int8), *args])
        assert res.exit_code == 2 and says in res.output and "Traceback" not in res.output
    res = r.invoke(main, ["bench", str(bundle_int8), str(tiny_gemma), "--no-probe", "--repeat", "1"])
    assert res.exit_code == 2 and "cannot share a sweep" in res.output


def test_generation_sweep_past_images_and_baselines(tiny_gemma):
    result, _ = _bench(tiny_gemma, "--prompt-tokens", "24,48", "--new-tokens", 6, "--images", "0,1", "--past", 96,
                       "--past-new-tokens", 4, "--repeat", 2, "--warmup", 1, "--threads", 2,
                       "--baseline", "torch", "--baseline", "llama.cpp")
    ours = [r for r in result.rows if r.backend == "onnxruntime"]
    base = [r for r in result.rows if r.backend == "torch-eager"]
    assert sorted((r.params["prompt_tokens"], r.params["images"], r.params["past"]) for r in ours) == [
        (24, 0, 0), (24, 1, 0), (48, 0, 0), (48, 1, 0), (96, 0, 96)]
    assert sorted((r.params["prompt_tokens"], r.params["past"]) for r in base) == [(24, 0), (48, 0), (96, 96)]
    notes = " ".join(result.run.notes)
    assert "no llama.cpp baseline" in notes and "torch-eager: times batch 1, text only" in notes
    cfg = resolve("medgemma-tiny").config
    work = roofline.Workload.of_bundle(tiny_gemma)
    for r in result.rows:
        n = r.params["new_tokens"]
        ttft, tpot = _metric(r, "ttft_ms"), _metric(r, "tpot_ms")
        assert ttft.count == 2 and tpot.count == 2 * (n - 1)  # every inter-token latency of every round
        for t, rate in zip(ttft.samples, _metric(r, "prefill_tok_s").samples):
            assert math.isclose(rate * t / 1e3, r.params["prompt_tokens"], rel_tol=1e-3)
        assert _metric(r, "e2e_ms").min >= ttft.min
        assert (r.metric("vision_ms") is not None) == bool(r.params["images"])
    for r in base:  # at fp32 the runtime and HF greedy-decode the same tokens
        assert _metric(r, "greedy_agreement").value == 1.0
    for r in ours:  # decode is memory bound: the planner's bytes per step over the probed bandwidth
        f = r.floor
        assert f.metric == "tpot_ms" and f.bound == "memory"
        assert f.work == pytest.approx(work.decode_bytes(r.params["prompt_tokens"] + r.params["new_tokens"], 1))
        assert f.peak == pytest.approx(roofline.Peaks.from_probe(result.run.probe).bytes_per_s)
        assert any("prefill floor" in n for n in r.notes)
    assert prefill_flops(cfg, 24) > 0


def test_context_too_short_shortens_the_prompt(tiny_gemma):
    result, _ = _bench(tiny_gemma, "--new-tokens", 4, "--past", 2048, "--repeat", 1, "--warmup", 0, "--no-probe")
    (row,) = result.rows
    assert row.params["prompt_tokens"] == 508 and row.floor is None
    assert any("prompt shortened from 512 to 508" in n for n in result.run.notes)
    assert any("prompt 2048 + 32 new tokens skipped" in n for n in result.run.notes)


def test_rounds_interleave_runners_case_by_case():
    """Each round runs every case on every runner before the next round (drift hits all of them alike)."""
    log = []

    class Recorder:
        kind, backend, threads, load_s, load_rss_mib = "encoder", "test", 1, 0.0, 0.0

        def __init__(self, name):
            self.bundle, self.notes = name, []

        def cases(self, sweep):
            return sweep.encoder_cases(["c"])

        def run(self, case):
            log.append((self.bundle, case["batch"]))
            return {"latency_ms": [1.0]}

    rows = run([Recorder("a"), Recorder("b")], Sweep(batch=(1, 4), repeat=2, warmup=0))
    assert log == [("a", 1), ("b", 1), ("a", 4), ("b", 4)] * 2
    assert [r.metric("latency_ms").count for r in rows] == [2, 2, 2, 2]
    with pytest.raises(MedcError, match="--new-tokens must be >= 2"):
        Sweep(new_tokens=(1,))

    class Failing(Recorder):  # a baseline that breaks on one case: a note, and the other rows stand
        def run(self, case):
            if case["batch"] == 4:
                raise RuntimeError("out of memory")
            return super().run(case)

    flaky = Failing("c")
    rows = run([Recorder("a"), flaky], Sweep(batch=(1, 4), repeat=2, warmup=1))
    assert [(r.bundle, r.params["batch"]) for r in rows] == [("a", 1), ("a", 4), ("c", 1)]
    assert flaky.notes == ["c (test) failed on {'component': 'c', 'batch': 4}: RuntimeError: out of memory"]


def test_roofline_arithmetic_by_hand():
    """MedSigLIP-448's image: 0.97 TFLOP (27 layers of 1024 tokens at width 1152, MLP 4304, + the patch embedding)."""
    cfg = resolve("medsiglip-448", random_weights=True).config
    v = cfg["vision_config"]
    n, h, f, layers = 1024, 1152, 4304, 27
    assert (v["image_size"] // v["patch_size"]) ** 2 == n and v["hidden_size"] == h
    by_hand = layers * (2 * n * (4 * h * h + 2 * h * f) + 4 * n * n * h) + 2 * n * 3 * 14 * 14 * h
    assert encoder_flops(cfg, "siglip", "image_encoder") == by_hand
    assert by_hand == pytest.approx(0.9737e12, rel=1e-3)
    probe = [schema.Metric.of("fp32_gemm", "GFLOP/s", [100, 200]), schema.Metric.of("int8_gemm", "GOP/s", [800]),
             schema.Metric.of("memory", "GB/s", [10])]
    peaks = roofline.Peaks.from_probe(probe)
    assert peaks.flops == {"fp32": 200e9, "int8": 800e9} and peaks.bytes_per_s == 10e9
    assert peaks.compute("int4", gpu=False) == ("int8", 800e9) and peaks.compute("fp16", gpu=False)[0] == "fp32"
    assert peaks.compute("bf16", gpu=False) == ("fp32", 200e9)  # no native bf16 probed: it runs as fp32
    with_bf16 = roofline.Peaks.from_probe(probe + [schema.Metric.of("bf16_gemm", "GFLOP/s", [700])])
    assert with_bf16.compute("bf16", gpu=False) == ("bf16", 700e9)
    row = schema.Row("encoder", "x", "onnxruntime", {"component": "image_encoder", "batch": 2},
                     [schema.Metric.of("latency_ms", "ms", [4868.0])])
    work = roofline.Workload("medsiglip-448", "siglip", cfg, {"image_encoder": "int8"}, "ort", {}, "cpu", False)
    f = roofline.floor_for(row, work, peaks)
    assert f.ms == pytest.approx(2 * by_hand / 800e9 * 1e3) and f.fraction == pytest.approx(f.ms / 4868.0)


def test_committed_results_follow_the_schema():
    """Every committed result is one schema document (older shapes were converted), each with its Markdown."""
    from pathlib import Path

    results = Path(__file__).parents[1] / "benchmarks" / "results"
    docs = sorted(results.glob("*.json"))
    assert len(docs) >= 30
    for path in docs:
        doc = json.loads(path.read_text())
        assert schema.validate(doc) == [], path.name
        assert path.with_suffix(".md").is_file(), path.name
    assert {p.stem for p in results.glob("*.md")} == {p.stem for p in docs}
