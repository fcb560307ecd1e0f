"""DICOM in: a file, bytes, a file object or a series folder -> model-ready 8-bit RGB images, with a record of how.

torch-free; pydicom (and pylibjpeg's plugins for compressed transfer syntaxes) is imported only when DICOM is read:
`pip install 'medc[dicom]'`.

What Google's own DICOM handling for MedGemma / MedSigLIP does, and what medc follows (from memory of the public
sources; this machine cannot reach them, so each constant below names where it comes from):
- google-health/medgemma, notebooks/high_dimensional_ct_hugging_face.ipynb (the MedGemma 1.5 CT notebook): HU from
  RescaleSlope/RescaleIntercept, then three windows stacked as R, G, B — R -1024..1024 (wide), G -135..215
  (soft tissue: level 40, width 350), B 0..80 (brain) — each clipped and scaled to 0..255; up to 85 evenly spaced
  slices sent as images of one prompt. medc pins the notebook's G window, -135..215. The serving container's generic
  DICOM handler (the HAI-DEF serving framework's data accessor for DICOM, used by MedGemma's and MedSigLIP's
  Vertex containers) holds a CT window table of its own whose G entry differs; medc does not use it. A site that
  wants it writes it in a --dicom-config file (README, DICOM).
- The same generic handler for projection radiographs (CR/DX): MONOCHROME1 inverted, the modality LUT applied, the
  file's VOI LUT (or first WindowCenter/WindowWidth) applied, the result rescaled over its own dynamic range to
  8 bits, grey repeated to three channels and padded to square (as Google evaluates MedSigLIP).
- MR: no fixed window exists, so medc normalises each slice between its 0.5th and 99.5th percentiles (medc's
  choice; MR intensities have no physical unit).
- Colour (RGB, YBR_*, PALETTE COLOR): converted to RGB; an embedded ICC profile is applied (to sRGB).
The per-modality recipe is `DicomConfig` (a typed table), overridable from a TOML file and recorded with each image.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from medc.errors import MedcError
from medc.runtime.imagelimits import MAX_PIXELS, check_size

log = logging.getLogger(__name__)

__all__ = [
    "VOLUME_MODALITIES",
    "DicomConfig",
    "DicomImage",
    "InstanceRef",
    "Recipe",
    "UnsupportedTransferSyntax",
    "is_dicom",
    "load_config",
    "read_dicom",
    "read_volume",
    "volume_slices",
]

INSTALL = "pip install 'medc[dicom]'"
MAX_VOLUME_PIXELS = 4 * MAX_PIXELS  # decoded pixels in one read (all frames together); beyond: pick frames or slices
_METHODS = ("voi", "ct_windows", "percentile", "minmax")
# Transfer syntax -> the plugin that decodes it (pylibjpeg's), for the error that says what to install.
_PLUGINS = {
    "1.2.840.10008.1.2.4.50": "pylibjpeg-libjpeg", "1.2.840.10008.1.2.4.51": "pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.57": "pylibjpeg-libjpeg", "1.2.840.10008.1.2.4.70": "pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.80": "pylibjpeg-libjpeg", "1.2.840.10008.1.2.4.81": "pylibjpeg-libjpeg",
    "1.2.840.10008.1.2.4.90": "pylibjpeg-openjpeg", "1.2.840.10008.1.2.4.91": "pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.201": "pylibjpeg-openjpeg", "1.2.840.10008.1.2.4.202": "pylibjpeg-openjpeg",
    "1.2.840.10008.1.2.4.203": "pylibjpeg-openjpeg", "1.2.840.10008.1.2.5": "pylibjpeg-rle",
}
# SOP classes that carry no image for a model, by a word of their name (all image classes say "Image").
_NON_IMAGE = ("SR", "Presentation State", "Segmentation", "RT ", "Waveform", "Encapsulated", "Key Object",
              "Raw Data", "Parametric Map", "Directory", "Spectroscopy")


# -- the recipe table -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Recipe:
    """How one modality's pixels become the model's 8-bit RGB (after the modality LUT and before the bundle's own
    resize and normalise)."""

    method: str  # voi: the file's VOI LUT or window | ct_windows: HU windows as R, G, B | percentile | minmax
    windows: tuple[tuple[float, float], ...] = ()  # ct_windows: (low, high) in HU for R, G, B
    percentiles: tuple[float, float] = (0.5, 99.5)  # percentile: the values mapped to 0 and 255
    stretch: bool = False  # voi: then rescale the result over its own min..max (Google's generic handler, CR/DX)
    pad_to_square: bool = False  # zero-pad the short side (Google's MedSigLIP evaluation of radiographs)

    def __post_init__(self):
        if self.method not in _METHODS:
            raise MedcError(f"DICOM recipe method {self.method!r} is unknown; use one of {', '.join(_METHODS)}.")
        if self.method == "ct_windows" and len(self.windows) != 3:
            raise MedcError("a ct_windows recipe needs three windows, [[low, high], ...] in HU for R, G, B.")
        if any(hi <= lo for lo, hi in self.windows):
            raise MedcError(f"DICOM recipe windows {list(self.windows)}: each needs low < high.")
        lo, hi = self.percentiles
        if not 0 <= lo < hi <= 100:
            raise MedcError(f"DICOM recipe percentiles {list(self.percentiles)}: need 0 <= low < high <= 100.")


# The MedGemma 1.5 CT notebook's three windows (see the module docstring): wide, soft tissue, brain.
CT_WINDOWS = ((-1024.0, 1024.0), (-135.0, 215.0), (0.0, 80.0))
_RADIOGRAPH = Recipe("voi", stretch=True, pad_to_square=True)
DEFAULT_RECIPES = {
    "CR": _RADIOGRAPH, "DX": _RADIOGRAPH, "MG": _RADIOGRAPH,
    "CT": Recipe("ct_windows", windows=CT_WINDOWS),
    "MR": Recipe("percentile", percentiles=(0.5, 99.5)),
    "default": Recipe("voi"),  # the file's window when it has one, else its min..max
}


@dataclass(frozen=True)
class DicomConfig:
    """Recipes by Modality (0008,0060); "default" for every other modality. `source` is recorded with each image."""

    recipes: dict = field(default_factory=lambda: dict(DEFAULT_RECIPES))
    source: str = "built-in"

    def recipe(self, modality: str) -> Recipe:
        return self.recipes.get(modality) or self.recipes["default"]

    def to_json(self) -> dict:
        return {"source": self.source, "recipes": {k: asdict(v) for k, v in self.recipes.items()}}


def load_config(path) -> DicomConfig:
    """A TOML file of [MODALITY] tables (keys as `Recipe`'s fields), each over the built-in recipe it names."""
    try:
        import tomllib
    except ImportError:  # Python 3.10 (JetPack 6): the dicom extra installs tomli, the same reader
        import tomli as tomllib

    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise MedcError(f"DICOM config {path.name!r} not found; check the --dicom-config path.") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise MedcError(f"DICOM config {path.name!r} is not valid TOML ({e}); see README, DICOM.") from None
    recipes, fields = dict(DEFAULT_RECIPES), set(Recipe.__dataclass_fields__)
    for modality, table in data.items():
        if not isinstance(table, dict):
            raise MedcError(f"DICOM config {path.name!r}: {modality!r} must be a table, [{modality}].")
        unknown = set(table) - fields
        if unknown:
            raise MedcError(f"DICOM config {path.name!r}: [{modality}] has unknown keys {sorted(unknown)}; "
                            f"known: {sorted(fields)}.")
        kw = dict(table)
        try:
            if "windows" in kw:
                kw["windows"] = tuple((float(lo), float(hi)) for lo, hi in kw["windows"])
            if "percentiles" in kw:
                kw["percentiles"] = tuple(float(v) for v in kw["percentiles"])
        except (TypeError, ValueError):
            raise MedcError(f"DICOM config {path.name!r}: [{modality}] windows are [[low, high], ...] and "
                            "percentiles [low, high], in numbers.") from None
        base = recipes.get(modality.upper() if modality != "default" else modality, recipes["default"])
        recipes[modality if modality == "default" else modality.upper()] = replace(base, **kw)
    return DicomConfig(recipes, source=path.name)


# -- the results ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class InstanceRef:
    """Which instance (and frame) an image came from. UIDs only: no patient identifiers."""

    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    modality: str
    frame: int | None = None  # 0-based, for multi-frame instances


@dataclass(frozen=True)
class DicomImage:
    pixels: np.ndarray  # uint8 H x W x 3, windowed / normalised per the recipe; the bundle resizes and normalises
    ref: InstanceRef
    recipe: dict  # the record of what was applied
    pixel_spacing: tuple[float, float] | None = None  # (row, column) mm, kept for the record


class UnsupportedTransferSyntax(MedcError):
    """Compressed pixel data no installed plugin decodes (HTTP 415 in the server)."""


# -- reading ----------------------------------------------------------------------------------------------------------
def is_dicom(source) -> bool:
    """A DICOM Part 10 file or its bytes: 'DICM' at offset 128."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source[128:132]) == b"DICM"
    try:
        with open(source, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except (OSError, TypeError, ValueError):
        return False


def _pydicom():
    try:
        import pydicom
        import pydicom.pixels
    except ImportError:
        raise MedcError(f"reading DICOM needs pydicom; {INSTALL}") from None
    logging.getLogger("pydicom").addFilter(_no_traceback)  # once: the same filter is not added twice
    return pydicom


def _no_traceback(record: logging.LogRecord) -> bool:
    """pydicom logs each failing decoder with its traceback (LOGGER.exception); medc reports the failure itself."""
    return record.exc_info is None


@dataclass
class _Item:
    """One frame to read: where it is and the header that says how."""

    ds: object  # pydicom Dataset (pixels included for a file or bytes; header only for a series' instances)
    src: object  # what pixel_array reads: the dataset, or a path
    name: str
    frame: int | None
    nframes: int


def read_dicom(source, config: DicomConfig | None = None, frames="middle", name: str | None = None
               ) -> list[DicomImage]:
    """A file path, bytes, a file object or a folder (one series, ordered by position along its normal, else
    InstanceNumber) -> images. `frames` picks among the frames of a multi-frame instance, or the slices of a series:
    "middle", "all", an index, or a `range`. `name` is what errors call bytes or a file object. MedcError for every
    bad input, naming the file and the fix, never its content."""
    config = config or DicomConfig()
    with _quiet():
        items = _items(source, name)
        chosen = _choose(items, frames, items[0].name if len({i.name for i in items}) == 1 else _label(source, name))
        return [_image(it, config) for it in chosen]


VOLUME_MODALITIES = ("CT", "MR")  # read as volumes (MedGemma 1.5 reads CT and MR as slices); others: middle frame


def read_volume(source, k: int, config: DicomConfig | None = None, name: str | None = None) -> list[DicomImage]:
    """A CT or MR series folder or multi-frame instance -> K evenly spaced slices (first and last included),
    decoding only those; any other source -> its middle frame, as read_dicom."""
    with _quiet():
        items = _items(source, name)
        picked = _even(len(items), k) if str(items[0].ds.get("Modality", "")) in VOLUME_MODALITIES else \
            [(len(items) - 1) // 2]
        return [_image(items[i], config or DicomConfig()) for i in picked]


@contextlib.contextmanager
def _quiet():
    """pydicom's warnings about invalid values can quote them (a birth date, a name): none reach a log."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def volume_slices(images: list[DicomImage], k: int) -> list[DicomImage]:
    """K evenly spaced images (first and last included); all of them when there are no more than K."""
    return [images[i] for i in _even(len(images), k)]


def _even(n: int, k: int) -> list[int]:
    if k < 1:
        raise MedcError(f"--slices {k}: pass at least 1.")
    if n <= k:
        return list(range(n))
    return sorted({int(i) for i in np.linspace(0, n - 1, k).round()})


def _label(source, name) -> str:
    if name:
        return name
    if isinstance(source, (str, os.PathLike)):
        return f"{Path(source).name!r}"
    return "the DICOM data"


def _items(source, name) -> list[_Item]:
    pydicom = _pydicom()
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            return _series(path, pydicom)
        if not path.is_file():
            raise MedcError(f"DICOM file {path.name!r} not found; check the path.")
        what = f"DICOM file {path.name!r}"
        if not is_dicom(path):
            raise MedcError(f"{what} is not a DICOM Part 10 file (no 'DICM' marker at byte 128); export it from "
                            "the PACS as a DICOM file, or pass a PNG/JPEG.")
        ds = _read(path, what, pydicom)
        return _frames(ds, ds, what)
    if isinstance(source, (bytes, bytearray, memoryview)):
        what = name or "the DICOM data"
        if not is_dicom(source):
            raise MedcError(f"{what} is not DICOM Part 10 data (no 'DICM' marker at byte 128).")
        ds = _read(io.BytesIO(bytes(source)), what, pydicom)
        return _frames(ds, ds, what)
    if hasattr(source, "read"):
        return _items(source.read(), name or "the DICOM data")
    raise MedcError(f"cannot read DICOM from a {type(source).__name__}; pass a path, bytes or a file object.")


def read_header(source, name: str | None = None):
    """A DICOM file's (path) or Part 10 bytes' header as a pydicom Dataset, without its pixel data; MedcError for
    what is not readable, naming `name` (or the file), never its content."""
    pydicom = _pydicom()
    from pydicom.errors import InvalidDicomError

    what = name or (Path(source).name if isinstance(source, (str, Path)) else "the DICOM data")
    if isinstance(source, (bytes, bytearray, memoryview)):
        src = io.BytesIO(bytes(source))
    else:
        src = source if hasattr(source, "read") else str(source)

    try:
        return pydicom.dcmread(src, stop_before_pixels=True)
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError, AttributeError, IndexError,
            NotImplementedError, OverflowError) as e:
        raise MedcError(f"{what} is truncated or corrupt ({type(e).__name__}); re-export it from the PACS.") from None


