"""Closeness metrics and the torch-free re-run of a bundle's fidelity gate from its golden inputs.

`medc verify BUNDLE` runs here, on the device the bundle is deployed to: same inputs, same reference outputs (saved
at build time from the PyTorch fp32 model), same thresholds: medc's own table by precision (medc.specs.gate_tolerance),
never a threshold read from the manifest.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import importlib.util
import logging

import numpy as np

from medc.errors import MedcError
from medc.runtime.bundle import Bundle, open_bundle
from medc.runtime.session import open_component, stand_in_config
from medc.runtime.trt_session import TrtSession
from medc.specs import Tolerance, gate_tolerance
from medc.targets import get_target


@dataclass
class Closeness:
    cosine: float  # worst (lowest) per-sample cosine similarity
    max_abs: float  # largest absolute difference anywhere

    def to_json(self) -> dict:
        return asdict(self)


def closeness(reference: np.ndarray, output: np.ndarray) -> Closeness:
    ref = np.asarray(reference, dtype=np.float64).reshape(len(reference), -1)
    out = np.asarray(output, dtype=np.float64).reshape(len(output), -1)
    if ref.shape != out.shape:
        return Closeness(cosine=-1.0, max_abs=float("inf"))
    if not np.all(np.isfinite(out)):
        return Closeness(cosine=-1.0, max_abs=float("inf"))
    num = (ref * out).sum(axis=1)
    den = np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1)
    cos = np.where(den > 0, num / np.maximum(den, 1e-300), np.where(np.abs(ref - out).max(axis=1) == 0, 1.0, 0.0))
    return Closeness(cosine=float(cos.min()), max_abs=float(np.abs(ref - out).max()))


def golden_key(component: str, case: str, kind: str, name: str) -> str:
    return f"{component}/{case}/{kind}/{name}"


def golden_cases(golden: dict[str, np.ndarray], component: str) -> dict[str, dict[str, dict[str, np.ndarray]]]:
    """{case: {"in": {name: array}, "ref": {name: array}}} for one component."""
    cases: dict = {}
    for key, arr in golden.items():
        comp, case, kind, name = key.split("/", 3)
        if comp == component:
            cases.setdefault(case, {"in": {}, "ref": {}})[kind][name] = arr
    return cases


def evaluate(run, cases: dict, tolerance: Tolerance) -> dict:
    """Run every golden case through `run(feeds) -> outputs` and judge the worst case against `tolerance`."""
    results = {}
    for case, io in cases.items():
        outputs = run(io["in"])
        per_output = {name: closeness(ref, outputs[name]) for name, ref in io["ref"].items()}
        results[case] = {
            "batch": int(next(iter(io["in"].values())).shape[0]),
            "cosine": min(c.cosine for c in per_output.values()),
            "max_abs": max(c.max_abs for c in per_output.values()),
        }
    worst_cos = min(r["cosine"] for r in results.values())
    worst_abs = max(r["max_abs"] for r in results.values())
    return {
        "tolerance": tolerance.to_json(),
        "cases": results,
        "worst": {"cosine": worst_cos, "max_abs": worst_abs},
        "passed": bool(tolerance.check(worst_cos, worst_abs)),
    }


def verify_bundle(bundle: Bundle | Path, providers: list[str] | None = None) -> dict[str, dict]:
    """Re-run every component's gate from the bundle's golden file (a path, or a bundle `open_bundle` verified).
    Returns {component: evaluation}."""
    bundle = bundle if isinstance(bundle, Bundle) else open_bundle(bundle)
    golden = dict(np.load(bundle.file(bundle.manifest.golden), allow_pickle=False))
    report = {}
    providers = providers or bundle.providers
    config = stand_in_config(get_target(bundle.manifest.target).engine, providers)  # as the build gated it
    for name, comp in bundle.manifest.components.items():
        tol = gate_tolerance(name, comp.precision)
        cases = golden_cases(golden, name)
        if not cases:
            raise MedcError(f"the bundle's golden file holds no held-out inputs for {name}; rebuild the bundle.")
        with open_component(bundle, name, providers=providers, config=config) as sess:
            report[name] = evaluate(sess.run, cases, tol)
    report.update(verify_engines(bundle, golden))
    return report


def verify_engines(bundle, golden: dict[str, np.ndarray]) -> dict[str, dict]:
    """The bundle's TensorRT engines against the same golden outputs and thresholds, as "<component> (tensorrt)".
    Refuses engines built for another TensorRT version or GPU. Without TensorRT here they are skipped with a warning.
    UNVERIFIED on hardware: TrtSession has not run on a GPU with this medc version."""
    record = bundle.manifest.tensorrt or {}
    engines = record.get("engines") or {}
    if not engines:
        return {}
    if importlib.util.find_spec("tensorrt") is None:
        logging.getLogger(__name__).warning(
            "the bundle's TensorRT engines (%s) were not checked: TensorRT is not installed here. Run `medc verify` "
            "on the device they were built for.", ", ".join(engines))
        return {}
    report = {}
    for name in engines:
        comp = bundle.manifest.components[name]
        with TrtSession(bundle.file(engines[name]["file"]), record["profiles"].get(name), manifest=bundle.manifest,
                        component=name) as sess:
            report[f"{name} (tensorrt)"] = evaluate(sess.run, golden_cases(golden, name),
                                                    gate_tolerance(name, comp.precision))
    return report
