"""The inpainting mask from the strokes painted in the page (the image editor's layers)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from ldm.ui.errors import UiError


def mask_from_layers(layers: Sequence[Image.Image], size: tuple[int, int]) -> Image.Image:
    """White (repaint) where any layer is painted (alpha > 0), black elsewhere, at ``size``."""
    painted = np.zeros((size[1], size[0]), dtype=bool)
    for layer in layers:
        rgba = layer.convert("RGBA")
        if rgba.size != size:
            rgba = rgba.resize(size, Image.Resampling.NEAREST)
        painted |= np.asarray(rgba)[..., 3] > 0
    if not painted.any():
        raise UiError("Paint over the area to repaint first (the brush of the inpaint tab).")
    return Image.fromarray(painted.astype(np.uint8) * 255, mode="L")


def editor_inputs(value: dict[str, Any] | None, max_bytes: int) -> tuple[Image.Image, Image.Image]:
    """The image editor's value (``background``, ``layers``: file paths) -> (init image, mask),
    each file decoded as an image only."""
    from ldm.ui.safety import decode_upload

    if not value or not value.get("background"):
        raise UiError("inpaint needs an image: upload one (or send one from the gallery).")
    init = decode_upload(value["background"], max_bytes, what="image").convert("RGB")
    layers = [decode_upload(p, max_bytes, what="mask layer") for p in value.get("layers") or []]
    return init, mask_from_layers(layers, init.size)