def _read(src, what: str, pydicom, header_only: bool = False):
    from pydicom.errors import InvalidDicomError

    try:
        # header_only: large values (the pixel data) are left in the file, read when decoded
        return pydicom.dcmread(src, defer_size="64 KB" if header_only else None)
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError, AttributeError, IndexError,
            NotImplementedError, OverflowError) as e:
        raise MedcError(f"{what} is truncated or corrupt ({type(e).__name__}); re-export it from the PACS.") from None


def _check_image(ds, what: str) -> None:
    """Refuse, from the header, what holds no image medc can read."""
    sop = ds.get("SOPClassUID")
    sop_name = getattr(sop, "name", "") if sop else ""
    if sop_name and "Image" not in sop_name and any(w in sop_name for w in _NON_IMAGE):
        raise MedcError(f"{what} is a {sop_name} instance, not an image; send the image series it refers to.")
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise MedcError(f"{what} holds no pixel data ({sop_name or 'no SOP class: truncated or corrupt?'}); send "
                        "an image instance, re-exported from the PACS.")
    if "PixelData" not in ds:
        raise MedcError(f"{what} holds float pixel data; medc reads 8-16 bit integer images.")
    bits, spp = int(ds.get("BitsAllocated", 0) or 0), int(ds.get("SamplesPerPixel", 1) or 1)
    if bits not in (8, 16):
        raise MedcError(f"{what} has {bits}-bit pixels; medc reads 8-16 bit images (convert it first).")
    if spp not in (1, 3):
        raise MedcError(f"{what} has {spp} samples per pixel; medc reads greyscale or colour images.")
    rows, cols = ds.get("Rows"), ds.get("Columns")
    if not rows or not cols:
        raise MedcError(f"{what} has no Rows/Columns; it is corrupt, re-export it.")
    check_size(int(cols), int(rows), what)


