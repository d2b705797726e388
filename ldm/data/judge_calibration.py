"""Constructed failures for calibrating the judge's form criterion (`judge.best_iou`).

Each function draws, for one caption's geometry (`shapes.sample_attributes` output: colour,
shape, size, position and jittered cx, cy, r in pixels), an image that a reader would call wrong
although colour, size and position are right: the shape doubled into two touching copies, a
square with concave (inward-bowed) sides, or another shape in its place. Images are uint8
H x W x 3, anti-aliased like the data set's own (`shapes.render`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from ldm.data import shapes as S

FAILURES = ("doubled", "doubled_same_area", "concave_square", "wrong_shape")
#: half extent (in units of r) of each shape along x and y: where a touching copy starts
_HALF_EXTENT = {
    "circle": (1.0, 1.0),
    "square": (S.SQUARE_HALF, S.SQUARE_HALF),
    "triangle": (math.sqrt(3) / 2 * S.TRIANGLE_R, 0.75 * S.TRIANGLE_R),
}


def _paint(cov: np.ndarray, colour: str) -> np.ndarray:
    """Coverage H x W -> uint8 image in the palette colour (as `shapes.render`)."""
    rgb = np.asarray(S.PALETTE[colour], dtype=np.float64)
    return np.round(np.clip(cov, 0.0, 1.0)[..., None] * rgb).astype(np.uint8)


def _supersampled(
    inside: Callable[[np.ndarray, np.ndarray], np.ndarray], size: int, ss: int = 4
) -> np.ndarray:
    """Coverage of the region `inside(x, y)` (pixel coordinates), ss x ss samples per pixel."""
    c = (np.arange(size * ss) + 0.5) / ss
    x, y = np.meshgrid(c, c)  # [size*ss, size*ss]
    # [H*ss, W*ss] -> [H, ss, W, ss] -> mean over the sub-samples of each pixel
    return inside(x, y).reshape(size, ss, size, ss).mean(axis=(1, 3))


def doubled(attrs: dict[str, Any], size: int = 32, scale: float = 1.0, axis: int = 0) -> np.ndarray:
    """Two touching copies (radius `scale` * r) side by side (axis 0) or stacked (axis 1), their
    pair centred on the caption's anchor. scale 1/sqrt(2) keeps the total area of one shape."""
    r = attrs["r"] * scale
    d = _HALF_EXTENT[attrs["shape"]][axis] * r  # half the distance between the copies' anchors
    dx, dy = (d, 0.0) if axis == 0 else (0.0, d)
    cov = sum(
        S.coverage(attrs["shape"], attrs["cx"] + s * dx, attrs["cy"] + s * dy, r, size)
        for s in (-1.0, 1.0)
    )
    return _paint(cov, attrs["colour"])


def concave_square(attrs: dict[str, Any], size: int = 32, depth: float = 0.25) -> np.ndarray:
    """The caption's square with each side bowed inwards by `depth` x its half side at the middle
    (parabolic sides, corners kept): what the default run drew for some squares."""
    a = S.SQUARE_HALF * attrs["r"]
    cx, cy = attrs["cx"], attrs["cy"]

    def inside(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        u, v = (x - cx) / a, (y - cy) / a  # unit square coordinates
        bx = 1.0 - depth * (1.0 - np.minimum(v * v, 1.0))  # |u| bound, shrinks mid-side
        by = 1.0 - depth * (1.0 - np.minimum(u * u, 1.0))
        return (np.abs(u) <= bx) & (np.abs(v) <= by)

    return _paint(_supersampled(inside, size), attrs["colour"])


def wrong_shape(attrs: dict[str, Any], shape: str, size: int = 32) -> np.ndarray:
    """Another shape (same colour, size and jittered position) in place of the caption's."""
    return S.render({**attrs, "shape": shape}, size)


def failure_images(
    attrs: dict[str, Any], size: int = 32, depth: float = 0.25
) -> dict[str, list[np.ndarray]]:
    """Every constructed failure of one caption: {kind: images} (concave only for squares)."""
    out: dict[str, list[np.ndarray]] = {
        "doubled": [doubled(attrs, size, 1.0, axis) for axis in (0, 1)],
        "doubled_same_area": [doubled(attrs, size, 1 / math.sqrt(2), axis) for axis in (0, 1)],
        "wrong_shape": [wrong_shape(attrs, s, size) for s in S.SHAPES if s != attrs["shape"]],
    }
    if attrs["shape"] == "square":
        out["concave_square"] = [concave_square(attrs, size, depth)]
    return out
