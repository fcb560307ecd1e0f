"""`medc bench` on a generative bundle (tiny MedGemma): it runs, and its JSON rows are complete and self-consistent.

Speed is never asserted (this machine's speed drifts); only counts, signs and identities between the fields.
"""

from __future__ import annotations

import json
import math

import medc.runtime
import pytest
from click.testing import CliRunner
from medc.benchmarks.generation import fixed_prompt, from_json
from medc.runtime.gemma import encode_prompt

from medc.cli import main


@pytest.fixture(scope="module")
def tiny_gemma(tmp_path_factory):
    from medc.compile.build import BuildOptions, build

    out = tmp_path_factory.mktemp("bench-gen") / "medgemma-tiny-fp32"
    build(BuildOptions(model="medgemma-tiny", out=out))
    return out


def _bench(bundle, out, *args):
    res = CliRunner().invoke(main, ["bench", str(bundle), "--threads", "2", "--json", str(out), *map(str, args)])
    assert res.exit_code == 0, res.output
    return res.output, json.loads(out.read_text())


def test_fixed_prompt_is_exactly_n_tokens(tiny_gemma):
    with medc.runtime.load(tiny_gemma) as m:
        for n in (20, 64, 257, 500):
            assert len(encode_prompt(m.assets, fixed_prompt(m.assets, n))) == n


def test_bench_generative_bundle(tiny_gemma, tmp_path):
    out, rows = _bench(tiny_gemma, tmp_path / "gen.json", "--prompt-tokens", 64, "--new-tokens", 8, "--past", "16,256",
                       "--past-new-tokens", 4, "--repeat", 2, "--warmup", 1)
    assert "| ttft_ms |" in out and "decode tok/s (from the median inter-token time) at past 256 / at past 16" in out
    assert len(rows) == 2 * 3 and len(from_json(json.dumps(rows))) == 6
    runs = [r for r in rows if r["kind"] == "run"]
    past = [r for r in rows if r["kind"] == "past"]
    assert [r["run"] for r in runs] == [0, 1] and sorted(r["prompt_tokens"] for r in past) == [16, 16, 256, 256]
    for r in rows:
        n = 8 if r["kind"] == "run" else 4
        assert r["backend"] == "onnxruntime" and r["model"] == "medgemma-tiny" and r["precision"] == "fp32"
        assert r["batch"] == 1 and r["threads"] == 2 and r["new_tokens"] == n
        assert len(r["tokens"]) == n and len(r["itl_ms"]) == n - 1 and all(v > 0 for v in r["itl_ms"])
        assert r["ttft_ms"] > 0 and r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0 and r["peak_rss_mib"] > 0
        assert 0 < r["tpot_p50_ms"] <= r["tpot_p90_ms"] <= r["tpot_p99_ms"]
        assert r["total_ms"] >= r["ttft_ms"] + sum(r["itl_ms"]) - 0.01  # itl_ms are rounded to 1 us
        # the rates are the counts over the times
        assert math.isclose(r["prefill_tok_s"] * r["ttft_ms"] / 1e3, r["prompt_tokens"], rel_tol=1e-9)
        assert math.isclose(r["decode_tok_s"], 1e3 / r["tpot_mean_ms"], rel_tol=1e-9)
    assert all(r["vision_ms"] > 0 for r in runs) and all(r["vision_ms"] is None for r in past)
    # it timed real greedy generation of the fixed prompt: the same tokens as the pipeline's own generate
    with medc.runtime.load(tiny_gemma) as m:
        ids = m.generate_ids([fixed_prompt(m.assets, 64)], max_new_tokens=8, ignore_eos=True)[0]
    assert runs[0]["tokens"] == runs[1]["tokens"] == ids


def test_bench_generative_fits_the_context_and_baseline(tiny_gemma, tmp_path):
    """Defaults longer than the tiny model's 512-token context are shortened, with a note; the torch baseline runs
    the same prompt and, at fp32, greedy-decodes the same tokens."""
    out, rows = _bench(tiny_gemma, tmp_path / "gen.json", "--new-tokens", 4, "--past", "2048", "--repeat", 1,
                       "--warmup", 0, "--baseline", "torch")
    assert "prompt shortened to 508 tokens" in out and "past length(s) 2048 skipped" in out
    assert [(r["backend"], r["kind"], r["prompt_tokens"]) for r in rows] == [("onnxruntime", "run", 508),
                                                                           ("torch-eager", "run", 508)]
    assert rows[0]["tokens"] == rows[1]["tokens"] and rows[1]["ttft_ms"] > 0 and rows[1]["decode_tok_s"] > 0
