"""The CLI through click's runner and as a real subprocess (the way a user runs it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from click.testing import CliRunner

from medc.cli import main


def _medc(*args, cwd=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "medc.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=600, cwd=cwd, env=env)


def test_help_is_light():
    res = _medc("--help")
    assert res.returncode == 0 and "build" in res.stdout and "bench" in res.stdout and "engines" in res.stdout
    # `medc --help` (and the shell's completion) must not pay for the heavy backends
    code = ("import sys; from click.testing import CliRunner; from medc.cli import main; "
            "r = CliRunner().invoke(main, ['--help']); assert r.exit_code == 0, r.output; "
            "print(' '.join(sorted(m for m in ('torch', 'onnxruntime', 'onnx', 'transformers', 'numpy') "
            "if m in sys.modules)))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "", f"medc --help imported {res.stdout.strip()}"


def test_dry_run_prints_plan():
    res = CliRunner().invoke(main, ["build", "medsiglip-tiny", "--precision", "int8", "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "image_encoder: int8" in res.output and "int8-static-qdq | int8-dynamic" in res.output


def test_errors_are_messages_not_tracebacks(tmp_path):
    res = CliRunner().invoke(main, ["build", "no-such-model", "-o", str(tmp_path / "x")])
    assert res.exit_code == 2 and "error: unknown model 'no-such-model'" in res.output
    assert "Traceback" not in res.output
    res = CliRunner().invoke(main, ["run", str(tmp_path), "--text", "x"])
    assert res.exit_code == 2 and "manifest.json is missing" in res.output


def test_inspect_run_verify_bench(bundle_int8, real_images, tmp_path):
    r = CliRunner()
    res = r.invoke(main, ["inspect", str(bundle_int8)])
    assert res.exit_code == 0 and "image_encoder" in res.output and "NOT FOR CLINICAL USE" in res.output
    res = r.invoke(main, ["inspect", str(bundle_int8), "--json"])
    assert json.loads(res.output)["target"] == "cpu"
    res = r.invoke(main, ["run", str(bundle_int8), "--image", str(real_images[0]), "--image", str(real_images[1]),
                          "--labels", "normal,pneumothorax"])
    assert res.exit_code == 0, res.output
    assert "retina.jpg:" in res.output and "pneumothorax" in res.output
    res = r.invoke(main, ["run", str(bundle_int8), "--text", "pleural effusion", "--json"])
    data = json.loads(res.output)["text_embeds"][0]
    assert data["shape"] == [64] and abs(data["norm"] - 1) < 1e-3 and len(data["vector"]) == 64
    res = r.invoke(main, ["verify", str(bundle_int8)])
    assert res.exit_code == 0 and "verified" in res.output
    res = r.invoke(main, ["bench", str(bundle_int8), "--repeat", "2", "--warmup", "0", "--no-probe"])
    assert res.exit_code == 0, res.output
    assert "| onnxruntime | image_encoder | 1 |" in res.output and "## encoder" in res.output


def test_subprocess_build_and_run(tmp_path, real_images):
    out = tmp_path / "bundle"
    res = _medc("build", "medsiglip-tiny", "-o", out, "--precision", "image_encoder=int8")
    assert res.returncode == 0, res.stderr
    assert "built" in res.stdout and "PASS" in res.stdout
    res = _medc("run", out, "--image", real_images[0], "--labels", "normal,diabetic retinopathy", "--target", "cpu")
    assert res.returncode == 0, res.stderr
    scores = [float(line.split()[0]) for line in res.stdout.splitlines()[1:]]
    assert len(scores) == 2 and all(0 < s < 1 for s in scores)
    res = _medc("build", "medsiglip-tiny", "-o", out)
    assert res.returncode == 2 and "not empty" in res.stderr and "Traceback" not in res.stderr


def test_engines_have_their_own_verb(bundle_int8):
    """`medc engines BUNDLE` builds TensorRT engines; `medc build` given a bundle says so instead of guessing."""
    r = CliRunner()
    res = r.invoke(main, ["build", str(bundle_int8)])
    assert res.exit_code == 2 and f"medc engines {bundle_int8}" in res.output and "Traceback" not in res.output
    res = r.invoke(main, ["engines", str(bundle_int8)])  # a CPU bundle: nothing to build engines from
    assert res.exit_code == 2 and "has no TensorRT stage" in res.output
