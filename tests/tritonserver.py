"""A real NVIDIA Triton Inference Server for the tests: the build PyTriton ships on PyPI (nvidia-pytriton's wheel
carries `tritonserver`, the Python backend and its stubs per Python version; no onnxruntime or TensorRT backend, so
only Python-backend models load in it).

`python tests/tritonserver.py install` (CI runs it) puts it under $MEDC_TRITONSERVER (default
~/.cache/medc/tritonserver) with an execution environment for the Python-backend models: a venv that sees this
interpreter's packages (medc included) but holds numpy 1.x first, because PyTriton 0.7.0's Python backend was built
against numpy 1.x (with numpy 2 its BYTES tensors arrive corrupted; Triton's own containers ship a matching numpy).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import zipfile
from pathlib import Path

WHEEL = "nvidia-pytriton==0.7.0"
ROOT = Path(os.environ.get("MEDC_TRITONSERVER", Path.home() / ".cache" / "medc" / "tritonserver"))
SERVER = ROOT / "pytriton" / "tritonserver"
ENV = ROOT / "env"  # EXECUTION_ENV_PATH of the exported Python-backend models
PY = f"{sys.version_info.major}.{sys.version_info.minor}"


def missing() -> str | None:
    """Why the server cannot run here; None when it can."""
    if not sys.platform.startswith("linux"):
        return "Triton's server binary is Linux-only"
    if not (SERVER / "bin" / "tritonserver").is_file() or not (ENV / "bin" / "activate").is_file():
        return f"no Triton server under {ROOT}: run `python tests/tritonserver.py install` (CI does)"
    if not (SERVER / "backends" / "python" / "triton_python_backend_stub").is_file():
        return f"PyTriton's Triton has no Python backend stub for Python {PY}"
    return None


def install() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", WHEEL, "-d", tmp], check=True)
        (wheel,) = Path(tmp).glob("*.whl")
        shutil.rmtree(ROOT, ignore_errors=True)
        with zipfile.ZipFile(wheel) as z:
            for name in z.namelist():
                if name.startswith(("pytriton/tritonserver/", "nvidia_pytriton.libs/")):
                    z.extract(name, ROOT)
    for exe in [SERVER / "bin" / "tritonserver", *SERVER.glob("python_backend_stubs/*/triton_python_backend_stub")]:
        exe.chmod(0o755)
    stub = SERVER / "python_backend_stubs" / PY / "triton_python_backend_stub"
    if stub.is_file():
        shutil.copy2(stub, SERVER / "backends" / "python" / "triton_python_backend_stub")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(ENV)], check=True)
    site = Path(subprocess.run([str(ENV / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                               check=True, capture_output=True, text=True).stdout.strip())
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), "numpy<2"],
                   check=True)
    # This interpreter's packages (medc, onnxruntime, ...) after the env's own numpy 1.x: addsitedir also runs their
    # .pth files, which an editable install of medc needs.
    dirs = [p for p in sys.path if p.endswith(("site-packages", "dist-packages")) and Path(p).is_dir()]
    (site / "medc-host.pth").write_text("".join(f"import site; site.addsitedir({d!r})\n" for d in dirs))
    print(f"Triton server in {ROOT}; {missing() or 'ready'}")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(repo: Path, models: list[str], log: Path, timeout: float = 120.0):
    """tritonserver on `repo` with `models` loaded; yields its HTTP address (host:port)."""
    http, grpc, metrics = _port(), _port(), _port()
    env = {**os.environ, "LD_LIBRARY_PATH": sysconfig.get_config_var("LIBDIR") or ""}  # the stub's libpython
    cmd = [str(SERVER / "bin" / "tritonserver"), f"--model-repository={repo}",
           f"--backend-directory={SERVER / 'backends'}", "--model-control-mode=explicit",
           *[f"--load-model={m}" for m in models], f"--http-port={http}", f"--grpc-port={grpc}",
           f"--metrics-port={metrics}", "--allow-metrics=false", "--exit-timeout-secs=5",
           "--http-address=127.0.0.1", "--grpc-address=127.0.0.1"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"127.0.0.1:{http}"
    try:
        import httpx

        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"tritonserver exited ({proc.returncode}); see {log}")
            try:
                if httpx.get(f"http://{url}/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"tritonserver not ready in {timeout:g} s; see {log}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


if __name__ == "__main__":
    if sys.argv[1:] != ["install"]:
        sys.exit("usage: python tests/tritonserver.py install")
    install()