def _frames(ds, src, what: str) -> list[_Item]:
    _check_image(ds, what)
    n = int(ds.get("NumberOfFrames", 1) or 1)
    return [_Item(ds, src, what, i if n > 1 else None, n) for i in range(n)]


def _series(folder: Path, pydicom) -> list[_Item]:
    """Every image instance of one series in a folder, ordered, its geometry checked."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    headers, skipped = [], 0
    for p in files:
        if not is_dicom(p):
            skipped += 1
            continue
        ds = _read(p, f"DICOM file {p.name!r}", pydicom, header_only=True)
        sop = getattr(ds.get("SOPClassUID"), "name", "")
        if "Directory" in sop or (sop and "Image" not in sop and any(w in sop for w in _NON_IMAGE)):
            skipped += 1  # a DICOMDIR, a presentation state or a report stored with the series
            continue
        headers.append((p, ds))
    if skipped:
        log.info("%s: skipped %d file(s) that are not DICOM images", folder.name, skipped)
    if not headers:
        raise MedcError(f"folder {folder.name!r} holds no DICOM image files; pass a folder of one series' "
                        ".dcm files.")
    series = {str(ds.get("SeriesInstanceUID", "")) for _, ds in headers}
    if len(series) > 1:
        raise MedcError(f"folder {folder.name!r} holds {len(series)} series; pass a folder of one series "
                        "(one acquisition).")
    headers.sort(key=_order(headers))
    _check_geometry(headers, folder.name)
    items = []
    for p, ds in headers:
        items += _frames(ds, p, f"DICOM file {p.name!r}")
    return items


def _order(headers):
    """Sort key: position along the slice normal when every instance has one, else InstanceNumber, else name."""
    def normal(ds):
        iop = [float(v) for v in ds.ImageOrientationPatient]
        return np.cross(iop[:3], iop[3:])

    if all("ImagePositionPatient" in ds and "ImageOrientationPatient" in ds for _, ds in headers):
        n = normal(headers[0][1])
        return lambda h: (float(np.dot(n, [float(v) for v in h[1].ImagePositionPatient])), h[0].name)
    return lambda h: (int(h[1].get("InstanceNumber") or 0), h[0].name)


def _check_geometry(headers, folder: str) -> None:
    """Instances of one acquisition share their size, orientation and pixel spacing."""
    first_p, first = headers[0]
    for p, ds in headers[1:]:
        if (ds.get("Rows"), ds.get("Columns")) != (first.get("Rows"), first.get("Columns")):
            raise MedcError(f"series folder {folder!r} mixes image sizes ({first_p.name!r} is "
                            f"{first.get('Columns')}x{first.get('Rows')}, {p.name!r} {ds.get('Columns')}x"
                            f"{ds.get('Rows')}); pass the instances of one acquisition.")
        for key, tol in (("ImageOrientationPatient", 1e-3), ("PixelSpacing", 1e-3)):
            a, b = first.get(key), ds.get(key)
            if (a is None) != (b is None) or (a is not None and not np.allclose(
                    [float(v) for v in a], [float(v) for v in b], atol=tol)):
                raise MedcError(f"series folder {folder!r}: {p.name!r} has another {key} than {first_p.name!r}; "
                                "pass the instances of one acquisition.")


def _choose(items: list[_Item], frames, what: str) -> list[_Item]:
    n = len(items)
    if frames == "middle":
        chosen = [items[(n - 1) // 2]]
    elif frames == "all":
        chosen = items
    elif isinstance(frames, int) and not isinstance(frames, bool):
        if not -n <= frames < n:
            raise MedcError(f"{what} has {n} frames; frame {frames} is out of range.")
        chosen = [items[frames]]
    elif isinstance(frames, range):
        chosen = [items[i] for i in frames if -n <= i < n]
        if not chosen:
            raise MedcError(f"{what} has {n} frames; the range {frames.start}..{frames.stop} holds none of them.")
    else:
        raise MedcError(f"frames={frames!r}: pass 'middle', 'all', a frame index or a range.")
    total = sum(int(it.ds.Rows) * int(it.ds.Columns) for it in chosen)
    if total > MAX_VOLUME_PIXELS:
        raise MedcError(f"{what}: {len(chosen)} frames of {chosen[0].ds.Columns}x{chosen[0].ds.Rows} are over "
                        f"medc's limit of {MAX_VOLUME_PIXELS:,} decoded pixels in one read; pick a range of frames "
                        "or fewer --slices.")
    return chosen


# -- one frame to model pixels ----------------------------------------------------------------------------------------
def _decode(it: _Item) -> np.ndarray:
    from pydicom.pixels import pixel_array

    ts = str(it.ds.file_meta.get("TransferSyntaxUID", "")) if hasattr(it.ds, "file_meta") else ""
    try:
        arr = pixel_array(it.src, index=it.frame)
    except (RuntimeError, NotImplementedError) as e:
        msg = str(e)
        name = getattr(getattr(it.ds.file_meta, "TransferSyntaxUID", None), "name", ts) if ts else "unknown"
        if "missing dependencies" in msg or "No pixel data decoders" in msg or "not supported by" in msg:
            plugin = _PLUGINS.get(ts)
            fix = f"pip install {plugin} (or {INSTALL})" if plugin else "convert it to an uncompressed transfer syntax"
            raise UnsupportedTransferSyntax(f"{it.name} uses transfer syntax {name} ({ts}), which no installed "
                                            f"plugin decodes; {fix}.") from None
        raise MedcError(f"{it.name}: its {name} pixel data cannot be decoded by the installed plugins: it is "
                        "truncated, corrupt, or a variant they do not support (e.g. 12-bit JPEG Extended); convert "
                        "it to an uncompressed or JPEG 2000 transfer syntax.") from None
    except (ValueError, EOFError, OSError, KeyError, AttributeError, TypeError, IndexError) as e:
        raise MedcError(f"{it.name}: its pixel data is truncated or corrupt ({type(e).__name__}); re-export it "
                        "from the PACS.") from None
    if arr.ndim == (3 if int(it.ds.get("SamplesPerPixel", 1) or 1) == 1 else 4):  # all frames came back
        arr = arr[it.frame or 0]
    return arr


def _functional(ds, frame: int | None, seq: str, attr: str):
    """An attribute of an enhanced multi-frame instance's per-frame, else shared, functional group."""
    for groups, i in (("PerFrameFunctionalGroupsSequence", frame or 0), ("SharedFunctionalGroupsSequence", 0)):
        try:
            item = getattr(ds, groups)[i]
            return getattr(getattr(item, seq)[0], attr)
        except (AttributeError, IndexError, KeyError, TypeError):
            continue
    return None


