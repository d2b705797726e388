"""Robust image loading: any PIL-readable file or byte string to an 8-bit RGB image.

Bad inputs never stop training: `load_rgb` converts odd modes (1, L, LA, P, RGBA, I;16, I, F,
CMYK, YCbCr, LAB, HSV) to RGB and raises `BadImageError` for unreadable, truncated or empty
files, which the data sets catch, count and report once through `SkipLog`.
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm")

ImageSource = str | os.PathLike | bytes | BinaryIO


class BadImageError(ValueError):
    """An image that cannot be read or converted to RGB (unreadable, truncated, empty)."""


def _open(source: ImageSource) -> Image.Image:
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise BadImageError("empty byte string (0 bytes)")
        return Image.open(io.BytesIO(bytes(source)))
    if isinstance(source, (str, os.PathLike)) and os.path.getsize(source) == 0:
        raise BadImageError(f"empty file (0 bytes): {source}")
    return Image.open(source)


def _scale_to_uint8(a: np.ndarray, mode: str) -> np.ndarray:
    """Scale single-channel 16-bit, 32-bit int or float data to uint8 by its nominal range."""
    x = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    peak = float(x.max()) if x.size else 0.0
    if mode.startswith("I;16"):
        hi = 65535.0  # 16-bit data: full range, never stretched by content
    elif mode == "F" and peak <= 1.0:
        hi = 1.0
    elif peak <= 255:
        hi = 255.0
    elif peak <= 65535:
        hi = 65535.0  # 32-bit "I" holding 16-bit samples (older Pillow opens 16-bit PNG so)
    else:
        hi = peak
    return (np.clip(x / hi, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def to_rgb(img: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; transparency is composited over `background`."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P" or mode == "PA":
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("LA", "La", "RGBa", "RGBA"):
        rgba = img.convert("RGBA")
        base = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(base, rgba).convert("RGB")
    if mode.startswith("I") or mode.startswith("F"):
        # 16-bit ("I;16", "I;16B", "I;16L"), 32-bit int ("I") and float ("F") single channel.
        gray = _scale_to_uint8(np.asarray(img), mode)
        return Image.fromarray(gray).convert("RGB")
    return img.convert("RGB")  # 1, L, CMYK, YCbCr, LAB, HSV


def load_rgb(
    source: ImageSource,
    background: tuple[int, int, int] = (255, 255, 255),
    exif_transpose: bool = True,
) -> Image.Image:
    """Decode `source` fully and return an 8-bit RGB PIL image, or raise `BadImageError`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL's DecompressionBomb/EXIF chatter
            img = _open(source)
            img.load()  # full decode: truncated files fail here
            if exif_transpose:
                img = ImageOps.exif_transpose(img)
            if img.width == 0 or img.height == 0:
                raise BadImageError(f"image has zero size {img.size}")
            return to_rgb(img, background)
    except BadImageError:
        raise
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ...
        raise BadImageError(f"{type(exc).__name__}: {exc}") from exc


def verify_image(path: str | os.PathLike) -> str | None:
    """Cheap header/CRC check (PIL `verify`); return the reason it is bad, or None if it looks ok."""
    try:
        if os.path.getsize(path) == 0:
            return "empty file (0 bytes)"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as img:
                if img.width == 0 or img.height == 0:
                    return f"zero size {img.size}"
                img.verify()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


class SkipLog:
    """Counts skipped inputs and reports them once (a warning with the count and first names)."""

    def __init__(self, what: str, max_names: int = 5):
        self.what = what
        self.max_names = max_names
        self.count = 0
        self.examples: list[tuple[str, str]] = []
        self._warned_runtime = False

    def add(self, name: str, reason: str) -> None:
        """Count one skipped input (kept quiet; call `report` or rely on `warn_once`)."""
        self.count += 1
        if len(self.examples) < self.max_names:
            self.examples.append((str(name), reason))

    def summary(self) -> str:
        """One line: how many were skipped and the first few names with reasons."""
        shown = "; ".join(f"{Path(n).name if os.sep in n else n} ({r})" for n, r in self.examples)
        more = ", ..." if self.count > len(self.examples) else ""
        return f"skipped {self.count} bad input(s) in {self.what}: {shown}{more}"

    def report(self) -> None:
        """Log the summary as one warning if anything was skipped."""
        if self.count:
            logger.warning(self.summary())

    def warn_once(self, name: str, reason: str) -> None:
        """Count a skip found while training; warn on the first one only (per process)."""
        self.add(name, reason)
        if not self._warned_runtime:
            self._warned_runtime = True
            logger.warning(
                "%s: skipping unreadable input %s (%s); later ones are counted silently "
                "(see the data set's `skipped` attribute)",
                self.what,
                name,
                reason,
            )


EXIF_ORIENTATION = 0x0112
TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)  # rotated by 90 / 270 degrees: width and height swap


def displayed_size(path: str | os.PathLike) -> tuple[int, int]:
    """(height, width) of an image as `load_rgb` will return it (EXIF rotation applied), read from
    the header only; raises `BadImageError` when the header cannot be read."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as img:
                w, h = img.size
                if img.getexif().get(EXIF_ORIENTATION) in TRANSPOSED_ORIENTATIONS:
                    w, h = h, w
    except Exception as exc:
        raise BadImageError(f"{type(exc).__name__}: {exc}") from exc
    if w == 0 or h == 0:
        raise BadImageError(f"image has zero size {(w, h)}")
    return h, w
