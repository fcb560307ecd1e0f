"""`medc compare`: regressions judged against the runs' own spread, on real recorded runs.

tests/fixtures/bench/ holds three real recordings of bundles/medsiglip-tiny's encoders (onnxruntime, 1 thread, 30 runs
at batch 1 and 4): base.json, rerun.json (the same build again, right after) and slowed.json (the same build while two
processes spun `while True: pass` on the 2-core host that recorded them).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from medc.benchmarks import schema
from medc.benchmarks.compare import IMPROVED, REGRESSED, SAME, UNKNOWN, compare, mann_whitney_greater
from medc.benchmarks.schema import Metric
from medc.cli import main

BENCH = Path(__file__).parent / "fixtures" / "bench"
BASE, RERUN, SLOWED = BENCH / "base.json", BENCH / "rerun.json", BENCH / "slowed.json"


def _write(result: schema.Result, path: Path) -> Path:
    path.write_text(schema.to_json(result))
    assert schema.validate(json.loads(path.read_text())) == []
    return path


@pytest.mark.parametrize("path", [BASE, RERUN, SLOWED])
def test_fixtures_validate(path):
    assert schema.validate(json.loads(path.read_text())) == []
    res = schema.load(path)
    assert {r.params["component"] for r in res.rows} == {"image_encoder", "text_encoder"}
    assert all(len(m.samples) == 30 for r in res.rows for m in r.metrics)


def test_slowed_machine_regresses_and_exits_1():
    cmp = compare(schema.load(BASE), schema.load(SLOWED))
    bad = cmp.regressed
    assert bad, cmp.to_markdown()
    assert not cmp.of(IMPROVED)  # a slowed machine makes nothing faster
    assert {m.metric for m in bad} <= {"latency_ms", "items_per_s"}
    for m in bad:  # regressed means worse in the metric's own direction
        assert (m.ratio > 1) == m.lower_is_better and m.p < 0.01 and abs(m.b - m.a) > m.spread

    res = CliRunner().invoke(main, ["compare", str(BASE), str(SLOWED)])
    assert res.exit_code == 1, res.output
    last = res.output.strip().splitlines()[-1]
    assert last.startswith(f"{len(bad)} of {len(cmp.lines)} metrics regressed beyond the runs' spread: ")
    assert "image_encoder batch=4" in last


def test_rerun_of_the_same_build_flags_nothing_and_exits_0():
    cmp = compare(schema.load(BASE), schema.load(RERUN))
    assert [m.verdict for m in cmp.lines] == [SAME] * 8, cmp.to_markdown()
    # this machine is shared: a median moved by far more than 5 % between the two runs, and the samples say noise
    assert max(m.ratio for m in cmp.lines if m.metric == "latency_ms") > 1.05

    res = CliRunner().invoke(main, ["compare", str(BASE), str(RERUN), "--format", "json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["regressed"] == 0 and len(doc["lines"]) == 8
    assert "0 of 8 metrics regressed beyond the runs' spread." in res.stderr


def test_a_file_against_itself_is_all_same():
    cmp = compare(schema.load(BASE), schema.load(BASE))
    assert cmp.lines and all(m.verdict == SAME and m.ratio == 1.0 for m in cmp.lines)
    assert not cmp.missing_in_b and not cmp.new_in_b and not cmp.notes


def test_metric_filter(tmp_path):
    cmp = compare(schema.load(BASE), schema.load(SLOWED), metrics=["latency_ms"])
    assert {m.metric for m in cmp.lines} == {"latency_ms"} and len(cmp.lines) == 4
    res = CliRunner().invoke(main, ["compare", str(BASE), str(BASE), "--metric", "latency_ms", "--metric", "nope"])
    assert res.exit_code == 2 and "no metric named nope" in res.output and "Traceback" not in res.output


def test_unmatched_rows_are_listed(tmp_path):
    base = schema.load(BASE)
    b = schema.load(BASE)
    gone = b.rows.pop(0)  # image_encoder batch 1: only in A
    b.rows.append(schema.Row(gone.kind, gone.bundle, gone.backend, {**gone.params, "batch": 8}, gone.metrics))
    cmp = compare(base, b)
    assert cmp.missing_in_b == [{"kind": "encoder", "bundle": "medsiglip-tiny", "backend": "onnxruntime",
                                 "params": {"component": "image_encoder", "batch": 1, "threads": 1}}]
    assert cmp.new_in_b == [{**cmp.missing_in_b[0], "params": {**gone.params, "batch": 8}}]
    assert len(cmp.lines) == 3 * 2  # the three rows in both, two metrics each
    md = cmp.to_markdown()
    assert "Only in A (missing in B)" in md and "Only in B (new in B)" in md and "batch=8" in md

    res = CliRunner().invoke(main, ["compare", str(BASE), str(_write(b, tmp_path / "b.json"))])
    assert res.exit_code == 0 and "component=image_encoder batch=8 threads=1" in res.output


def test_legacy_rows_without_samples_are_unknown_never_a_failure(tmp_path):
    """Results converted from older files keep statistics only (or a handful of samples): no verdict from those."""
    legacy = schema.load(BASE)
    for r in legacy.rows:
        m = r.metric("latency_ms")
        if r.params["component"] == "image_encoder":
            r.metrics = [Metric.summary(m.name, m.unit, count=m.count, avg=m.avg, p50=m.p50, p99=m.p99)]
        else:  # three samples: too few for the test
            r.metrics = [Metric.of(m.name, m.unit, m.samples[:3])]
    cmp = compare(legacy, schema.load(SLOWED))
    assert cmp.lines and {m.verdict for m in cmp.lines} == {UNKNOWN}
    assert {m.why for m in cmp.lines} == {"no samples", "3 vs 30 samples, need 5"}
    assert all(m.ratio is not None for m in cmp.lines)  # the ratio of the medians is still shown
    res = CliRunner().invoke(main, ["compare", str(_write(legacy, tmp_path / "legacy.json")), str(SLOWED)])
    assert res.exit_code == 0, res.output
    assert "unknown (no samples)" in res.output and "0 of 4 metrics regressed" in res.output


def test_bad_files_give_a_clear_error_not_a_traceback(tmp_path):
    not_json = tmp_path / "not.json"
    not_json.write_text("{")
    not_result = tmp_path / "other.json"
    not_result.write_text('{"rows": []}')
    broken = json.loads(BASE.read_text())
    broken["rows"][0]["metrics"][0]["count"] = "thirty"
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    for bad, says in ((not_json, "is not JSON"), (not_result, "is not a medc benchmark result"),
                      (tmp_path / "broken.json", "does not match the result schema"),
                      (tmp_path / "missing.json", "no such result file")):
        # as a user runs it: a real process, its real exit code and stderr
        res = subprocess.run([sys.executable, "-m", "medc.cli", "compare", str(BASE), str(bad)], capture_output=True,
                             text=True, timeout=120, check=False)
        assert res.returncode == 2, (bad, res.stdout, res.stderr)  # 2: bad input; 1 is kept for "regressed"
        assert says in res.stderr and "Traceback" not in res.stderr and res.stdout == ""


def test_mann_whitney_by_hand():
    # x = [1, 2, 3], y = [2, 4, 5, 6]. U counts the pairs (x_i, y_j) with y_j > x_i, a tie one half:
    #   y=2: beats x=1, ties x=2 -> 1.5;  y=4, 5, 6: beat all three -> 3 + 3 + 3.   U = 10.5
    # mean nx*ny/2 = 6. Ties: the value 2 twice, t^3 - t = 6; n = 7:
    #   var = nx*ny/12 * ((n+1) - 6/(n(n-1))) = 1 * (8 - 6/42) = 55/7 = 7.857
    #   z = (10.5 - 6 - 0.5) / sqrt(55/7) = 1.42701;  p = 1 - Phi(z) = 0.07679
    u, p = mann_whitney_greater([1, 2, 3], [2, 4, 5, 6])
    assert u == 10.5
    assert p == pytest.approx(0.5 * math.erfc(4 / math.sqrt(55 / 7) / math.sqrt(2)), rel=1e-12)
    assert p == pytest.approx(0.07679, abs=1e-5)
    # The other direction: U' = nx*ny - U = 1.5, z = (1.5 - 6 - 0.5) / 2.80306 = -1.7838, p = 0.9628
    u, p = mann_whitney_greater([2, 4, 5, 6], [1, 2, 3])
    assert u == 1.5 and p == pytest.approx(0.96277, abs=1e-5)
    # Five against five, fully separated: U = 25, var = 25/12 * 11, z = 12 / 4.7871 = 2.5067, p = 0.0061 --
    # the smallest sample count that can reach p < 0.01, hence MIN_SAMPLES = 5.
    u, p = mann_whitney_greater([1, 2, 3, 4, 5], [6, 7, 8, 9, 10])
    assert u == 25 and p == pytest.approx(0.00609, abs=1e-5) and p < 0.01
    # all equal: nothing to tell apart
    assert mann_whitney_greater([3, 3, 3], [3, 3]) == (3.0, 1.0)


def test_mann_whitney_matches_scipy_where_installed():
    stats = pytest.importorskip("scipy.stats")  # not a medc dependency; a cross-check where a dev has it
    import numpy as np

    rng = np.random.default_rng(0)
    for _ in range(50):
        x = np.round(rng.normal(size=rng.integers(3, 40)), 1)  # rounded: plenty of ties
        y = np.round(rng.normal(0.4, size=rng.integers(3, 40)), 1)
        u, p = mann_whitney_greater(x, y)
        ref = stats.mannwhitneyu(y, x, alternative="greater", method="asymptotic")
        assert u == pytest.approx(ref.statistic) and p == pytest.approx(ref.pvalue, rel=1e-9)


def test_verdict_follows_the_metric_direction():
    """Throughput that drops is a regression, latency that drops an improvement: the unit decides."""
    a, b = [10.0, 10.1, 9.9, 10.2, 9.8, 10.0], [5.0, 5.1, 4.9, 5.2, 4.8, 5.0]
    res = schema.load(BASE)
    row = res.rows[0]
    row.metrics = [Metric.of("latency_ms", "ms", a), Metric.of("items_per_s", "items/s", a)]
    other = schema.load(BASE)
    other.rows[0].metrics = [Metric.of("latency_ms", "ms", b), Metric.of("items_per_s", "items/s", b)]
    verdicts = {m.metric: m.verdict for m in compare(res, other).lines if m.params == row.params}
    assert verdicts == {"latency_ms": IMPROVED, "items_per_s": REGRESSED}
