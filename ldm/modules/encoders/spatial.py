"""``SpatialRescaler``: resize a spatial condition (segmentation map, low-res image) for concatenation.

CompVis latent-diffusion conditioner for semantic synthesis and super-resolution (Rombach et al.
2022, Sec. 4.3): ``n_stages`` interpolations by ``multiplier``, then an optional 1x1 conv that maps
``in_channels`` to ``out_channels`` (key ``channel_mapper.weight``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_METHODS = ("nearest", "linear", "bilinear", "trilinear", "bicubic", "area")


class SpatialRescaler(nn.Module):
    """``x [B, C, H, W]`` -> ``[B, C', H * multiplier**n_stages, W * multiplier**n_stages]``."""

    def __init__(
        self,
        n_stages: int = 1,
        method: str = "bilinear",
        multiplier: float = 0.5,
        in_channels: int = 3,
        out_channels: int | None = None,
        bias: bool = False,
    ) -> None:
        super().__init__()
        if n_stages < 0:
            raise ValueError(f"SpatialRescaler: n_stages must be >= 0, got {n_stages}.")
        if method not in _METHODS:
            raise ValueError(f"SpatialRescaler: method='{method}' is not one of {list(_METHODS)}.")
        self.n_stages = int(n_stages)
        self.method = method
        self.multiplier = float(multiplier)
        self.remap_output = out_channels is not None
        if self.remap_output:
            self.channel_mapper = nn.Conv2d(in_channels, out_channels, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Rescale ``n_stages`` times, then remap channels."""
        for _ in range(self.n_stages):
            x = F.interpolate(x, scale_factor=self.multiplier, mode=self.method)
        return self.channel_mapper(x) if self.remap_output else x

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Same as ``forward``."""
        return self(x)
