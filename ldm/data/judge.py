"""Judge: read colour, shape, size and position back from a captioned-shapes image.

Classical analysis by synthesis. Foreground = largest connected blob of the brightest channel
(above half its peak), dilated over its rim; coverage = brightness relative to the blob's peak.
From centroid and area, each shape template (circle/square/triangle, same area and centroid,
blurred by a few candidate sigmas to match blurry generated images) is rendered; the least
squared error picks the shape and the fitted radius gives the size. Position: the nearest grid
line to the shape's anchor; colour: the coverage-weighted mean colour, normalised by its
brightest channel, nearest palette entry. An image without a blob gives "none" everywhere.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from ldm.data import shapes as S

ATTRIBUTES = ("colour", "shape", "size", "position")
NONE = "none"
EMPTY_PEAK = 0.2  # an image whose brightest channel never exceeds this (0..1) is empty
FLOOR = 0.08  # background level (relative to the shape's peak) subtracted from coverage
BLURS = (0.0, 0.5, 0.8, 1.1, 1.5)  # Gaussian sigmas (pixels) tried for blurry (generated) images
RIM = 2  # pixels around the blob that still belong to it (anti-aliasing and blur)
MIN_AREA_FRACTION = 3.0 / 1024  # below ~3 px at 32x32 the image counts as empty
_PALETTE_NAMES = list(S.PALETTE)  # the training colours and purple (personalisation examples)
_PALETTE = np.asarray([S.PALETTE[c] for c in _PALETTE_NAMES], dtype=np.float64) / 255.0


def to_unit_batch(images: Any) -> np.ndarray:
    """Images -> float64 N x H x W x 3 in [0, 1].

    Accepts a torch tensor (B x C x H x W or C x H x W, float in [-1, 1] or uint8), a numpy array
    (H x W x 3 or N x H x W x 3; uint8 in [0, 255] or float in [-1, 1]), or a list of those.
    """
    if isinstance(images, (list, tuple)):
        return np.concatenate([to_unit_batch(im) for im in images], axis=0)
    if hasattr(images, "detach"):  # torch.Tensor, channels first
        t = images.detach().cpu()
        if t.ndim == 3:
            t = t[None]
        if t.ndim != 4 or t.shape[1] not in (1, 3):
            raise ValueError(
                f"expected a B x C x H x W tensor with C in (1, 3), got {tuple(t.shape)}"
            )
        t = t.expand(-1, 3, -1, -1) if t.shape[1] == 1 else t
        is_uint8 = str(t.dtype) == "torch.uint8"
        a = t.float().permute(0, 2, 3, 1).numpy().astype(np.float64)  # B x H x W x C
        return a / 255.0 if is_uint8 else np.clip((a + 1.0) / 2.0, 0.0, 1.0)
    a = np.asarray(images)
    if a.ndim == 3:
        a = a[None]
    if a.ndim != 4 or a.shape[-1] not in (1, 3):
        raise ValueError(f"expected H x W x 3 or N x H x W x 3 images, got shape {a.shape}")
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    if a.dtype == np.uint8:
        return a.astype(np.float64) / 255.0
    return np.clip((a.astype(np.float64) + 1.0) / 2.0, 0.0, 1.0)


def _peak(value: np.ndarray) -> float:
    """Robust brightest level: mean of the 3 largest values (one hot pixel does not count)."""
    flat = value.reshape(-1)
    return (
        float(np.partition(flat, flat.size - 3)[-3:].mean())
        if flat.size >= 3
        else float(flat.max())
    )


def _coverage(value: np.ndarray, peak: float) -> np.ndarray:
    """Brightest channel (0..1) -> shape coverage: `peak` -> 1, a floor (relative) -> 0."""
    return np.clip((value / max(peak, 1e-6) - FLOOR) / (1.0 - FLOOR), 0.0, 1.0)


def _main_blob(value: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(coverage, region) of the largest bright blob; region = blob dilated over its blurred rim.

    Brightness is relative to the blob's own peak, so dim (or over-bright) shapes measure the same.
    """
    empty = np.zeros_like(value), np.zeros(value.shape, dtype=bool)
    peak = _peak(value)
    if peak < EMPTY_PEAK:
        return empty
    labels, n = ndimage.label(value > 0.5 * peak)
    if n == 0:
        return empty
    sizes = ndimage.sum(value, labels, index=np.arange(1, n + 1))
    blob = labels == (1 + int(np.argmax(sizes)))
    region = ndimage.binary_dilation(blob, iterations=RIM)
    return _coverage(value, _peak(value[blob])) * region, region


