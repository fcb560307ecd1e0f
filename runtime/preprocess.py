"""Image preprocessing for the image encoders, read from the checkpoint's preprocessor config.

Matches Hugging Face's PIL image processor (convert to RGB, PIL resize, rescale, normalise) to <= 1e-6, without
transformers. Two medc additions, both recorded in the bundle manifest:
- `pad_to_square`: zero-pad the short side before resizing, as Google evaluates MedSigLIP (keeps aspect ratio);
- high-bit-depth greyscale (16-bit PNG/TIFF, as radiographs are) is scaled to [0, 1] by its bit depth and resized in
  floating point, instead of being clipped to 8 bits as a plain RGB conversion would.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from medc.errors import MedcError

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

        image = load_image(image) if isinstance(image, (str, Path)) else image
        if isinstance(image, np.ndarray):
            image = _array_to_pil(image)
        if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            return self._high_bit_depth(image)
        image = image.convert("RGB")
        if self.pad_to_square:
            image = _pad_square(image)
        image = image.resize((self.width, self.height), resample=Image.Resampling(self.resample))
        x = np.asarray(image, dtype=np.float32)
        return self._finish(x)

    def _high_bit_depth(self, image) -> np.ndarray:
        from PIL import Image

        arr = np.asarray(image)
        bits = 16 if image.mode.startswith("I;16") else max(8, int(np.ceil(np.log2(float(arr.max()) + 1))))
        grey = Image.fromarray(arr.astype(np.float32) / float(2**bits - 1))  # mode "F"
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


def load_image(path: str | Path):
    """Open an image file, turning every failure into a clear MedcError (no patient data in the message)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise MedcError(f"image {path.name!r} not found; check the path.")
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise MedcError(f"image {path.name!r} is corrupt or not an image medc can read ({type(e).__name__}); "
                        "pass a PNG, JPEG or TIFF file.") from None


def _array_to_pil(arr: np.ndarray):
    from PIL import Image

    if arr.dtype == np.uint16 and arr.ndim == 2:
        return Image.fromarray(arr)  # mode "I;16"
    if arr.dtype != np.uint8:
        raise MedcError(f"image array of dtype {arr.dtype}: pass uint8 (H, W[, 3]) or uint16 (H, W) pixels.")
    return Image.fromarray(arr)


def _pad_square(image):
    from PIL import Image

    w, h = image.size
    side = max(w, h)
    if w == h:
        return image
    canvas = Image.new(image.mode, (side, side), 0)
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas
