"""Open a bundle: read the manifest, check it was built for this target, verify every file's sha256."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from medc.errors import MedcError
from medc.manifest import Manifest, verify_files
from medc.targets import get_target


@dataclass
class Bundle:
    path: Path
    manifest: Manifest
    providers: list[str]

    def file(self, rel: str) -> Path:
        return self.path / rel


def open_bundle(path: str | Path, target: str | None = None, verify: bool = True,
                providers: list[str] | None = None) -> Bundle:
    """`target=None` runs the bundle on the target it was built for; naming another one is refused."""
    path = Path(path)
    if not path.is_dir():
        raise MedcError(f"bundle {path} does not exist or is not a directory; build one with `medc build MODEL -o {path}`.")
    manifest = Manifest.read(path)
    if target is not None and target != manifest.target:
        raise MedcError(f"bundle {path} was built for target {manifest.target!r}, not {target!r}. "
                        f"Rebuild it with `medc build ... --target {target}`.")
    if verify:
        verify_files(path, manifest)
    chosen = providers or get_target(manifest.target).available_providers()
    return Bundle(path=path, manifest=manifest, providers=chosen)
