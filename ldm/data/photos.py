"""Random crops of the photographs bundled with scikit-image: a small real-image data set, offline.

Items follow the CompVis convention: {"image": H x W x 3 float32 in [-1, 1]}, plus the photo's
name and the SDXL micro-conditioning keys (`ldm.data.micro_conditioning`). Training and
validation use disjoint photographs (not only disjoint crops), so validation measures
generalization to images never seen. Grayscale photos are repeated to three channels.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ldm.data.micro_conditioning import MicroConditioning

logger = logging.getLogger(__name__)

__all__ = [
    "PHOTOS",
    "TRAIN_PHOTOS",
    "VALIDATION_PHOTOS",
    "PhotoCrops",
    "PhotoCropsTrain",
    "PhotoCropsValidation",
    "load_photo",
]

#: skimage.data photographs that ship with the package (no download needed).
PHOTOS = (
    "astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry",
    "camera", "moon", "coins", "grass", "gravel", "brick",
)  # fmt: skip
VALIDATION_PHOTOS = ("chelsea", "camera")
TRAIN_PHOTOS = tuple(p for p in PHOTOS if p not in VALIDATION_PHOTOS)


@functools.cache
def load_photo(name: str) -> torch.Tensor:
    """skimage.data.<name>() as a float32 tensor [3, H, W] in [-1, 1]."""
    import skimage.data

    if name not in PHOTOS:
        raise ValueError(f"Unknown photo {name!r}; choose from {PHOTOS}.")
    img = np.asarray(getattr(skimage.data, name)())
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    img = img[..., :3].astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)  # [3, H, W]


class PhotoCrops(Dataset):
    """`length` crops of `size` x `size` from the named photos.

    A crop covers a square of side size / s of the photo (s uniform in `scale`), resized to `size`
    with antialiasing, then flipped horizontally with probability 1/2 (`flip`). With
    `deterministic=True` item i is always the same crop (validation); otherwise crops are drawn
    fresh from numpy's global RNG (seeded per worker by the data module).

    Micro-conditioning: original size = the photo's (h, w); the crop is equivalent to resizing
    the whole photo by size / side and cropping `size` x `size`, so the crop offsets are the
    (top, left) of the crop scaled by size / side (rounded) in that resized grid, with left
    mirrored after a flip (`resized_w - left - size`); target size = (size, size).
    """

    def __init__(
        self,
        photos: Sequence[str] = TRAIN_PHOTOS,
        size: int = 64,
        length: int = 1000,
        scale: Sequence[float] = (0.5, 1.0),
        flip: bool = True,
        deterministic: bool = False,
        seed: int = 0,
    ) -> None:
        if not photos:
            raise ValueError("PhotoCrops needs at least one photo name.")
        self.photos = list(photos)
        self.size = size
        self.length = length
        self.scale = (float(scale[0]), float(scale[1]))
        self.flip = flip
        self.deterministic = deterministic
        self.seed = seed
        self.images = [load_photo(p) for p in self.photos]
        too_small = [p for p, im in zip(self.photos, self.images) if min(im.shape[1:]) < size]
        if too_small:
            raise ValueError(f"Photos {too_small} are smaller than the crop size {size}.")

    def __len__(self) -> int:
        return self.length

    def _rng(self, i: int) -> np.random.Generator | np.random.RandomState:
        return (
            np.random.default_rng((self.seed, i)) if self.deterministic else np.random.mtrand._rand
        )

    def _micro(
        self, h: int, w: int, side: int, top: int, left: int, flipped: bool
    ) -> MicroConditioning:
        f = self.size / side
        resized_h, resized_w = max(self.size, round(h * f)), max(self.size, round(w * f))
        top_r = min(round(top * f), resized_h - self.size)
        left_r = min(round(left * f), resized_w - self.size)
        if flipped:
            left_r = resized_w - left_r - self.size
        return MicroConditioning((h, w), (top_r, left_r), (self.size, self.size))

    def __getitem__(self, i: int) -> dict[str, Any]:
        rng = self._rng(i)
        k = (
            int(rng.integers(len(self.images)))
            if self.deterministic
            else int(rng.randint(len(self.images)))
        )
        img = self.images[k]
        _, h, w = img.shape
        s = rng.uniform(*self.scale)
        side = min(int(round(self.size / s)), h, w)
        top = (
            int(rng.integers(h - side + 1))
            if self.deterministic
            else int(rng.randint(h - side + 1))
        )
        left = (
            int(rng.integers(w - side + 1))
            if self.deterministic
            else int(rng.randint(w - side + 1))
        )
        crop = img[:, top : top + side, left : left + side]  # [3, side, side]
        if side != self.size:
            crop = F.interpolate(
                crop[None],
                size=(self.size, self.size),
                mode="bilinear",
                antialias=True,
                align_corners=False,
            )[0]
        flipped = bool(self.flip and rng.uniform() < 0.5)
        if flipped:
            crop = crop.flip(-1)
        image = crop.clamp(-1.0, 1.0).permute(1, 2, 0).contiguous().numpy()  # [H, W, 3]
        micro = self._micro(h, w, side, top, left, flipped)
        return {"image": image, "photo": self.photos[k], **micro.as_item()}


class PhotoCropsTrain(PhotoCrops):
    """Training crops of the training photos (random each time)."""

    def __init__(self, size: int = 64, length: int = 1000, **kwargs) -> None:
        kwargs.setdefault("photos", TRAIN_PHOTOS)
        super().__init__(size=size, length=length, **kwargs)


class PhotoCropsValidation(PhotoCrops):
    """Fixed crops of the held-out photos, never used for training."""

    def __init__(self, size: int = 64, length: int = 64, **kwargs) -> None:
        kwargs.setdefault("photos", VALIDATION_PHOTOS)
        kwargs.setdefault("deterministic", True)
        kwargs.setdefault("flip", False)
        kwargs.setdefault("scale", (1.0, 1.0))  # native-resolution crops
        kwargs.setdefault("seed", 1234)
        super().__init__(size=size, length=length, **kwargs)
