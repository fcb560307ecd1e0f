"""Image preprocessing for the image encoders, read from the checkpoint's preprocessor config.

Matches Hugging Face's PIL image processor (convert to RGB, PIL resize, rescale, normalise) to <= 1e-6, without
transformers. Two medc additions, both recorded in the bundle manifest:
- `pad_to_square`: zero-pad the short side before resizing, as Google evaluates MedSigLIP (keeps aspect ratio);
- high-bit-depth greyscale (16-bit PNG/TIFF, as radiographs are) is scaled to [0, 1] by its bit depth and resized in
  floating point, instead of being clipped to 8 bits as a plain RGB conversion would.

Memory is bounded by what a file decodes to, not by what it weighs: a 150 KiB PNG can hold 50 megapixels. Files are
checked against the limits of runtime/imagelimits.py from their header, before decoding. An image up to
`EXACT_SIDE` pixels on its longest side is preprocessed exactly as HF's processor does; a larger one is first shrunk
by an integer factor (JPEG: decoded at 1/2, 1/4 or 1/8 scale, `draft`; otherwise a box filter, `reduce`) to no less
than `REDUCE_GAP` times the model's input, and only then padded and resized, so `pad_to_square` never builds a square
canvas at full resolution. Greyscale stays one channel until the end (resizing and zero-padding act on each channel
alone, so this equals converting to RGB first, bit for bit).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from medc.errors import MedcError
from medc.runtime.dicom import DicomImage, is_dicom, read_dicom
from medc.runtime.imagelimits import MAX_PIXELS, ImageTooLarge, check_size

EXACT_SIDE = 4096  # up to this, preprocessing is Hugging Face's to the bit; beyond, images are reduced first
REDUCE_GAP = 3  # a reduced image keeps at least this many pixels per model input pixel (as Pillow's reducing_gap)
_HIGH_BIT = ("I;16", "I;16B", "I;16L", "I", "F")

# PIL's resampling filter ids, as stored in preprocessor_config.json ("resample": 2).
_RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


@dataclass(frozen=True)
class ImagePreprocessing:
    height: int
    width: int
    resample: int = 2  # PIL.Image.BILINEAR
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    pad_to_square: bool = False

    @classmethod
    def from_hf_config(cls, cfg: dict, pad_to_square: bool = False) -> "ImagePreprocessing":
        """From a Hugging Face `preprocessor_config.json` dict."""
        size = cfg.get("size", {})
        if "height" not in size or "width" not in size:
            raise MedcError(f"preprocessor config has size {size!r}; medc needs a fixed {{'height', 'width'}}.")
        return cls(
            height=int(size["height"]), width=int(size["width"]), resample=int(cfg.get("resample", 2)),
            do_rescale=bool(cfg.get("do_rescale", True)), rescale_factor=float(cfg.get("rescale_factor", 1 / 255)),
            do_normalize=bool(cfg.get("do_normalize", True)),
            image_mean=tuple(float(v) for v in cfg.get("image_mean", (0.5, 0.5, 0.5))),
            image_std=tuple(float(v) for v in cfg.get("image_std", (0.5, 0.5, 0.5))),
            pad_to_square=pad_to_square,
        )

    def to_json(self) -> dict:
        d = asdict(self)
        d["resample_name"] = _RESAMPLE_NAMES.get(self.resample, str(self.resample))
        return d

    @classmethod
    def from_json(cls, d: dict) -> "ImagePreprocessing":
        d = {k: v for k, v in d.items() if k != "resample_name"}
        d["image_mean"], d["image_std"] = tuple(d["image_mean"]), tuple(d["image_std"])
        return cls(**d)

    # -- the work --------------------------------------------------------------------------------------------------
    def __call__(self, images) -> np.ndarray:
        """Images (paths, PIL images or HxW / HxWxC uint8/uint16 arrays) -> float32 [N, 3, H, W]."""
        return np.stack([self.one(im) for im in images]).astype(np.float32)

    def one(self, image) -> np.ndarray:
        from PIL import Image

        image = load_image(image, self) if isinstance(image, (str, Path)) else image
        if isinstance(image, DicomImage):  # already 8-bit RGB, windowed by its modality's recipe
            image = image.pixels
        if isinstance(image, np.ndarray):
            image = _array_to_pil(image)
        if image.mode in _HIGH_BIT:
            return self._high_bit_depth(image)
        if image.mode not in ("L", "RGB"):  # palette, alpha, CMYK ...: to RGB first, as HF does (resizing them differs)
            image = image.convert("RGB")
        factor = self.reduction(*image.size)
        if factor > 1:
            image = image.reduce(factor)
        if self.pad_to_square:
            image = _pad_square(image)
        image = image.resize((self.width, self.height), resample=Image.Resampling(self.resample))
        x = np.asarray(image, dtype=np.float32)
        if x.ndim == 2:  # greyscale, kept one channel until now: the same numbers as converting it to RGB first
            x = np.repeat(x[..., None], 3, axis=-1)
        return self._finish(x)

    def reduction(self, width: int, height: int) -> int:
        """The integer factor to shrink an image of this size by before padding and resizing: 1 up to EXACT_SIDE
        (exactly HF's preprocessing), else as much as keeps REDUCE_GAP source pixels per input pixel."""
        if max(width, height) <= EXACT_SIDE:
            return 1
        if self.pad_to_square:  # the square's side becomes the input's
            return max(1, max(width, height) // (REDUCE_GAP * max(self.width, self.height)))
        return max(1, min(width // (REDUCE_GAP * self.width), height // (REDUCE_GAP * self.height)))

    def draft(self, image) -> None:
        """Before an opened JPEG is decoded: decode it at 1/2, 1/4 or 1/8 scale when `reduction` would shrink it."""
        factor = self.reduction(*image.size)
        if factor > 1 and image.format == "JPEG":
            image.draft(image.mode, (image.width // factor, image.height // factor))

    def _high_bit_depth(self, image) -> np.ndarray:
        from PIL import Image

        arr = np.asarray(image)
        bits = 16 if image.mode.startswith("I;16") else max(8, int(np.ceil(np.log2(float(arr.max()) + 1))))
        factor = self.reduction(*image.size)
        if factor > 1:
            x = _box_reduce(arr, factor)
        else:
            x = arr.astype(np.float32)
        x /= float(2**bits - 1)
        grey = Image.fromarray(x)  # mode "F"
        if self.pad_to_square:
            grey = _pad_square(grey)
        grey = grey.resize((self.width, self.height), resample=Image.Resampling(self.resample))
        x = np.repeat(np.asarray(grey, dtype=np.float32)[..., None], 3, axis=-1)
        # Already in [0, 1]: express it on the 8-bit scale the rescale factor expects.
        return self._finish(x / self.rescale_factor if self.do_rescale else x)

    def _finish(self, hwc: np.ndarray) -> np.ndarray:
        x = hwc
        if self.do_rescale:
            x = x * np.float32(self.rescale_factor)
        if self.do_normalize:
            x = (x - np.asarray(self.image_mean, np.float32)) / np.asarray(self.image_std, np.float32)
        return np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)


def open_image(source, what: str, prep: ImagePreprocessing | None = None, formats=None):
    """A file path or file object -> a decoded PIL image, its size checked from the header before decoding and, with
    `prep`, a large JPEG decoded at reduced scale. Raises ImageTooLarge, or ValueError/OSError for what is not a
    readable image (the caller words it)."""
    import warnings

    from PIL import Image

    with warnings.catch_warnings():
        # Pillow warns from 89 MP and refuses from 179 MP (DecompressionBombError); medc's own limits are lower.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(source, formats=formats)
        except Image.DecompressionBombError:
            raise ImageTooLarge(f"{what} is over {2 * Image.MAX_IMAGE_PIXELS:,} pixels, over medc's limit of "
                                f"{MAX_PIXELS:,} pixels: a decompression bomb, or a scan to downscale first "
                                "(e.g. to at most 4096 pixels on its longest side).") from None
        check_size(im.width, im.height, what)
        if prep is not None:
            prep.draft(im)
        im.load()  # decodes now: a truncated file fails here, not later
    return im


def load_image(path: str | Path, prep: ImagePreprocessing | None = None):
    """Open an image file, turning every failure into a clear MedcError (no patient data in the message)."""
    from PIL import UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise MedcError(f"image {path.name!r} not found; check the path.")
    if is_dicom_file(path):  # its middle frame, by the built-in recipe (runtime/dicom.py)
        return _array_to_pil(read_dicom(path)[0].pixels)
    try:
        with open(path, "rb") as f:  # medc's handle, not Pillow's: the loaded image stays usable after it closes
            return open_image(f, f"image {path.name!r}", prep)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as e:
        raise MedcError(f"image {path.name!r} is corrupt or not an image medc can read ({type(e).__name__}); "
                        "pass a PNG, JPEG or TIFF file.") from None


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def is_dicom_file(path: Path) -> bool:
    """A .dcm/.dicom file, or any file with the DICOM Part 10 marker ('DICM' at byte 128)."""
    return path.suffix.lower() in (".dcm", ".dicom") or is_dicom(path)


def image_files(folder: Path) -> list[Path]:
    """The images of a folder (calibration): PNG, JPEG and DICOM files (each DICOM file its middle frame)."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and not p.name.startswith(".") and (
        p.suffix.lower() in IMAGE_SUFFIXES or is_dicom_file(p)))


def _array_to_pil(arr: np.ndarray):
    from PIL import Image

    if arr.dtype == np.uint16 and arr.ndim == 2:
        return Image.fromarray(arr)  # mode "I;16"
    if arr.dtype != np.uint8:
        raise MedcError(f"image array of dtype {arr.dtype}: pass uint8 (H, W[, 3]) or uint16 (H, W) pixels.")
    return Image.fromarray(arr)


def _box_reduce(arr: np.ndarray, factor: int, rows: int = 256) -> np.ndarray:
    """Mean of each factor x factor block of a 2-D array -> float32, a band of rows at a time (no full-size float
    copy); a remainder of under `factor` pixels at the right and bottom edges is left out."""
    h, w = arr.shape[0] // factor, arr.shape[1] // factor
    out = np.empty((h, w), np.float32)
    step = max(1, rows // factor)
    for i in range(0, h, step):
        band = arr[i * factor:(i + step) * factor, :w * factor].astype(np.float32)
        out[i:i + step] = band.reshape(-1, factor, w, factor).mean(axis=(1, 3), dtype=np.float32)
    return out


def _pad_square(image):
    from PIL import Image

    w, h = image.size
    side = max(w, h)
    if w == h:
        return image
    canvas = Image.new(image.mode, (side, side), 0)
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas
