"""The external-data locations an ONNX graph names, read from the protobuf wire format.

A graph's initializers may live in other files (`external_data` entries with a `location` key); ONNX Runtime opens
them relative to the graph. Versions before ~1.24 opened absolute and '..' locations too, so medc checks every
location against the bundle's file list itself before a session opens one (medc.manifest.verify_files).

Not the `onnx` package: devices install the runtime alone, without onnx. The walk needs six message types and skips
every weight in O(1) (length-delimited fields are stepped over, never copied), so a 1 GB graph costs milliseconds.
Field numbers: onnx/onnx.proto3.
"""

from __future__ import annotations

import mmap
from pathlib import Path

from medc.errors import MedcError

# message -> {field number: message type of that (repeated) field}; only the paths that can reach a tensor.
_MODEL = {7: "graph", 25: "function"}
_FIELDS = {
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "function": {7: "node"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},
    "tensor": {13: "entry"},
}


class _Malformed(Exception):
    pass


def _varint(buf, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise _Malformed
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7


def _fields(buf, start: int, end: int):
    """(field number, value start, value end) of each length-delimited field in buf[start:end]; others skipped."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos)
        wire = key & 7
        if wire == 0:
            _, pos = _varint(buf, pos)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            n, pos = _varint(buf, pos)
            if pos + n > end:
                raise _Malformed
            yield key >> 3, pos, pos + n
            pos += n
        else:  # groups (3, 4) are not used by onnx.proto
            raise _Malformed
    if pos != end:
        raise _Malformed


def _walk(buf, start: int, end: int, kind: str, out: list[str], depth: int) -> None:
    if depth > 64:  # subgraphs nest (If/Loop bodies); a deeper file is built to exhaust the stack
        raise _Malformed
    if kind == "entry":  # StringStringEntryProto: key = 1, value = 2
        fields = {f: bytes(buf[a:b]) for f, a, b in _fields(buf, start, end)}
        if fields.get(1) == b"location":
            out.append(fields.get(2, b"").decode("utf-8", "replace"))
        return
    table = _MODEL if kind == "model" else _FIELDS[kind]
    for field, a, b in _fields(buf, start, end):
        if field in table:
            _walk(buf, a, b, table[field], out, depth + 1)


def external_locations(path: Path) -> list[str]:
    """Every `location` of external data in the ONNX file `path`, as written in it."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            if path.stat().st_size == 0:
                raise _Malformed
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                buf = memoryview(m)
                try:
                    out: list[str] = []
                    _walk(buf, 0, len(buf), "model", out, 0)
                    return out
                finally:
                    buf.release()
    except (_Malformed, OSError, ValueError):
        raise MedcError(f"{path.name} is not a readable ONNX model (truncated or malformed); copy the bundle again "
                        "or rebuild it.") from None
