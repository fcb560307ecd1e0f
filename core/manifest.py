"""The bundle manifest: what was built, from what, with which tools, and how close it is to the reference.

Plain data + JSON, no torch: the runtime reads it on the device. `files` maps every bundle file to its sha256, and
lists exactly the files on disk, so a tampered, partial or padded bundle is refused before anything runs. Every path
the manifest names is relative, inside the bundle and no symlink. Work done on a bundle after it was built and signed
(TensorRT engines finished on the device) is a record of its own under records/, naming the manifest it extends by
digest: the manifest and its signature never change after the build (medc.signing).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from medc.errors import MedcError
from medc.signing import Signature, Trust, canonical, digest
from medc.specs import TensorSpec

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"
RECORDS_DIR = "records"


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
    backend: str = "onnxruntime"  # what runs `file`: "onnxruntime" (ONNX) | "openvino" (OpenVINO IR .xml + .bin)

    def to_json(self) -> dict:
        d = asdict(self)
        if d["backend"] == "onnxruntime":  # the default: manifests written before the field stay byte-identical
            del d["backend"]
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
        return cls.parse(read_json_file(bundle_dir), Path(bundle_dir) / MANIFEST_NAME)

    @classmethod
    def parse(cls, data: dict, path: Path) -> "Manifest":
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise MedcError(f"{path} has bundle format {version}; this medc reads format {FORMAT_VERSION}. "
                            "Rebuild the bundle with this medc version.")
        try:
            return cls.from_json(data)
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise MedcError(f"{path} is malformed ({type(e).__name__}: {str(e)[:200]}); rebuild the bundle.") from None


def read_json_file(bundle_dir: Path) -> dict:
    """manifest.json as the JSON value it holds (what a signature covers)."""
    path = Path(bundle_dir) / MANIFEST_NAME
    if path.is_symlink() or not path.is_file():
        raise MedcError(f"{bundle_dir} is not a medc bundle: {MANIFEST_NAME} is missing. "
                        "Build one with `medc build MODEL -o DIR`.")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise MedcError(f"{path} is unreadable or not JSON ({e}); rebuild the bundle.") from None
    if not isinstance(data, dict):
        raise MedcError(f"{path} is not a JSON object; rebuild the bundle.")
    return data


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


def _is_bookkeeping(rel: str) -> bool:
    """The manifest, its signature and the records: what `files` cannot list, since they name it."""
    return rel in (MANIFEST_NAME, SIGNATURE_NAME) or rel.startswith(RECORDS_DIR + "/")


def disk_files(bundle_dir: Path) -> list[str]:
    """Every file in the bundle as a POSIX relative path, bookkeeping excluded. A symlink anywhere is refused: a
    bundle is plain files, and a link could point a hashed name at anything on the device."""
    root = Path(bundle_dir)
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        for name in dirnames + filenames:
            if (here / name).is_symlink():
                raise MedcError(f"bundle {root} holds a symbolic link, {(here / name).relative_to(root).as_posix()}; "
                                "a bundle is plain files. Copy it without links (cp -rL) or rebuild it.")
        found += [(here / f).relative_to(root).as_posix() for f in filenames]
    return sorted(f for f in found if not _is_bookkeeping(f))


def hash_files(bundle_dir: Path) -> dict[str, str]:
    """sha256 of every file in the bundle except the manifest, its signature and records, by POSIX relative path."""
    root = Path(bundle_dir)
    return {rel: sha256_file(root / rel) for rel in disk_files(root)}


def check_relpath(rel, what: str = "a path") -> str:
    """`rel` if it names a file inside a bundle: relative, no '..', no empty or '.' parts, no backslashes."""
    parts = rel.split("/") if isinstance(rel, str) else []
    if (not parts or rel.startswith("/") or "\\" in rel or "\x00" in rel or ":" in parts[0]
            or any(p in ("", ".", "..") for p in parts)):
        raise MedcError(f"the bundle's manifest names {what} {str(rel)[:120]!r} outside the bundle (absolute, "
                        "'..' or malformed); every path must be relative and inside it. Do not use this bundle; "
                        "rebuild it or copy it again from its source.")
    return rel


def bundle_file(bundle_dir: Path, rel: str) -> Path:
    """The file `rel` names inside the bundle: confined to it, with no symlink on the way."""
    check_relpath(rel)
    root = Path(bundle_dir)
    here = root
    for part in rel.split("/"):
        here = here / part
        if here.is_symlink():
            raise MedcError(f"{rel} in bundle {root} is reached through a symbolic link; a bundle is plain files. "
                            "Copy it without links (cp -rL) or rebuild it.")
    return here


@dataclass
class Record:
    """Work added to a bundle after its build (records/NAME.json): what it changes, the files it added, and the
    manifest it extends (`base`, the manifest's digest), signed on its own (records/NAME.sig)."""

    name: str
    kind: str  # one of RECORD_KINDS
    base: str
    files: dict[str, str]  # relative path -> sha256, files this record added
    data: dict  # manifest fields it sets, e.g. {"tensorrt": {...}}
    created: str = ""
    format_version: int = FORMAT_VERSION

    def apply(self, manifest: "Manifest") -> None:
        for key, value in self.data.items():
            if key == "lora_adapter":  # one run-time adapter added beside the build's (medc adapter add)
                lora = manifest.generation.get("lora")
                if not lora:
                    raise MedcError(f"record {self.name} adds a LoRA adapter to a bundle built without LoRA slots.")
                lora.setdefault("adapters", {}).update(value)
            else:
                setattr(manifest, key, value)

    def write(self, bundle_dir: Path, key=None) -> None:
        """Write records/NAME.json (and NAME.sig, signed by `key`, a medc.signing.PrivateKey) atomically."""
        folder = Path(bundle_dir) / RECORDS_DIR
        folder.mkdir(exist_ok=True)
        data = asdict(self)
        sig_path = folder / f"{self.name}.sig"
        if key is not None:
            Signature.make(canonical(data), key, f"record {self.name}").write(sig_path)
        else:
            sig_path.unlink(missing_ok=True)  # a signature of the previous record would not match this one
        tmp = folder / f".{self.name}.json.tmp"
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, folder / f"{self.name}.json")


