"""The sizes an image may have, checked from its header before anything is decoded (PNG, JPEG, DICOM alike).

Memory is bounded by what a file decodes to, not by what it weighs: a 150 KiB PNG can hold 50 megapixels.
"""

from __future__ import annotations

from medc.errors import MedcError

MAX_PIXELS = 50_000_000  # a full-field mammogram is ~22 MP; beyond this an image is a decompression bomb, not a scan
MAX_SIDE = 8192  # pixels on the longest side (mammograms ~4000x5600, panoramic dental ~3000x1500)
MAX_ASPECT = 8  # longest side over shortest (panoramic dental ~2:1, stitched long-leg / whole-spine ~1:4)


class ImageTooLarge(MedcError):
    """An image over MAX_PIXELS, MAX_SIDE or MAX_ASPECT (HTTP 413 in the server)."""


def check_size(width: int, height: int, what: str) -> None:
    """Refuse an image whose size (read from its header) is no medical image's: a decompression bomb."""
    fix = ("If it is a real scan, downscale it first (e.g. to at most 4096 pixels on its longest side), as the model "
           "sees it at its input size anyway.")
    if width * height > MAX_PIXELS:
        raise ImageTooLarge(f"{what} is {width}x{height} pixels ({width * height:,}), over medc's limit of "
                            f"{MAX_PIXELS:,} pixels. {fix}")
    if max(width, height) > MAX_SIDE:
        raise ImageTooLarge(f"{what} is {width}x{height} pixels, over medc's limit of {MAX_SIDE} pixels on a side. "
                            f"{fix}")
    if max(width, height) > MAX_ASPECT * max(1, min(width, height)):
        raise ImageTooLarge(f"{what} is {width}x{height} pixels, more elongated than medc's limit of {MAX_ASPECT}:1. "
                            "Crop it to the region of interest first.")
