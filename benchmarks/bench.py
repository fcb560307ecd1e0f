"""`medc bench`: latency/throughput of a bundle's components, optionally against HF PyTorch eager fp32.

One `BenchResult` row per (component, backend, batch); its fields are the columns of the Markdown table and the JSON.
The baseline runs interleaved with the bundle (one ORT run, one torch run, ...) so this machine's speed drift hits
both equally and the speed-up ratio stays meaningful.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from medc.errors import MedcError
from medc.system import cpu_info, git_commit, peak_rss_mib


@dataclass
class BenchResult:
    model: str
    component: str
    backend: str  # "onnxruntime" | "torch-eager"
    precision: str
    method: str
    batch: int
    repeat: int
    mean_ms: float
    std_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    items_per_s: float
    peak_rss_mib: float
    speedup: float | None  # baseline mean / this mean, for the bundle's rows when a baseline ran
    threads: int
    providers: str
    ort_version: str
    cpu: str
    commit: str | None
    samples_ms: list[float] = field(default_factory=list, repr=False)

    @classmethod
    def from_samples(cls, samples_s: list[float], batch: int, **kw) -> "BenchResult":
        ms = np.asarray(samples_s) * 1e3
        return cls(batch=batch, repeat=len(ms), mean_ms=float(ms.mean()), std_ms=float(ms.std()),
                   p50_ms=float(np.percentile(ms, 50)), p90_ms=float(np.percentile(ms, 90)),
                   p99_ms=float(np.percentile(ms, 99)), items_per_s=float(batch * 1e3 / ms.mean()),
                   peak_rss_mib=peak_rss_mib(), speedup=None, samples_ms=[round(float(v), 3) for v in ms], **kw)


_COLUMNS = ("component", "backend", "precision", "method", "batch", "mean_ms", "std_ms", "p50_ms", "p90_ms",
            "p99_ms", "items_per_s", "speedup", "peak_rss_mib", "threads")


def to_markdown(results: list[BenchResult]) -> str:
    if not results:
        return "(no results)"
    head = results[0]
    lines = [f"model {head.model} | cpu {head.cpu} | onnxruntime {head.ort_version} | providers {head.providers} "
             f"| commit {head.commit or '-'}", "",
             "| " + " | ".join(_COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
    for r in results:
        cells = []
        for c in _COLUMNS:
            v = getattr(r, c)
            cells.append("-" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def to_json(results: list[BenchResult]) -> str:
    return json.dumps([asdict(r) for r in results], indent=2)


def from_json(text: str) -> list[BenchResult]:
    names = {f.name for f in fields(BenchResult)}
    return [BenchResult(**{k: v for k, v in row.items() if k in names}) for row in json.loads(text)]


def _feeds_for_batch(cases: dict, batch: int) -> dict[str, np.ndarray]:
    """Real golden inputs, tiled to `batch` rows (so benches use realistic data without torch)."""
    first = next(iter(cases.values()))["in"]
    return {k: np.ascontiguousarray(np.resize(v, (batch,) + v.shape[1:])) for k, v in first.items()}


def torch_baseline(manifest):
    """The HF PyTorch eager fp32 model the bundle was built from (needs medc[build])."""
    try:
        from medc.compile import loader
        from medc.compile.registry import MODELS
    except ImportError as e:
        raise MedcError(f"--baseline torch needs the build extra (pip install 'medc[build]'): {e}") from None
    src = manifest.model["source"]
    if src["kind"] == "checkpoint":  # a checkpoint folder or a GGUF file
        return loader.load(str(loader.locate_source(src)))
    name = manifest.model["name"]
    if name not in MODELS:
        raise MedcError(f"cannot rebuild the reference for {name}: not in this medc's registry.")
    return loader.load(name, random_weights=src["kind"] == "random")


def bench_bundle(bundle_dir: Path, batches: list[int], repeat: int = 10, warmup: int = 2, threads: int | None = None,
                 components: list[str] | None = None, baseline: str | None = None) -> list[BenchResult]:
    import onnxruntime as ort

    from medc.runtime.bundle import open_bundle
    from medc.runtime.session import OrtSession
    from medc.runtime.verify import golden_cases

    bundle = open_bundle(bundle_dir)
    m = bundle.manifest
    golden = dict(np.load(bundle.path / m.golden))
    names = components or list(m.components)
    unknown = [n for n in names if n not in m.components]
    if unknown:
        raise MedcError(f"unknown component(s) {', '.join(unknown)}; the bundle has {', '.join(m.components)}.")
    ref = torch_baseline(m) if baseline == "torch" else None
    if ref is not None:
        import torch

        if threads:
            torch.set_num_threads(threads)
    common = dict(model=m.model["name"], ort_version=ort.__version__, cpu=cpu_info(),
                  commit=git_commit())
    results: list[BenchResult] = []
    for name in names:
        comp = m.components[name]
        cases = golden_cases(golden, name)
        module = None
        if ref is not None:
            spec = {c.name: c for c in ref.family.components(ref.hf_model.config)}[name]
            module = spec.extract(ref.hf_model)
        with OrtSession(bundle.file(comp.file), bundle.providers, threads) as sess:
            used_threads = threads or os.cpu_count() or 1
            for b in batches:
                feeds = _feeds_for_batch(cases, b)
                ort_t, torch_t = [], []
                run_torch = _torch_runner(module, comp, feeds) if module is not None else None
                for _ in range(warmup):
                    sess.run(feeds)
                    if run_torch:
                        run_torch()
                for _ in range(repeat):  # interleaved: drift hits both sides alike
                    t = time.perf_counter()
                    sess.run(feeds)
                    ort_t.append(time.perf_counter() - t)
                    if run_torch:
                        t = time.perf_counter()
                        run_torch()
                        torch_t.append(time.perf_counter() - t)
                row = BenchResult.from_samples(ort_t, b, component=name, backend="onnxruntime",
                                               precision=comp.precision,
                                               method=comp.quantization.get("method", "none"), threads=used_threads,
                                               providers=",".join(sess.active_providers), **common)
                results.append(row)
                if run_torch:
                    import torch

                    base = BenchResult.from_samples(torch_t, b, component=name, backend="torch-eager",
                                                    precision="fp32", method="none", threads=torch.get_num_threads(),
                                                    providers="torch-cpu", **common)
                    row.speedup = base.mean_ms / row.mean_ms
                    results.append(base)
    return results


def _torch_runner(module, comp, feeds):
    import torch

    from medc.compile.export import module_args

    args = module_args(module, comp, feeds)

    def run():
        with torch.inference_mode():
            module(*args)

    return run