def _render(shape: str, cx: float, cy: float, r: float, size: int) -> np.ndarray:
    """Sharp coverage of `shape` whose centroid is (cx, cy) and radius r."""
    ay = cy - 0.25 * S.TRIANGLE_R * r if shape == "triangle" else cy  # centroid -> bbox centre
    return S.coverage(shape, cx, ay, r, size, supersample=4)


@functools.lru_cache(maxsize=64)
def _blur_matrix(n: int, sigma: float) -> np.ndarray:
    """n x n Gaussian blur operator (zero padding): blurred = G @ image @ G.T."""
    d = np.arange(n)[:, None] - np.arange(n)[None, :]
    g = np.exp(-0.5 * (d / sigma) ** 2)
    return g / g.sum(axis=1, keepdims=True).max()  # unit mass away from the border


def _observe(sharp: np.ndarray, sigma: float, region: np.ndarray) -> np.ndarray:
    """What the judge would measure for a sharp coverage blurred by sigma (same floor, region)."""
    if sigma > 0:
        sharp = _blur_matrix(sharp.shape[0], sigma) @ sharp @ _blur_matrix(sharp.shape[1], sigma).T
    return _coverage(sharp, _peak(sharp)) * region


def _fit(obs: np.ndarray, region: np.ndarray, cx: float, cy: float) -> tuple[str, float, float]:
    """Best (shape, radius, squared error) over shapes and blur levels, area-matched templates."""
    size, area = obs.shape[0], float(obs.sum())
    best = ("", 0.0, math.inf)
    for shape in S.SHAPES:
        r0 = math.sqrt(area / S.AREA_PER_R2[shape])
        sharp0 = _render(shape, cx, cy, r0, size)
        for sigma in BLURS:
            t_area = float(_observe(sharp0, sigma, region).sum())
            r = r0 * math.sqrt(area / max(t_area, 1e-6))  # one secant step: area ~ r^2
            sharp = sharp0 if abs(r - r0) < 0.02 else _render(shape, cx, cy, r, size)
            err = float(((_observe(sharp, sigma, region) - obs) ** 2).sum())
            if err < best[2]:
                best = (shape, r, err)
    return best


def judge_image(image: np.ndarray) -> dict[str, str]:
    """Attributes of one H x W x 3 image in [0, 1]; "none" for every attribute if it is empty."""
    size = image.shape[0]
    if image.shape[1] != size:
        raise ValueError(f"the judge needs square images, got {image.shape[0]}x{image.shape[1]}")
    obs, region = _main_blob(image.max(axis=-1))
    area = float(obs.sum())
    if area < MIN_AREA_FRACTION * size * image.shape[1]:
        return {k: NONE for k in ATTRIBUTES}
    ys, xs = np.mgrid[0 : image.shape[0], 0 : image.shape[1]] + 0.5  # pixel centres
    cx, cy = float((obs * xs).sum() / area), float((obs * ys).sum() / area)
    shape, r, _ = _fit(obs, region, cx, cy)
    ay = cy - 0.25 * S.TRIANGLE_R * r if shape == "triangle" else cy

    col = int(np.argmin([abs(cx / image.shape[1] - g) for g in S.GRID]))
    row = int(np.argmin([abs(ay / size - g) for g in S.GRID]))
    size_name = "large" if r / size > S.SIZE_THRESHOLD else "small"

    w = obs**2
    mean = (image * w[..., None]).sum(axis=(0, 1)) / w.sum()
    chroma = mean / max(float(mean.max()), 1e-6)
    colour = _PALETTE_NAMES[int(np.argmin(((_PALETTE - chroma) ** 2).sum(axis=1)))]
    return {
        "colour": colour,
        "shape": shape,
        "size": size_name,
        "position": S.POSITIONS[row * 3 + col],
    }


def judge(images: Any) -> list[dict[str, str]]:
    """Attribute dicts for a batch of images (any format `to_unit_batch` accepts)."""
    return [judge_image(im) for im in to_unit_batch(images)]


def score(images: Any, targets: Sequence[str | dict[str, str]]) -> dict[str, float]:
    """Per-attribute accuracy and whole-caption accuracy ("caption") of images against targets.

    `targets` are captions ("a large red circle in the top left") or attribute dicts.
    """
    preds = judge(images)
    if len(preds) != len(targets):
        raise ValueError(f"got {len(preds)} images but {len(targets)} captions/attribute dicts")
    if not preds:
        raise ValueError("score needs at least one image")
    truth = [S.parse_caption(t) if isinstance(t, str) else t for t in targets]
    hits = {k: [p[k] == t[k] for p, t in zip(preds, truth)] for k in ATTRIBUTES}
    result = {k: float(np.mean(v)) for k, v in hits.items()}
    result["caption"] = float(np.mean([all(h) for h in zip(*hits.values())]))
    result["n"] = float(len(preds))
    return result
