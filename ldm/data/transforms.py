"""Image transforms for data items: resize the shorter side, crop, flip, and map to [-1, 1].

The output follows the CompVis data-item convention: H x W x C float32 numpy in [-1, 1]
(LatentDiffusion.get_input rearranges it to B x C x H x W). `ImageTransform.apply` also reports
the SDXL micro-conditioning (original size, crop offsets, target size) of what it did.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from ldm.data.micro_conditioning import MicroConditioning

INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "area": Image.Resampling.BOX,
}
CROPS = ("center", "random", "none")


def to_float_array(img: Image.Image) -> np.ndarray:
    """RGB PIL image -> H x W x 3 float32 in [-1, 1] (x / 127.5 - 1, as CompVis)."""
    return (np.asarray(img.convert("RGB"), dtype=np.float32) / 127.5 - 1.0).astype(np.float32)


def to_pil(array: np.ndarray) -> Image.Image:
    """H x W x 3 float in [-1, 1] -> RGB PIL image (inverse of `to_float_array`)."""
    a = np.clip((np.asarray(array, dtype=np.float32) + 1.0) * 127.5 + 0.5, 0, 255)
    return Image.fromarray(a.astype(np.uint8))


@dataclass(frozen=True)
class TransformedImage:
    """A transformed image and the SDXL micro-conditioning of the transform that produced it."""

    image: np.ndarray  # H x W x 3 float32 in [-1, 1]
    micro: MicroConditioning


class ImageTransform:
    """Resize the shorter side to `size`, crop `size` x `size` (center/random/none), optional flip."""

    def __init__(
        self,
        size: int | None = 256,
        crop: str = "center",
        flip: bool | float = False,
        interpolation: str = "bicubic",
    ):
        if crop not in CROPS:
            raise ValueError(f"crop must be one of {CROPS}, got {crop!r}")
        if interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"interpolation must be one of {sorted(INTERPOLATIONS)}, got {interpolation!r}"
            )
        self.size = None if size is None else int(size)
        self.crop = crop
        self.flip_p = 0.5 if flip is True else float(flip or 0.0)
        self.interpolation = INTERPOLATIONS[interpolation]

    @property
    def deterministic(self) -> bool:
        """True when the same input always gives the same output (safe to cache encodings)."""
        return self.crop != "random" and self.flip_p == 0.0

    def __call__(self, img: Image.Image, rng: random.Random | None = None) -> np.ndarray:
        """Transform an RGB PIL image into an H x W x 3 float32 array in [-1, 1]."""
        return self.apply(img, rng).image

    def apply(
        self,
        img: Image.Image,
        rng: random.Random | None = None,
        target: tuple[int, int] | None = None,
        flip: bool | None = None,
    ) -> TransformedImage:
        """Transform `img` and report its micro-conditioning, as sgm / diffusers' SDXL scripts do.

        Original size: (h, w) of `img`. Crop offsets: (top, left) of the crop in the resized
        image's pixel grid; after a horizontal flip, left becomes `resized_w - left - target_w`
        (the crop's offset in the flipped resized image, as in diffusers'
        train_text_to_image_sdxl). Target size: (h, w) of the output. Draws from `rng` exactly
        as `__call__` always has (crop left, crop top, then flip). `target` (h, w): resize to
        cover it and crop to it (aspect-ratio buckets); `flip`: force the flip on or off.
        """
        rng = rng or random  # DataLoader reseeds `random` in every worker
        if target is not None:
            return self._apply_bucket(img, rng, target, flip)
        original = (img.height, img.width)
        top = left = 0
        if self.size is not None:
            w, h = img.size
            scale = self.size / min(w, h)
            if scale != 1.0:
                new = (max(self.size, round(w * scale)), max(self.size, round(h * scale)))
                img = img.resize(new, resample=self.interpolation)
        resized_w = img.width
        if self.size is not None and self.crop != "none":
            w, h = img.size
            if self.crop == "random":
                left, top = rng.randint(0, w - self.size), rng.randint(0, h - self.size)
            else:
                left, top = (w - self.size) // 2, (h - self.size) // 2
            img = img.crop((left, top, left + self.size, top + self.size))
        if flip is None:
            flip = self.flip_p > 0 and rng.random() < self.flip_p
        if flip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            left = resized_w - left - img.width
        micro = MicroConditioning(original, (top, left), (img.height, img.width))
        return TransformedImage(to_float_array(img), micro)

    def _apply_bucket(
        self, img: Image.Image, rng: Any, target: tuple[int, int], flip: bool | None
    ) -> TransformedImage:
        """Resize `img` to cover `target` (h, w) keeping its aspect, crop to it (center or random,
        as `crop`; 'none' means center here), then flip (`flip`: decided by the caller; None: with
        probability `flip_p` from `rng`). Micro-conditioning as in `apply`."""
        th, tw = (int(v) for v in target)
        original = (img.height, img.width)
        scale = max(th / img.height, tw / img.width)
        new = (max(tw, round(img.width * scale)), max(th, round(img.height * scale)))
        if new != img.size:
            img = img.resize(new, resample=self.interpolation)
        w, h = img.size
        if self.crop == "random":
            left, top = rng.randint(0, w - tw), rng.randint(0, h - th)
        else:
            left, top = (w - tw) // 2, (h - th) // 2
        img = img.crop((left, top, left + tw, top + th))
        if flip is None:
            flip = self.flip_p > 0 and rng.random() < self.flip_p
        if flip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            left = w - left - tw
        micro = MicroConditioning(original, (top, left), (th, tw))
        return TransformedImage(to_float_array(img), micro)
