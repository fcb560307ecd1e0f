"""~/.cache/medc: what builds reuse (exports, torch references, GGUF conversions), checked by content first.

A cache entry is a folder sealed with SEAL: the sha256 of each of its files. Before an entry is used its files are
hashed again; one that does not match (a disk error, a copy cut short, a hand edit) is removed and rebuilt, never
trusted. A build gates against references from here, so an entry that was edited must not pass a gate it would fail.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from medc.manifest import sha256_file

log = logging.getLogger(__name__)

SEAL = "sha256.json"


def cache_dir() -> Path:
    return Path.home() / ".cache" / "medc"


def seal(folder: Path) -> None:
    """Record the sha256 of every file directly in `folder` (subfolders are entries of their own)."""
    folder = Path(folder)
    digests = {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != SEAL}
    tmp = folder / f".{SEAL}.tmp"
    tmp.write_text(json.dumps(digests, indent=1))
    os.replace(tmp, folder / SEAL)


def intact(folder: Path) -> bool:
    """Whether `folder` is a sealed entry whose files are exactly what was sealed. A broken entry is removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return False
    try:
        digests = json.loads((folder / SEAL).read_text())
        files = {p.name for p in folder.iterdir() if p.is_file() and p.name != SEAL}
        ok = (isinstance(digests, dict) and set(digests) == files
              and all(sha256_file(folder / n) == h for n, h in digests.items()))
    except (OSError, ValueError):
        ok = False
    if not ok:
        log.warning("cache entry %s failed its content check; removing it and rebuilding", folder)
        shutil.rmtree(folder, ignore_errors=True)
    return ok


def publish(tmp: Path, folder: Path) -> None:
    """Seal the finished entry `tmp` and move it into place as `folder` (whole or absent)."""
    seal(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
