"""The bundle manifest: what was built, from what, with which tools, and how close it is to the reference.

Plain data + JSON, no torch: the runtime reads it on the device. `files` maps every bundle file to its sha256 so a
tampered or partial bundle is refused before anything runs.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from medc.errors import MedcError
from medc.specs import TensorSpec

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"


@dataclass
class ComponentEntry:
    """One exported graph in the bundle."""

    file: str
    precision: str  # fp32 | fp16 | int8
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    quantization: dict = field(default_factory=dict)  # method, calibration digest, alternatives measured
    optimizations: dict = field(default_factory=dict)  # optimiser used and fused node counts
    fidelity: dict = field(default_factory=dict)  # tolerance, per-input results, worst case, passed

    def to_json(self) -> dict:
        d = asdict(self)
        d["inputs"] = [t.to_json() for t in self.inputs]
        d["outputs"] = [t.to_json() for t in self.outputs]
        return d

    @classmethod
    def from_json(cls, d: dict) -> "ComponentEntry":
        d = dict(d)
        d["inputs"] = [TensorSpec.from_json(t) for t in d["inputs"]]
        d["outputs"] = [TensorSpec.from_json(t) for t in d["outputs"]]
        return cls(**d)


@dataclass
class Manifest:
    model: dict  # name, family, hf_class, source {kind: checkpoint|random|tiny, path, ...}, clinical_use
    target: str
    components: dict[str, ComponentEntry]
    preprocessing: dict = field(default_factory=dict)
    tokenizer: dict = field(default_factory=dict)
    extras: dict = field(default_factory=dict)  # e.g. SigLIP logit_scale / logit_bias
    generation: dict = field(default_factory=dict)  # decoders: KV layout (sliding/global), sizes, context limit
    toolchain: dict = field(default_factory=dict)
    build: dict = field(default_factory=dict)  # time taken, peak memory, options
    golden: str | None = None  # npz with held-out inputs and reference outputs for `medc verify`
    # GPU targets with engine "tensorrt": optimisation profiles, trtexec lines and, once built on the device, the
    # engines with the TensorRT version and compute capability they are tied to (medc.compile.tensorrt).
    tensorrt: dict = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256
    created: str = ""
    format_version: int = FORMAT_VERSION

    def to_json(self) -> dict:
        d = asdict(self)
        d["components"] = {k: c.to_json() for k, c in self.components.items()}
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Manifest":
        d = dict(d)
        d["components"] = {k: ComponentEntry.from_json(c) for k, c in d["components"].items()}
        return cls(**d)

    def write(self, bundle_dir: Path) -> Path:
        path = Path(bundle_dir) / MANIFEST_NAME
        path.write_text(json.dumps(self.to_json(), indent=2, sort_keys=False) + "\n")
        return path

    @classmethod
    def read(cls, bundle_dir: Path) -> "Manifest":
        path = Path(bundle_dir) / MANIFEST_NAME
        if not path.is_file():
            raise MedcError(f"{bundle_dir} is not a medc bundle: {MANIFEST_NAME} is missing. "
                            "Build one with `medc build MODEL -o DIR`.")
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise MedcError(f"{path} is unreadable or not JSON ({e}); rebuild the bundle.") from None
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise MedcError(f"{path} has bundle format {version}; this medc reads format {FORMAT_VERSION}. "
                            "Rebuild the bundle with this medc version.")
        try:
            return cls.from_json(data)
        except (KeyError, TypeError) as e:
            raise MedcError(f"{path} is malformed ({e}); rebuild the bundle.") from None


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def feeds_digest(feeds: list[dict[str, np.ndarray]]) -> str:
    """sha256 over a list of input tensors' names and contents (calibration sets): identifies the set without naming
    files, whose names can carry patient data."""
    h = hashlib.sha256()
    for feed in feeds:
        for name in sorted(feed):
            h.update(name.encode())
            h.update(np.ascontiguousarray(feed[name]).tobytes())
    return h.hexdigest()


def hash_files(bundle_dir: Path) -> dict[str, str]:
    """sha256 of every file in the bundle except the manifest itself, keyed by POSIX relative path."""
    root = Path(bundle_dir)
    return {p.relative_to(root).as_posix(): sha256_file(p)
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != MANIFEST_NAME}


def verify_files(bundle_dir: Path, manifest: Manifest) -> None:
    """Refuse a bundle whose files are missing or differ from what was built."""
    root = Path(bundle_dir)
    missing = [f for f in manifest.files if not (root / f).is_file()]
    if missing:
        raise MedcError(f"bundle {root} is incomplete: missing {', '.join(missing)}. "
                        "Copy the whole bundle directory again or rebuild it.")
    bad = [f for f, digest in manifest.files.items() if sha256_file(root / f) != digest]
    if bad:
        raise MedcError(f"bundle {root} failed its integrity check: {', '.join(bad)} changed since the build "
                        "(sha256 mismatch). Do not use it; copy the bundle again or rebuild it.")
