"""What the page sends for one generation, checked: ``Settings``; and the seed rules."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from ldm.ui.errors import UiError

MODES = ("txt2img", "img2img", "inpaint")
#: the seed field's value for "a new random seed each time"
RANDOM_SEED = -1
MAX_SEED = 2**32 - 1
MAX_BATCH = 16
MAX_STEPS = 1000


@dataclass
class Settings:
    """One generation's settings; None / 0 in ``sampler``, ``steps``, ``guidance_scale``,
    ``width``, ``height`` mean the model's recorded defaults (its own size)."""

    mode: str = "txt2img"
    prompt: str = ""
    negative_prompt: str = ""
    checkpoint: str | None = None
    sampler: str | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    seed: int = RANDOM_SEED
    width: int | None = None
    height: int | None = None
    batch: int = 1
    strength: float | None = None
    loras: list[str] = field(default_factory=list)
    lora_scale: float = 1.0
    embeddings: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise UiError(f"Unknown mode {self.mode!r}; one of {', '.join(MODES)}.")
        self.sampler = self.sampler or None
        self.steps = int(self.steps) if self.steps else None
        self.guidance_scale = None if self.guidance_scale is None else float(self.guidance_scale)
        self.width = int(self.width) if self.width else None
        self.height = int(self.height) if self.height else None
        self.seed = RANDOM_SEED if self.seed is None else int(self.seed)
        self.batch = int(self.batch)
        self.loras = list(self.loras or [])
        self.embeddings = list(self.embeddings or [])
        if self.steps is not None and not 1 <= self.steps <= MAX_STEPS:
            raise UiError(f"Steps must be between 1 and {MAX_STEPS}, got {self.steps}.")
        if not 1 <= self.batch <= MAX_BATCH:
            raise UiError(f"Batch must be between 1 and {MAX_BATCH} images, got {self.batch}.")
        if not RANDOM_SEED <= self.seed <= MAX_SEED:
            raise UiError(f"Seed must be -1 (random) or between 0 and {MAX_SEED}.")
        if self.mode != "txt2img":
            self.strength = 0.75 if self.strength is None else float(self.strength)
            if not 0.0 < self.strength <= 1.0:
                raise UiError(f"Strength must be in (0, 1], got {self.strength}.")
        else:
            self.strength = None


def resolve_seed(seed: int, rng: random.Random | None = None) -> int:
    """``seed``, or a fresh random one for ``RANDOM_SEED`` (-1)."""
    if seed == RANDOM_SEED:
        return (rng or random.SystemRandom()).randint(0, MAX_SEED)
    return int(seed)


def reuse_seed(last_seed: int | None) -> int:
    """The seed field after "reuse last": the last image's seed (random when none yet)."""
    return RANDOM_SEED if last_seed is None else int(last_seed)
