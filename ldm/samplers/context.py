"""Per-call sampling state shared by all solvers: noise source, callback, progress bar."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import trange


def randn_like(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard normal noise shaped like ``x``, drawn on the generator's device (diffusers' randn_tensor)."""
    device = generator.device if generator is not None else x.device
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=device)
    return noise.to(x.device)


@dataclass
class SamplerContext:
    """Noise generator, per-step ``callback(dict)`` and tqdm switch (``disable=None``: off when not a TTY).

    ``total``: the number of solver steps of the call, sent with every report (progress bars)."""

    generator: torch.Generator | None = None
    callback: Callable[[dict[str, Any]], None] | None = None
    disable: bool | None = None
    name: str = "sampling"
    total: int | None = None

    def randn(self, like: torch.Tensor) -> torch.Tensor:
        """Fresh N(0, I) noise shaped like ``like`` from the call's generator."""
        return randn_like(like, self.generator)

    def steps(self, n: int) -> Iterable[int]:
        """range(n) with a progress bar."""
        return trange(n, disable=self.disable, desc=self.name, leave=False)

    def report(self, **info: Any) -> None:
        """Send step info (i, x, sigma or t, denoised; total when known) to the user's callback."""
        if self.callback is not None:
            if self.total is not None:
                info.setdefault("total", self.total)
            self.callback(info)