# What each kind of record may set in the manifest: nothing else (a record cannot rewrite fidelity or files).
RECORD_KINDS = {"tensorrt-engines": {"tensorrt"}, "lora-adapter": {"lora_adapter"}}


def read_records(bundle_dir: Path) -> list[tuple[Record, dict, Signature | None]]:
    folder = Path(bundle_dir) / RECORDS_DIR
    if not folder.is_dir():
        return []
    out = []
    names = sorted(p.name for p in folder.iterdir())
    for name in names:
        stem, ext = os.path.splitext(name)
        if ext == ".sig" and f"{stem}.json" in names:
            continue
        path = folder / name
        if ext != ".json" or path.is_symlink() or not path.is_file():
            raise MedcError(f"bundle {bundle_dir} holds {RECORDS_DIR}/{name}, which is not a medc record; remove it "
                            "or copy the bundle again from its source.")
        try:
            data = json.loads(path.read_text())
            record = Record(**data)
        except (OSError, ValueError, TypeError):
            raise MedcError(f"{path} is not a medc record; remove it or copy the bundle again.") from None
        if record.name != stem or set(record.data) - RECORD_KINDS.get(record.kind, set()):
            raise MedcError(f"{path} is a {record.kind!r} record that sets {sorted(record.data)}; medc records set "
                            f"only {RECORD_KINDS}. Remove it or copy the bundle again.")
        out.append((record, data, Signature.read(folder / f"{stem}.sig")))
    return out


@dataclass(frozen=True)
class BundleCheck:
    """What `open_bundle` established about a bundle: one line per signed part (the chain `medc verify` prints)."""

    chain: list[str]
    signed: bool  # the manifest carries a signature (checked against trust when there is one)
    trusted: bool  # trust was configured and every part passed it


