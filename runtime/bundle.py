"""Open a bundle: read the manifest, check it was built for this target, check its signatures against the site's
trusted keys, apply its records and verify every file's sha256 (medc.manifest.check_bundle)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from medc.errors import MedcError
from medc.manifest import (SIGNATURE_NAME, BundleCheck, Manifest, bundle_file, check_bundle, read_json_file,
                           read_records)
from medc.runtime.onnxrefs import external_locations
from medc.signing import Signature, Trust, canonical
from medc.targets import get_target


@dataclass
class Bundle:
    path: Path
    manifest: Manifest
    providers: list[str]
    check: BundleCheck | None = None  # None: opened without verification (the build's own gate)

    def file(self, rel: str) -> Path:
        """A file the manifest names, confined to the bundle (no absolute paths, '..' or symlinks)."""
        return bundle_file(self.path, rel)


def open_bundle(path: str | Path, target: str | None = None, verify: bool = True,
                providers: list[str] | None = None, trust: Trust | None = None) -> Bundle:
    """`target=None` runs the bundle on the target it was built for; naming another one is refused. `trust=None`
    takes the site's trusted keys from MEDC_TRUSTED_KEYS (none: unsigned bundles open, as before signing existed)."""
    path = Path(path)
    if not path.is_dir():
        raise MedcError(f"bundle {path} does not exist or is not a directory; build one with `medc build MODEL -o {path}`.")
    data = read_json_file(path)
    manifest = Manifest.parse(data, path)
    if target is not None and target != manifest.target:
        raise MedcError(f"bundle {path} was built for target {manifest.target!r}, not {target!r}. "
                        f"Rebuild it with `medc build ... --target {target}`.")
    check = None
    if verify:
        check = check_bundle(path, data, manifest, trust or Trust.from_env(), external=external_locations)
    else:
        for record, _, _ in read_records(path):
            record.apply(manifest)
    chosen = providers or get_target(manifest.target).available_providers()
    return Bundle(path=path, manifest=manifest, providers=chosen, check=check)


def sign_bundle(path: str | Path, key) -> str:
    """Sign a bundle's manifest with `key` (a medc.signing.PrivateKey) after checking every file is as the manifest
    says: a signature vouches for what is on disk. Replaces an earlier signature. Returns the signed line."""
    bundle = open_bundle(path, trust=None)
    root = bundle.path
    Signature.make(canonical(read_json_file(root)), key, "manifest").write(root / SIGNATURE_NAME)
    return f"signed {root} with {key.name} (key {key.key_id})"
