"""Aspect-ratio buckets (NovelAI's scheme, as kohya sd-scripts builds them).

Buckets are (height, width) pairs with sides in multiples of ``step`` pixels and an area of at
most ``resolution**2``: for every width from ``min_side`` to ``max_side`` the tallest height that
keeps the area within the limit, both orientations, and the square. An image goes to the bucket
whose aspect ratio (w / h) is nearest to its own (ties: the larger bucket), is resized so that
it covers the bucket, and is cropped to it: at most a few pixels of one side are lost, instead
of the whole excess of a square crop.

Without ``upscale`` an image smaller than its bucket keeps its pixels: its own bucket is its size
rounded down to multiples of ``step`` (aspect kept), as sd-scripts does with ``bucket_no_upscale``.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

Size = tuple[int, int]  # (height, width)


def _down(value: int, step: int) -> int:
    return value // step * step


def make_buckets(
    resolution: int | Sequence[int] = 512,
    step: int = 64,
    min_side: int | None = None,
    max_side: int | None = None,
) -> list[Size]:
    """All bucket sizes (h, w), sorted by aspect ratio w / h.

    ``resolution``: the side of the square whose area bounds the buckets (or (h, w) of that
    area). ``min_side`` / ``max_side``: limits of either side (default resolution / 2 and
    resolution * 2, rounded to ``step``).
    """
    if isinstance(resolution, int):
        area = resolution * resolution
        base = resolution
    else:
        h, w = (int(v) for v in resolution)
        area, base = h * w, math.isqrt(h * w)
    if step < 1:
        raise ValueError(f"bucket step must be a positive number of pixels, got {step}")
    if base < step:
        raise ValueError(f"bucket resolution {resolution} is smaller than the step {step}")
    min_side = max(step, _down(base // 2, step)) if min_side is None else int(min_side)
    max_side = _down(base * 2, step) if max_side is None else int(max_side)
    if min_side % step or max_side % step or not 0 < min_side <= max_side:
        raise ValueError(
            f"bucket sides: need step <= min_side <= max_side, both multiples of {step}; "
            f"got min_side={min_side}, max_side={max_side}"
        )
    buckets: set[Size] = set()
    square = _down(math.isqrt(area), step)
    if min_side <= square <= max_side:
        buckets.add((square, square))
    for w in range(min_side, max_side + 1, step):
        h = min(max_side, _down(area // w, step))
        if h >= min_side:
            buckets.add((h, w))
            buckets.add((w, h))
    if not buckets:
        raise ValueError(
            f"no bucket of area <= {area} with sides in [{min_side}, {max_side}] (step {step})"
        )
    # no two buckets share an aspect ratio (each width has one height, the tallest that fits),
    # so the ratio alone orders them
    return sorted(buckets, key=lambda b: b[1] / b[0])


def nearest_bucket(size: Size, buckets: Sequence[Size]) -> Size:
    """The bucket whose aspect ratio w / h is nearest to that of ``size`` (h, w), in log scale."""
    h, w = size
    ratio = math.log(w / h)
    return min(buckets, key=lambda b: (abs(math.log(b[1] / b[0]) - ratio), -b[0] * b[1]))


def assign_bucket(size: Size, buckets: Sequence[Size], step: int, upscale: bool = False) -> Size:
    """The bucket of an image of ``size`` (h, w): the nearest bucket, or without ``upscale`` (when
    the image is smaller than that bucket) the image's own size rounded down to ``step``."""
    bucket = nearest_bucket(size, buckets)
    h, w = size
    if upscale or (h >= bucket[0] and w >= bucket[1]):
        return bucket
    return (max(step, _down(h, step)), max(step, _down(w, step)))  # its own size, cropped


@dataclass(frozen=True)
class BucketSpec:
    """Bucketing settings of a data set (the ``buckets:`` config block)."""

    resolution: int = 512
    step: int = 64
    min_side: int | None = None
    max_side: int | None = None
    upscale: bool = False

    @classmethod
    def from_config(cls, cfg: object) -> BucketSpec | None:
        """None for ``false`` / None; defaults for ``true``; else the given keys."""
        if cfg is None or cfg is False:
            return None
        if cfg is True:
            return cls()
        if not isinstance(cfg, dict):
            try:
                cfg = dict(cfg)  # OmegaConf DictConfig
            except (TypeError, ValueError):
                raise ValueError(
                    f"buckets: expected true/false or a mapping of {sorted(cls.__annotations__)}, "
                    f"found {cfg!r}"
                ) from None
        unknown = sorted(set(cfg) - set(cls.__annotations__))
        if unknown:
            raise ValueError(
                f"buckets: unknown keys {unknown}; known: {sorted(cls.__annotations__)}"
            )
        return cls(**cfg)

    def sizes(self) -> list[Size]:
        return make_buckets(self.resolution, self.step, self.min_side, self.max_side)

    def assign(self, sizes: Sequence[Size]) -> list[Size]:
        """The bucket of each image size (h, w)."""
        buckets = self.sizes()
        return [assign_bucket(s, buckets, self.step, self.upscale) for s in sizes]


def describe_buckets(assigned: Sequence[Size]) -> str:
    """'7 buckets: 384x640 (h x w): 30 images, ...' for the run's log."""
    counts = Counter(assigned)
    parts = [
        f"{h}x{w}: {n}" for (h, w), n in sorted(counts.items(), key=lambda kv: kv[0][1] / kv[0][0])
    ]
    return f"{len(counts)} buckets (h x w: images): " + ", ".join(parts)