def _modality_lut(arr: np.ndarray, ds, frame) -> tuple[np.ndarray, str]:
    from pydicom.pixels import apply_modality_lut

    if "ModalityLUTSequence" in ds:
        return np.asarray(apply_modality_lut(arr, ds), np.float64), "ModalityLUTSequence"
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is None:
        slope = _functional(ds, frame, "PixelValueTransformationSequence", "RescaleSlope")
        intercept = _functional(ds, frame, "PixelValueTransformationSequence", "RescaleIntercept")
    slope = 1.0 if slope is None else float(slope)
    intercept = 0.0 if intercept is None else float(intercept)
    x = arr.astype(np.float64)
    if slope != 1.0 or intercept != 0.0:
        x = x * slope + intercept
        return x, f"rescale slope {slope:g} intercept {intercept:g}"
    return x, "identity"


def _first(v):
    return float(v[0]) if isinstance(v, (list, tuple)) or type(v).__name__ == "MultiValue" else float(v)


def _voi(x: np.ndarray, ds, frame) -> tuple[np.ndarray | None, str]:
    """The file's VOI -> [0, 1] (PS3.3 C.11.2.1.2), or None when the file has none. A VOI LUT is preferred."""
    if "VOILUTSequence" in ds:
        item = ds.VOILUTSequence[0]
        n, first, bits = (int(v) for v in item.LUTDescriptor)
        n = n or 65536
        lut = np.asarray(item.LUTData if isinstance(item.LUTData, (list, tuple)) or
                         type(item.LUTData).__name__ == "MultiValue" else [item.LUTData], np.float64)[:n]
        if len(lut) < n:
            raise MedcError("the VOI LUT of this file is shorter than its descriptor; it is corrupt, re-export it.")
        idx = np.clip(np.round(x) - first, 0, n - 1).astype(np.int64)
        return lut[idx] / float(2**bits - 1), f"VOILUTSequence ({n} entries, {bits} bits)"
    wc, ww = ds.get("WindowCenter"), ds.get("WindowWidth")
    fn = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
    if wc is None or ww is None:
        wc = _functional(ds, frame, "FrameVOILUTSequence", "WindowCenter")
        ww = _functional(ds, frame, "FrameVOILUTSequence", "WindowWidth")
    if wc is None or ww is None:
        return None, "none in the file"
    c, w = _first(wc), _first(ww)
    if fn == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (x - c) / max(w, 1e-6))), f"sigmoid center {c:g} width {w:g}"
    if fn == "LINEAR_EXACT":
        return np.clip((x - c) / max(w, 1e-6) + 0.5, 0, 1), f"linear_exact center {c:g} width {w:g}"
    w = max(w, 1.0)  # LINEAR: width >= 1 (PS3.3 C.11.2.1.2.1)
    return np.clip(((x - (c - 0.5)) / (w - 1) + 0.5) if w > 1 else (x > c - 0.5).astype(np.float64), 0, 1), \
        f"window center {c:g} width {w:g}"