def check_bundle(bundle_dir: Path, data: dict, manifest: "Manifest", trust: Trust | None,
                 external: "callable | None" = None) -> BundleCheck:
    """Signatures against `trust`, records against the manifest, then every file (verify_files). Applies the
    records to `manifest`. `external(path) -> [relative paths]`: the external-data files an ONNX graph names."""
    root = Path(bundle_dir)
    fix = "Sign it with `medc sign BUNDLE --key KEY`, or trust the key that did (--trust, MEDC_TRUSTED_KEYS)."
    sig = Signature.read(root / SIGNATURE_NAME)
    chain = [_signed_line("manifest", sig, trust and trust.check(canonical(data), sig, f"bundle {root}", fix))]
    base = digest(data)
    extra: dict[str, str] = {}
    for record, raw, rsig in read_records(root):
        what = f"the {record.kind} record {record.name!r} of bundle {root}"
        if record.base != base:
            raise MedcError(f"{what} was made for another manifest (digest {record.base[:16]}, this one {base[:16]}): "
                            f"the manifest changed after it, or the record was copied from another bundle. Remove "
                            f"{RECORDS_DIR}/{record.name}.json and redo that step (e.g. `medc engines`).")
        key = trust and trust.check(canonical(raw), rsig, what, "Sign it when you make it (`medc engines --sign-key "
                                    "DEVICE.key`) and trust that device key.")
        chain.append(_signed_line(f"record {record.name} ({record.kind})", rsig, key))
        for rel, h in record.files.items():
            if manifest.files.get(rel, h) != h:
                raise MedcError(f"{what} replaces {rel}, a file of the signed build; rebuild the bundle instead.")
        extra.update(record.files)
        record.apply(manifest)
    verify_files(root, manifest, extra, external)
    return BundleCheck(chain, signed=sig is not None, trusted=trust is not None)


def _signed_line(what: str, sig: Signature | None, key) -> str:
    if key:
        return f"{what}: signed by {key.name} (key {key.key_id}), trusted"
    if sig is not None:
        return f"{what}: signed by key {sig.key_id}, not checked (no trusted keys configured: --trust or MEDC_TRUSTED_KEYS)"
    return (f"{what}: unsigned (no trusted keys configured; anyone who can write the bundle can change it undetected: "
            "`medc sign`)")


def named_paths(manifest: "Manifest") -> dict[str, str]:
    """Every file path the manifest names outside `files`, with what names it."""
    named = {c.file: f"component {n}" for n, c in manifest.components.items()}
    if manifest.golden:
        named[manifest.golden] = "golden"
    if isinstance(manifest.tokenizer.get("file"), str):
        named[manifest.tokenizer["file"]] = "tokenizer"
    for n, e in ((manifest.tensorrt or {}).get("engines") or {}).items():
        named[e.get("file")] = f"TensorRT engine {n}"
    return named


def verify_files(bundle_dir: Path, manifest: Manifest, extra: dict[str, str] | None = None, external=None) -> None:
    """Refuse a bundle whose files are missing, differ from what was built, or are not all listed; and one whose
    manifest names a path outside the bundle or a file it does not hash. `extra`: files records added."""
    root = Path(bundle_dir)
    expected = {**manifest.files, **(extra or {})}
    for rel in expected:
        check_relpath(rel, "the file")
    for rel, what in named_paths(manifest).items():
        check_relpath(rel, f"the {what} file")
        if rel not in expected:
            raise MedcError(f"the manifest of bundle {root} names {rel} ({what}) but does not hash it: it is not "
                            "covered by the bundle's integrity check. Rebuild the bundle.")
    on_disk = disk_files(root)
    missing = sorted(set(expected) - set(on_disk))
    if missing:
        raise MedcError(f"bundle {root} is incomplete: missing {', '.join(missing)}. "
                        "Copy the whole bundle directory again or rebuild it.")
    added = sorted(set(on_disk) - set(expected))
    if added:
        raise MedcError(f"bundle {root} holds files its manifest does not list: {', '.join(added[:5])}"
                        f"{' …' if len(added) > 5 else ''}. Something was added after the build; remove them, or "
                        "copy the bundle again from its source.")
    bad = [f for f, h in expected.items() if sha256_file(root / f) != h]
    if bad:
        raise MedcError(f"bundle {root} failed its integrity check: {', '.join(bad)} changed since the build "
                        "(sha256 mismatch). Do not use it; copy the bundle again or rebuild it.")
    if external is not None:
        for rel, what in named_paths(manifest).items():
            if rel.endswith(".onnx"):
                for ref in external(root / rel):
                    parent = rel.rsplit("/", 1)[0] + "/" if "/" in rel else ""
                    target = check_relpath(parent + ref if isinstance(ref, str) else ref,
                                           f"the external data of {rel}:")
                    if target not in expected:
                        raise MedcError(f"{rel} in bundle {root} reads external data from {ref[:120]!r}, which the "
                                        "manifest does not list; do not use this bundle, rebuild it.")
