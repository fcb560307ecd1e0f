"""STOW-RS (DICOM PS3.18 10.5) for `medc serve`: a multipart/related body split into its application/dicom parts,
each instance checked from its header, stored durably, and the Store Instances Response built as DICOM JSON.

No HTTP here (runtime/serve.py holds the route, its limits and its errors) and no model: functions on bytes, paths
and UIDs, so each can be tested alone.

The multipart parser is ours, on a body already read whole under --max-body-mb: one `bytes.find` per boundary, the
parts returned as memoryviews of the body (no copy). The standard library's `email.parser.BytesParser`
decodes the body to text and re-encodes each part, line by line: on a 32 MiB body of eight 4 MiB parts it took
805 ms against this parser's 12 ms (2-core Xeon; tests/test_stow.py::test_parser_against_email measures both), on the
event loop's GIL. python-multipart (Starlette's form parser) is streaming and well
kept, but a callback state machine for multipart/form-data that medc would install for this route alone, and the
body is bounded and read whole anyway.

Privacy: nothing here logs; messages name sizes, positions and DICOM UIDs, never element values such as names.
"""

from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass
from pathlib import Path

from medc.errors import MedcError
from medc.system import fsync_dir

# Failure Reason (0008,1197) values (PS3.18 Table 10.5.3-2 / PS3.4 Annex GG.4.1.1).
OUT_OF_RESOURCES = 0xA700  # refused: an image over medc's size limits, or the store could not be written
NOT_MATCHING = 0xA900  # the data set does not match its SOP class (UIDs missing or malformed)
CANNOT_UNDERSTAND = 0xC000  # not a DICOM PS3.10 file, truncated, or pixel data medc cannot decode
SOP_CLASS_NOT_SUPPORTED = 0x0122  # not an image (a Structured Report, a plan, ...): nothing for the model to read

_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_PARAM = re.compile(rf';\s*({_TOKEN})\s*=\s*("(?:[^"\\]|\\.)*"|{_TOKEN})')
_BOUNDARY = re.compile(r"[0-9A-Za-z'()+_,./:=? -]{0,69}[0-9A-Za-z'()+_,./:=?-]")  # RFC 2046 5.1.1
MAX_PART_HEADERS = 8192  # bytes of headers per part


class MultipartError(MedcError):
    """The body is not a multipart/related message as STOW-RS sends it (HTTP 400)."""


class UnsupportedType(MedcError):
    """The request is not multipart/related; type="application/dicom" (HTTP 415)."""


class TooManyParts(MedcError):
    """More parts than --max-stow-instances (HTTP 400)."""


def media_params(content_type: str | None) -> tuple[str, dict[str, str]]:
    """'multipart/related; type="application/dicom"; boundary=x' -> ('multipart/related', {'type': ..., ...})."""
    if not content_type:
        return "", {}
    mime, _, rest = content_type.partition(";")
    params = {m.group(1).lower(): m.group(2)[1:-1].replace('\\"', '"') if m.group(2).startswith('"') else m.group(2)
              for m in _PARAM.finditer(";" + rest)}
    return mime.strip().lower(), params


def boundary(content_type: str | None) -> bytes:
    """The boundary of a STOW-RS request, after checking its media type (UnsupportedType, MultipartError)."""
    mime, params = media_params(content_type)
    if mime != "multipart/related":
        raise UnsupportedType("STOW-RS takes multipart/related; type=\"application/dicom\" bodies (got "
                              f"{mime[:60] or 'no Content-Type'!r}).")
    kind = params.get("type", "application/dicom").lower()
    if kind != "application/dicom":
        raise UnsupportedType(f"this server stores application/dicom parts only (type={kind[:60]!r}); DICOM JSON or "
                              "XML metadata with bulk data is not supported.")
    value = params.get("boundary")
    if value is None or not _BOUNDARY.fullmatch(value):
        raise MultipartError("the Content-Type has no valid boundary parameter (1-70 characters, RFC 2046).")
    return value.encode("ascii")


@dataclass
class Part:
    index: int
    content_type: str  # lower case, without parameters; "" when the part has no Content-Type
    data: memoryview


def split(body: bytes | bytearray, sep: bytes, max_parts: int) -> list[Part]:
    """The parts of a multipart body (RFC 2046 5.1.1): preamble and epilogue ignored, each part's headers read for
    its Content-Type, its content a view of `body`. MultipartError when malformed, TooManyParts past `max_parts`."""
    view = memoryview(body)
    delim = b"--" + sep
    pos = 0 if body.startswith(delim) else body.find(b"\r\n" + delim)
    if pos < 0:
        raise MultipartError("the body holds no part: the boundary of the Content-Type never appears in it.")
    pos = pos + len(delim) + (0 if pos == 0 and body.startswith(delim) else 2)
    parts: list[Part] = []
    while True:
        if body[pos:pos + 2] == b"--":  # the close delimiter; what follows is the epilogue
            break
        eol = body.find(b"\r\n", pos)
        if eol < 0 or body[pos:eol].strip(b" \t"):  # transport padding only, then CRLF
            raise MultipartError(f"part {len(parts)}: a malformed boundary line (or the body is truncated).")
        head_end = body.find(b"\r\n\r\n", eol, eol + MAX_PART_HEADERS)
        if head_end >= 0:
            head, start = body[eol + 2:head_end], head_end + 4
        elif body.startswith(b"\r\n", eol + 2):  # no headers at all
            head, start = b"", eol + 4
        else:
            raise MultipartError(f"part {len(parts)}: its headers do not end within {MAX_PART_HEADERS} bytes.")
        end = body.find(b"\r\n" + delim, start)
        if end < 0:
            raise MultipartError(f"part {len(parts)} has no closing boundary: the body is truncated.")
        if len(parts) == max_parts:
            raise TooManyParts(f"the request holds over {max_parts} parts; at most {max_parts} instances per request "
                               "(--max-stow-instances): send the rest in another request.")
        parts.append(Part(len(parts), _part_type(head), view[start:end]))
        pos = end + 2 + len(delim)
    if not parts:
        raise MultipartError("the multipart body holds no part.")
    return parts


