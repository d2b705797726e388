"""The canonical LoRA representation: one low-rank update per target weight (Hu et al. 2021, eq. 3).

A module updates W [out, in] (or a conv kernel [out, in, kh, kw], or a row range of a packed weight
such as OpenCLIP's `attn.in_proj_weight`) by `delta = up @ down * alpha / rank`. A `LoraSet` keys
modules by the engine state-dict key of the weight they change.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


class LoraError(ValueError):
    """A LoRA file that cannot be read, or does not fit the model; the message says why and what to do."""


@dataclass
class LoraModule:
    """down [r, in] (conv [r, in, kh, kw]), up [out, r] (conv [out, r, 1, 1]); alpha None = rank."""

    down: Tensor
    up: Tensor
    alpha: float | None = None
    rows: tuple[int, int] | None = None  # [start, stop) rows of a packed target weight

    @property
    def rank(self) -> int:
        """r, the inner dimension of up @ down."""
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        """alpha / r (kohya's and peft's scaling)."""
        alpha = self.rank if self.alpha is None else self.alpha
        return float(alpha) / self.rank

    def delta(self, device: torch.device | str | None = None) -> Tensor:
        """scale * up @ down in float32, shaped like the target weight (or its row range)."""
        down = self.down.to(device=device, dtype=torch.float32)
        up = self.up.to(device=device, dtype=torch.float32)
        if down.ndim == 2:
            return (up @ down) * self.scale
        # conv: [out, r] x [r, in, kh, kw] -> [out, in, kh, kw] (1x1 and 3x3 kernels alike)
        return torch.einsum("or,rihw->oihw", up[:, :, 0, 0], down) * self.scale


LoraSet = dict[str, LoraModule]


@dataclass
class LoraFile:
    """A LoRA file read against a model: modules keyed by engine keys, plus what the file says."""

    modules: LoraSet
    metadata: dict[str, str] = field(default_factory=dict)
    made_for: str | None = None  # "SD v1" | "SD v2" | "SDXL" | "SDXL refiner" | None (unknown)
    format: str = "kohya"  # "kohya" | "diffusers"
    path: str | None = None
