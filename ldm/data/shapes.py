"""Captioned shapes: a synthetic text-to-image data set generated on the fly, no download.

One anti-aliased shape on black: colour x shape x size x position on a 3x3 grid, caption
"a {size} {colour} {shape} in the {position}". Item i depends only on (seed, split, i).
A fixed list of colour-shape pairs (`HELDOUT_PAIRS`) never appears in the training split; the
"heldout" split contains only those pairs, to test whether a model composes words seen apart.
Items carry the SDXL micro-conditioning keys of an uncropped image (see `CaptionedShapes`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from ldm.data.micro_conditioning import MicroConditioning

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "orange": (255, 128, 0),
    "yellow": (255, 255, 0),
    "green": (0, 255, 0),
    "cyan": (0, 255, 255),
    "blue": (0, 0, 255),
    "magenta": (255, 0, 255),
    "white": (255, 255, 255),
}
#: Colours the training split never draws (``CaptionedShapes(colours=[...])`` draws them): the
#: personalisation examples teach "purple" to a model trained on ``COLOURS``. Hue 266 degrees:
#: the KL-f4 first stage shipped until 993ff09 (trained on ``COLOURS``) pulled hues towards
#: magenta, so that (128, 0, 255), hue 270, came back as (182, 3, 255) and the judge read only
#: 62% of its reconstructions as purple; (96, 0, 224) came back purple. The current one has seen
#: purple images (never the word): 100% (tests/data/test_shapes.py).
EXTRA_COLOURS: dict[str, tuple[int, int, int]] = {"purple": (96, 0, 224)}
PALETTE: dict[str, tuple[int, int, int]] = {**COLOURS, **EXTRA_COLOURS}  # every drawable colour
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
POSITIONS = (
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)
HELDOUT_PAIRS: tuple[tuple[str, str], ...] = (
    ("red", "triangle"),
    ("green", "circle"),
    ("blue", "square"),
    ("yellow", "circle"),
)
SPLITS = {"train": 0, "validation": 1, "heldout": 2}
SPLIT_ALIASES = {"val": "validation", "valid": "validation", "test": "heldout"}

# Geometry, as fractions of the image side S (so any `size` renders the same picture).
GRID = (0.2, 0.5, 0.8)  # anchor (bounding-box centre) of columns / rows
RADIUS = {"small": 0.095, "large": 0.15}  # "radius" r: circle radius; equal-area square
POSITION_JITTER = 0.03  # +- uniform, fraction of S
SCALE_JITTER = 0.06  # +- uniform, relative to r
TRIANGLE_R = 1.3  # equilateral triangle circumradius, in units of r
SQUARE_HALF = math.sqrt(math.pi) / 2  # half side of the square with the circle's area
AREA_PER_R2 = {  # shape area / r^2
    "circle": math.pi,
    "square": 4 * SQUARE_HALF**2,
    "triangle": 3 * math.sqrt(3) / 4 * TRIANGLE_R**2,
}
SIZE_THRESHOLD = math.sqrt(RADIUS["small"] * RADIUS["large"])  # geometric mean, fraction of S

CAPTION_RE = re.compile(
    r"^\s*an?\s+(?P<size>\w+)\s+(?P<colour>\w+)\s+(?P<shape>\w+)\s+in\s+the\s+(?P<position>.+?)\s*\.?\s*$",
    re.IGNORECASE,
)


def caption(attrs: dict[str, str]) -> str:
    """The caption of an attribute dict: "a {size} {colour} {shape} in the {position}"."""
    return f"a {attrs['size']} {attrs['colour']} {attrs['shape']} in the {attrs['position']}"


def parse_caption(text: str) -> dict[str, str]:
    """Inverse of `caption`: attribute dict from a caption; ValueError if it does not match."""
    m = CAPTION_RE.match(text)
    if m is None:
        raise ValueError(
            f"not a shapes caption: {text!r} (expected 'a SIZE COLOUR SHAPE in the POSITION')"
        )
    attrs = {k: v.lower() for k, v in m.groupdict().items()}
    for key, allowed in (
        ("size", SIZES),
        ("colour", PALETTE),
        ("shape", SHAPES),
        ("position", POSITIONS),
    ):
        if attrs[key] not in allowed:
            raise ValueError(f"unknown {key} {attrs[key]!r} in {text!r}; known: {list(allowed)}")
    return attrs


def coverage(
    shape: str, cx: float, cy: float, r: float, size: int, supersample: int = 4
) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] (size x size) of a shape anchored at its bbox centre (pixels)."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")
    out = np.zeros((size, size), dtype=np.float64)
    ext = max(r, SQUARE_HALF * r, 0.87 * TRIANGLE_R * r) + 1.0  # half extent of every shape + 1
    x0, x1 = max(0, int(cx - ext)), min(size, int(math.ceil(cx + ext)))
    y0, y1 = max(0, int(cy - ext)), min(size, int(math.ceil(cy + ext)))
    if x0 >= x1 or y0 >= y1:
        return out
    offs = (np.arange(supersample) + 0.5) / supersample
    y = (np.arange(y0, y1)[:, None] + offs).reshape(-1, 1)  # [(y1-y0) * ss, 1] sample rows
    x = (np.arange(x0, x1)[:, None] + offs).reshape(1, -1)  # [1, (x1-x0) * ss] sample columns
    if shape == "circle":
        inside = (x - cx) ** 2 + (y - cy) ** 2 <= r * r
    elif shape == "square":
        a = SQUARE_HALF * r
        inside = (np.abs(x - cx) <= a) & (np.abs(y - cy) <= a)
    else:  # equilateral triangle, apex up; height 1.5 R, side sqrt(3) R
        big_r = TRIANGLE_R * r
        top, bottom = cy - 0.75 * big_r, cy + 0.75 * big_r
        half_w = (y - top) * (1.0 / math.sqrt(3))  # half width grows by side/height = 2/sqrt(3) / 2
        inside = (y >= top) & (y <= bottom) & (np.abs(x - cx) <= half_w)
    # [h*ss, w*ss] -> [h, ss, w, ss] -> count of covered sub-samples per pixel
    counts = inside.reshape(y1 - y0, supersample, x1 - x0, supersample).sum(axis=(1, 3))
    out[y0:y1, x0:x1] = counts / float(supersample * supersample)
    return out


def sample_attributes(
    seed: int, split: str, index: int, size: int = 32, colours: Sequence[str] | None = None
) -> dict[str, Any]:
    """Attributes (and jittered geometry in pixels) of item `index`; a function of (seed, split,
    index, colours). ``colours``: draw only these colours (every shape), e.g. ``["purple"]``."""
    split = SPLIT_ALIASES.get(split, split)
    rng = np.random.default_rng([int(seed), SPLITS[split], int(index)])
    if colours is not None:
        pairs = colour_pairs(colours)
    else:
        pairs = heldout_pairs() if split == "heldout" else training_pairs()
    colour, shape = pairs[rng.integers(len(pairs))]
    size_name = SIZES[rng.integers(len(SIZES))]
    pos = int(rng.integers(len(POSITIONS)))
    jx, jy = rng.uniform(-POSITION_JITTER, POSITION_JITTER, size=2)
    scale = 1.0 + rng.uniform(-SCALE_JITTER, SCALE_JITTER)
    return {
        "colour": colour,
        "shape": shape,
        "size": size_name,
        "position": POSITIONS[pos],
        "cx": (GRID[pos % 3] + jx) * size,
        "cy": (GRID[pos // 3] + jy) * size,
        "r": RADIUS[size_name] * scale * size,
    }


def render(attrs: dict[str, Any], size: int = 32, supersample: int = 4) -> np.ndarray:
    """uint8 H x W x 3 image of one shape on black; geometry from attrs (pixels) or grid defaults."""
    if "cx" in attrs:
        cx, cy, r = attrs["cx"], attrs["cy"], attrs["r"]
    else:
        pos = POSITIONS.index(attrs["position"])
        cx, cy = GRID[pos % 3] * size, GRID[pos // 3] * size
        r = RADIUS[attrs["size"]] * size
    cov = coverage(attrs["shape"], cx, cy, r, size, supersample)
    rgb = np.asarray(PALETTE[attrs["colour"]], dtype=np.float64)
    return np.round(cov[..., None] * rgb).astype(np.uint8)


def training_pairs() -> list[tuple[str, str]]:
    """All colour-shape pairs except the held-out ones."""
    return [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in HELDOUT_PAIRS]


def colour_pairs(colours: Sequence[str]) -> list[tuple[str, str]]:
    """Every shape in each of ``colours`` (names from ``PALETTE``)."""
    unknown = [c for c in colours if c not in PALETTE]
    if unknown or not colours:
        raise ValueError(f"colours {list(colours)}: expected names from {list(PALETTE)}")
    return [(c, s) for c in colours for s in SHAPES]


def heldout_pairs() -> list[tuple[str, str]]:
    """The fixed colour-shape pairs kept out of training."""
    return list(HELDOUT_PAIRS)


class CaptionedShapes(Dataset):
    """Map-style data set of captioned shapes; split train / validation / heldout (CompVis items).

    Items: `{image_key, caption_key}` plus the SDXL micro-conditioning keys. Each image is drawn
    directly at `size` x `size` (anti-aliased by sub-pixel sampling, not by rendering larger and
    downsampling), with no resize or crop: original size = target size = (size, size), crop
    offsets (0, 0). Any internal supersampling would not change this: the original size is the
    size a user sees.
    """

    deterministic = True  # item i is always the same image: encodings may be cached

    def __init__(
        self,
        split: str = "train",
        length: int = 10000,
        size: int = 32,
        seed: int = 0,
        image_key: str = "image",
        caption_key: str = "caption",
        return_attributes: bool = False,
        colours: Sequence[str] | None = None,
        words: dict[str, str] | None = None,
    ):
        split = SPLIT_ALIASES.get(split, split)
        if split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
        if length < 1 or size < 8:
            raise ValueError(f"need length >= 1 and size >= 8, got length={length}, size={size}")
        self.split, self.length, self.size, self.seed = split, int(length), int(size), int(seed)
        self.image_key, self.caption_key = image_key, caption_key
        self.return_attributes = return_attributes
        self.colours = list(colours) if colours is not None else None
        self.words = dict(words or {})  # a colour said by another word, e.g. {purple: <purple>}
        if self.colours is not None:
            colour_pairs(self.colours)  # refuses unknown names now, not at the first item

    def __len__(self) -> int:
        return self.length

    def attributes(self, i: int) -> dict[str, Any]:
        """Attribute dict of item i: colour, shape, size, position, and geometry cx, cy, r (pixels)."""
        if not 0 <= i < self.length:
            raise IndexError(f"index {i} out of range for {self.length} items")
        return sample_attributes(self.seed, self.split, i, self.size, self.colours)

    def caption(self, i: int) -> str:
        """Caption of item i (colours named by ``words`` when given)."""
        attrs = self.attributes(i)
        return caption({**attrs, "colour": self.words.get(attrs["colour"], attrs["colour"])})

    def image(self, i: int) -> np.ndarray:
        """uint8 H x W x 3 image of item i."""
        return render(self.attributes(i), self.size)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if i < 0:
            i += self.length
        attrs = self.attributes(i)
        image = render(attrs, self.size).astype(np.float32) / 127.5 - 1.0  # H x W x 3 in [-1, 1]
        item: dict[str, Any] = {self.image_key: image, self.caption_key: self.caption(i)}
        item.update(MicroConditioning.uncropped(self.size, self.size).as_item())
        if self.return_attributes:
            item.update({k: attrs[k] for k in ("colour", "shape", "size", "position")})
        return item


def colour_prompts(colours: Sequence[str], n: int = 8, seed: int = 4321) -> list[str]:
    """``n`` fixed captions in ``colours`` (every shape in turn; seeded size and position)."""
    rng = np.random.default_rng(seed)
    pairs = colour_pairs(colours)
    order = rng.permutation(len(pairs))
    out = []
    for k in range(n):
        colour, shape = pairs[order[k % len(pairs)]]
        size, pos = SIZES[rng.integers(len(SIZES))], POSITIONS[rng.integers(len(POSITIONS))]
        out.append(caption({"size": size, "colour": colour, "shape": shape, "position": pos}))
    return out


def evaluation_prompts(n_per_split: int = 8, seed: int = 1234) -> dict[str, list[str]]:
    """Fixed prompts for sample grids: {"seen": training pairs, "heldout": held-out pairs}.

    Pairs are cycled in a seeded order, so n_per_split >= 4 covers every held-out pair; size and
    position are drawn from the same seeded generator.
    """
    rng = np.random.default_rng(seed)
    out: dict[str, list[str]] = {}
    for name, pairs in (("seen", training_pairs()), ("heldout", heldout_pairs())):
        order = rng.permutation(len(pairs))
        out[name] = []
        for k in range(n_per_split):
            colour, shape = pairs[order[k % len(pairs)]]
            attrs = {
                "size": SIZES[rng.integers(len(SIZES))],
                "colour": colour,
                "shape": shape,
                "position": POSITIONS[rng.integers(len(POSITIONS))],
            }
            out[name].append(caption(attrs))
    return out
