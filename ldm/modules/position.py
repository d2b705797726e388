"""Initial values of the U-Net's optional absolute position map (``position_embedding``).

A U-Net is translation-equivariant except at its borders, so from a noisy input it hardly knows
where a pixel is; words such as "top left" then cannot be tied to places. Adding a position map
after the input convolution fixes that. Two starting points:

- ``"sincos"``: 2D sine-cosine features (as in MAE, He et al. 2022), one quarter of the channels
  each for sin(y), cos(y), sin(x), cos(x), with frequencies spaced geometrically from half a
  cycle across the map to a period of 4 pixels (so nothing aliases on a small latent), scaled
  to unit RMS: the map is informative from the first step.
- ``"learned"`` (or ``True``): small random values (std 0.02) that training has to grow.
"""

from __future__ import annotations

import math

import torch

KINDS = ("sincos", "learned")


def sincos_position_map(channels: int, size: int) -> torch.Tensor:
    """[1, channels, size, size] 2D sine-cosine features at unit RMS (spare channels zero)."""
    n = channels // 4
    out = torch.zeros(1, channels, size, size, dtype=torch.float64)
    if n == 0:
        return out.float()
    coords = (torch.arange(size, dtype=torch.float64) + 0.5) / size  # pixel centres in (0, 1)
    top = math.log(max(size / 2.0, 1.0))  # highest frequency: period 4 pixels
    ratios = torch.exp(torch.linspace(0.0, top, n, dtype=torch.float64)) if n > 1 else torch.ones(1)
    phase = math.pi * coords[None, :] * ratios[:, None]  # [n, size]; lowest: half a cycle
    y = torch.cat([phase.sin(), phase.cos()])[:, :, None].expand(-1, -1, size)  # [2n, S, S]
    x = torch.cat([phase.sin(), phase.cos()])[:, None, :].expand(-1, size, -1)
    feats = torch.cat([y, x])  # [4n, S, S]
    out[0, : 4 * n] = feats / feats.pow(2).mean().sqrt() * math.sqrt(4 * n / channels)
    return out.float()


def initial_position_map(kind: bool | str, channels: int, size: int) -> torch.Tensor:
    """Starting value of the position map for `kind` (see the module docstring)."""
    if kind is True or kind == "learned":
        return 0.02 * torch.randn(1, channels, size, size)
    if kind == "sincos":
        return sincos_position_map(channels, size)
    raise ValueError(
        f"UNetModel: position_embedding={kind!r}; expected false, true, or one of {list(KINDS)}."
    )
