"""Sinusoidal timestep embedding (Vaswani et al. 2017, Sec. 3.5; Ho et al. 2020, Appendix B)."""

from __future__ import annotations

import math

import torch


def timestep_embedding(
    timesteps: torch.Tensor, dim: int, max_period: float = 10000.0, repeat_only: bool = False
) -> torch.Tensor:
    """[cos(t w_i), sin(t w_i)] with w_i = max_period^(-i / (dim//2)); t: [B] (may be fractional) -> [B, dim]."""
    if repeat_only:
        return timesteps[:, None].float().expand(-1, dim)  # [B] -> [B, dim]
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    freqs = torch.exp(-math.log(max_period) * exponent)  # [half]
    args = timesteps[:, None].float() * freqs[None]  # [B, half]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # [B, 2*half]
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding
