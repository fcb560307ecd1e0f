"""A non-editable wheel carries every data file the code reads (target profiles, the tiny tokenizer)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_carries_data_files(tmp_path):
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    wheel = next(tmp_path.glob("medc-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    profiles = {f"medc/targets/profiles/{p.name}" for p in (ROOT / "targets" / "profiles").glob("*.json")}
    assert profiles and profiles <= names
    assert {"medc/compile/data/tiny-spiece.model", "medc/compile/data/tiny-gemma-tokenizer.json"} <= names
    for pkg in ("medc", "medc/compile", "medc/compile/models", "medc/runtime", "medc/targets", "medc/benchmarks"):
        assert f"{pkg}/__init__.py" in names
    assert not any(n.startswith("tests/") for n in names)