def _part_type(head: bytes) -> str:
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-type":
            return value.decode("latin-1").partition(";")[0].strip().lower()
    return ""


# -- one instance ---------------------------------------------------------------------------------------------------
class Refused(Exception):
    """An instance that is not stored: its Failure Reason and a message without patient data."""

    def __init__(self, reason: int, message: str, sop_class: str = "", sop: str = ""):
        super().__init__(message)
        self.reason, self.message, self.sop_class, self.sop = reason, message, sop_class, sop


@dataclass
class Header:
    study: str
    series: str
    sop: str
    sop_class: str
    rows: int
    columns: int
    frames: int


def header(data, where: str, check_size) -> tuple[Header, object]:
    """Reads one part as a DICOM PS3.10 file, without its pixel data, and checks what the model needs: the four UIDs
    (well formed: they name the stored file), pixel data, and the image's size (`check_size(width, height, what)`,
    raising an exception whose message is safe to return) before any pixel is decoded. (Header, the pydicom
    dataset with its pixel data unread); raises Refused."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(io.BytesIO(data), defer_size=4096)  # large values (pixel data) stay unread
        uids = [str(ds.get(k, "") or "") for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
                                                   "SOPClassUID")]
        has_pixels = any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))
        rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (InvalidDicomError, EOFError, OSError, ValueError, TypeError, KeyError, AttributeError, OverflowError):
        raise Refused(CANNOT_UNDERSTAND, f"{where} is not a readable DICOM PS3.10 file (no preamble and file meta "
                                         "information, or truncated).") from None
    study, series, sop, sop_class = uids
    bad = [k for k, v in zip(("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"), uids)
           if not valid_uid(v)]
    if bad:
        raise Refused(NOT_MATCHING, f"{where}: {', '.join(bad)} missing or not a valid UID.",
                      sop_class if valid_uid(sop_class) else "", sop if valid_uid(sop) else "")
    if not has_pixels or rows <= 0 or columns <= 0:
        raise Refused(SOP_CLASS_NOT_SUPPORTED, f"{where} (SOP class {sop_class}) holds no image: medc reads image "
                                               "instances only.", sop_class, sop)
    try:
        check_size(columns, rows, where)
    except MedcError as e:
        raise Refused(OUT_OF_RESOURCES, str(e), sop_class, sop) from None
    return Header(study, series, sop, sop_class, rows, columns, frames), ds


def valid_uid(uid: str) -> bool:
    return 0 < len(uid) <= 64 and _UID.fullmatch(uid) is not None


# -- the store -------------------------------------------------------------------------------------------------------
def instance_path(root: Path, study: str, series: str, sop: str) -> Path:
    """ROOT/STUDY/SERIES/SOP.dcm; the UIDs are checked (digits and dots), so no name leaves ROOT."""
    if not all(valid_uid(u) for u in (study, series, sop)):
        raise ValueError("not a valid UID")
    return root / study / series / f"{sop}.dcm"


def store(root: Path, h: Header, data) -> Path:
    """Writes one instance durably: to a temporary file, fsync'd, renamed over ROOT/STUDY/SERIES/SOP.dcm (a second
    copy of an instance replaces the first whole), and its folder fsync'd so the new name survives a power cut.
    OSError (a full disk) is the caller's to report."""
    path = instance_path(root, h.study, h.series, h.sop)
    created = [p for p in (path.parent.parent, path.parent) if not p.exists()]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{h.sop}.{os.getpid()}.{id(data):x}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    for folder in [path.parent, *[p.parent for p in created]]:  # new names: in the series, study and root folders
        fsync_dir(folder)
    return path


# -- the response (DICOM JSON, PS3.18 F.2) ----------------------------------------------------------------------------
RESULTS_CREATOR = "MEDC RESULTS"  # private creator of the block carrying medc's results in the DICOM JSON answer
RESULTS_TAG, RESULTS_CREATOR_TAG = "00771001", "00770010"


def _element(vr: str, value=None) -> dict:
    return {"vr": vr} if value in (None, "") else {"vr": vr, "Value": [value]}


def response(stored: list[tuple[str, str, str]], failed: list[tuple[str, str, int]], study_url: str | None,
             results_json: str | None = None) -> tuple[int, dict]:
    """(HTTP status, Store Instances Response as DICOM JSON). `stored`: (SOP class, SOP instance, RetrieveURL);
    `failed`: (SOP class, SOP instance, Failure Reason), the UIDs empty where the part could not be read. 200: all
    stored; 202: some; 409: none (PS3.18 10.5.3.1). medc's results, as JSON text, in a private element."""
    out: dict = {"00081190": _element("UR", study_url)}
    if failed:
        out["00081198"] = {"vr": "SQ", "Value": [
            {"00081150": _element("UI", c), "00081155": _element("UI", s), "00081197": _element("US", r)}
            for c, s, r in failed]}
    if stored:
        out["00081199"] = {"vr": "SQ", "Value": [
            {"00081150": _element("UI", c), "00081155": _element("UI", s), "00081190": _element("UR", url)}
            for c, s, url in stored]}
    if results_json is not None:
        out[RESULTS_CREATOR_TAG] = _element("LO", RESULTS_CREATOR)
        out[RESULTS_TAG] = _element("UT", results_json)
    status = 200 if not failed else 202 if stored else 409
    return status, out