def _to_u8(unit: np.ndarray) -> np.ndarray:
    return np.clip(np.round(unit * 255.0), 0, 255).astype(np.uint8)


def _minmax(x: np.ndarray) -> np.ndarray:
    lo, hi = float(x.min()), float(x.max())
    return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)


def _grey(x: np.ndarray, ds, frame, r: Recipe, record: dict) -> np.ndarray:
    """Modality-LUT'd grey values -> uint8 H x W x 3 per the recipe."""
    if r.method == "ct_windows":
        chans = [_to_u8((np.clip(x, lo, hi) - lo) / (hi - lo)) for lo, hi in r.windows]
        record["windows_hu"] = [list(w) for w in r.windows]
        out = np.stack(chans, axis=-1)
    else:
        if r.method == "voi":
            unit, record["voi"] = _voi(x, ds, frame)
            if unit is None:
                unit, record["voi"] = _minmax(x), "none in the file: min..max"
            elif r.stretch:
                unit = _minmax(unit)
                record["stretch"] = "min..max"
        elif r.method == "percentile":
            lo, hi = np.percentile(x, r.percentiles)
            unit = np.clip((x - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(x)
            record["percentiles"] = list(r.percentiles)
        else:
            unit = _minmax(x)
        g = _to_u8(unit)
        if record["photometric"] == "MONOCHROME1":  # presentation: after the VOI, high values are dark
            g = 255 - g
            record["inverted"] = True
        out = np.repeat(g[..., None], 3, axis=-1)
    return out


def _colour(arr: np.ndarray, ds, record: dict) -> np.ndarray:
    from pydicom.pixels import apply_color_lut, apply_icc_profile

    pi = record["photometric"]
    if pi == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
        bits = 16 if arr.dtype.itemsize > 1 else 8
    else:
        bits = int(ds.get("BitsStored", 8) or 8)
    if arr.dtype != np.uint8:
        arr = _to_u8(arr.astype(np.float64) / float(2**bits - 1))
    if "ICCProfile" in ds:
        try:
            arr = apply_icc_profile(arr, ds)
            record["icc_profile"] = "applied (to sRGB)"
        except Exception as e:  # noqa: BLE001 - a malformed profile (PyCMSError, OSError...): keep the file's RGB
            record["icc_profile"] = f"not applied ({type(e).__name__})"
    return np.ascontiguousarray(arr, dtype=np.uint8)


def _image(it: _Item, config: DicomConfig) -> DicomImage:
    ds = it.ds
    modality = str(ds.get("Modality", "") or "")
    r = config.recipe(modality)
    pi = str(ds.get("PhotometricInterpretation", "") or "").upper()
    ts = str(ds.file_meta.get("TransferSyntaxUID", "")) if hasattr(ds, "file_meta") else ""
    record = {"modality": modality, "config": config.source, "photometric": pi, "transfer_syntax": ts,
              "bits_stored": int(ds.get("BitsStored", 0) or 0), "signed": bool(ds.get("PixelRepresentation", 0)),
              "frame": it.frame, "frames": it.nframes, "inverted": False}
    arr = _decode(it)
    if arr.ndim == 3 or pi == "PALETTE COLOR":  # colour: pydicom returns RGB for RGB and YBR_* (converted)
        record["method"] = "colour"
        px = _colour(arr, ds, record)
    else:
        x, record["modality_lut"] = _modality_lut(arr, ds, it.frame)
        record["method"] = r.method
        px = _grey(x, ds, it.frame, r, record)
    if r.pad_to_square and px.shape[0] != px.shape[1]:
        px = _pad_square(px)
        record["pad_to_square"] = True
    spacing = ds.get("PixelSpacing") or _functional(ds, it.frame, "PixelMeasuresSequence", "PixelSpacing")
    spacing = (float(spacing[0]), float(spacing[1])) if spacing is not None and len(spacing) == 2 else None
    spacing = spacing if spacing and min(spacing) > 0 else None
    ref = InstanceRef(str(ds.get("StudyInstanceUID", "")), str(ds.get("SeriesInstanceUID", "")),
                      str(ds.get("SOPInstanceUID", "")), str(ds.get("SOPClassUID", "")), modality, it.frame)
    return DicomImage(px, ref, record, spacing)


def _pad_square(px: np.ndarray) -> np.ndarray:
    h, w = px.shape[:2]
    side = max(h, w)
    out = np.zeros((side, side, 3), np.uint8)
    out[(side - h) // 2:(side - h) // 2 + h, (side - w) // 2:(side - w) // 2 + w] = px
    return out
