"""Facts about this machine and this medc that builds and benchmarks record: versions, commit, CPU, peak memory."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path


def peak_rss_mib(children: bool = False) -> float:
    """Peak resident memory so far, MiB: of this process, or of the largest finished child (isolated steps)."""
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF).ru_maxrss
    return round(r / 1024 if platform.system() != "Darwin" else r / 2**20, 1)


def give_back_large_frees(threshold: int = 1 << 20) -> bool:
    """glibc: allocations of `threshold` bytes and more get pages of their own, which free() returns to the OS.

    By default glibc raises this threshold each time such a block is freed (up to 32 MiB), after which large blocks
    come from its heaps and freed ones stay with the process: a server that decodes bursts of large images then keeps
    each burst's peak for good, climbing burst after burst (benchmarks/results/serve-hostile-input.md). Setting the
    threshold fixes it and turns that adjustment off (mallopt(3), M_MMAP_THRESHOLD). False where there is no glibc."""
    import ctypes
    import ctypes.util

    m_mmap_threshold = -3
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(m_mmap_threshold, threshold))
    except (OSError, AttributeError):
        return False


def fsync_dir(path) -> None:
    """Make a rename or a new name in `path` durable (a file's own fsync does not cover its directory entry)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def git_commit() -> str | None:
    """The commit of the medc source in use (None for an installed wheel)."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def toolchain_versions() -> dict:
    from importlib import metadata

    versions = {}
    for pkg in ("medc", "torch", "transformers", "onnx", "onnxscript", "onnxruntime", "onnxruntime-gpu", "numpy"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    versions["python"] = platform.python_version()
    versions["git_commit"] = git_commit()
    return versions


def version_tuple(text: str, parts: int = 2) -> tuple[int, ...]:
    """The first `parts` numbers of a version string: "1.32.0" -> (1, 32), ("10.13.3.9", 3) -> (10, 13, 3).
    Raises ValueError when one of them is not a number."""
    return tuple(int(p) for p in str(text).split(".")[:parts])


def cpu_info() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} x{os.cpu_count()}"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} x{os.cpu_count()}"
