"""SDXL micro-conditioning of a training item (Podell et al. 2023, "SDXL", Sec. 2.2).

Three batch keys, as in Stability's generative-models (sgm), each a LongTensor of shape [2]
per item (default collate stacks them to [B, 2]):

- ``original_size_as_tuple``: (height, width) of the image before any resize;
- ``crop_coords_top_left``: (top, left) of the crop in the pixel grid of the resized image
  (short side resized to the target, then cropped), after any horizontal flip;
- ``target_size_as_tuple``: (height, width) of the training crop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ORIGINAL_SIZE_KEY = "original_size_as_tuple"
CROP_COORDS_KEY = "crop_coords_top_left"
TARGET_SIZE_KEY = "target_size_as_tuple"
MICRO_CONDITIONING_KEYS = (ORIGINAL_SIZE_KEY, CROP_COORDS_KEY, TARGET_SIZE_KEY)


@dataclass(frozen=True)
class MicroConditioning:
    """Original size (h, w), crop offsets (top, left) in the resized grid, target size (h, w)."""

    original_size: tuple[int, int]
    crop_coords_top_left: tuple[int, int]
    target_size: tuple[int, int]

    def __post_init__(self) -> None:
        for name in ("original_size", "crop_coords_top_left", "target_size"):
            value = getattr(self, name)
            if len(value) != 2:
                raise ValueError(f"{name} must be a pair of ints, got {value!r}")
            if min(value) < 0:
                raise ValueError(f"{name} must be non-negative, got {value!r}")

    @classmethod
    def uncropped(cls, height: int, width: int) -> MicroConditioning:
        """An image used as it is: original = target = (height, width), crop (0, 0)."""
        return cls((int(height), int(width)), (0, 0), (int(height), int(width)))

    def as_item(self) -> dict[str, torch.Tensor]:
        """The three sgm batch keys, each a LongTensor of shape [2]."""
        return {
            ORIGINAL_SIZE_KEY: torch.tensor(self.original_size, dtype=torch.long),
            CROP_COORDS_KEY: torch.tensor(self.crop_coords_top_left, dtype=torch.long),
            TARGET_SIZE_KEY: torch.tensor(self.target_size, dtype=torch.long),
        }
