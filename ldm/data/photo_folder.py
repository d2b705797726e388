"""A folder of mixed-aspect photographs with captions, cut from scikit-image's bundled photos.

For trying aspect-ratio buckets and the latent cache on real images without a download:
``write_photo_folder(out)`` writes PNG crops of each photo at several aspect ratios (square,
portrait, landscape) and sizes, with a sidecar ``.txt`` caption ("a photo of a cat, portrait").
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image

from ldm.data.photos import PHOTOS, load_photo

logger = logging.getLogger(__name__)

#: (height, width) ratios of the crops: square, portrait and landscape
ASPECTS = ((1, 1), (4, 3), (3, 4), (16, 9), (9, 16), (3, 2), (2, 3))
SUBJECTS = {
    "astronaut": "an astronaut",
    "coffee": "a cup of coffee",
    "chelsea": "a cat",
    "rocket": "a rocket",
    "hubble_deep_field": "galaxies in deep space",
    "immunohistochemistry": "stained tissue under a microscope",
    "camera": "a man with a camera",
    "moon": "the surface of the moon",
    "coins": "old coins",
    "grass": "grass",
    "gravel": "gravel",
    "brick": "a brick wall",
}


def _orientation(h: int, w: int) -> str:
    return "square" if h == w else ("portrait" if h > w else "landscape")


def write_photo_folder(
    out: str | os.PathLike,
    photos: tuple[str, ...] = PHOTOS,
    aspects: tuple[tuple[int, int], ...] = ASPECTS,
    seed: int = 0,
) -> list[Path]:
    """One crop per (photo, aspect): the largest crop of that aspect at a random place, written as
    ``<photo>-<h>x<w>.png`` with a ``.txt`` caption. Returns the image paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for name in photos:
        image = ((load_photo(name).permute(1, 2, 0).numpy() + 1.0) * 127.5).round()
        image = image.clip(0, 255).astype(np.uint8)
        full_h, full_w = image.shape[:2]
        for ah, aw in aspects:
            scale = min(full_h / ah, full_w / aw) * rng.uniform(0.6, 1.0)
            h, w = max(8, int(ah * scale)), max(8, int(aw * scale))
            top = int(rng.integers(0, full_h - h + 1))
            left = int(rng.integers(0, full_w - w + 1))
            path = out / f"{name}-{h}x{w}.png"
            Image.fromarray(image[top : top + h, left : left + w]).save(path)
            caption = f"a photo of {SUBJECTS.get(name, name)}, {_orientation(h, w)}"
            path.with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")
            paths.append(path)
    logger.info("wrote %d photos to %s", len(paths), out)
    return paths
