"""SiLU after a norm and the residual add, in place at inference; shared by the U-Net and
autoencoder ResNet blocks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def norm_silu(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """SiLU(norm(x)); in place when no gradient is recorded (saves one activation-sized buffer)."""
    h = norm(x)
    if torch.is_grad_enabled() and h.requires_grad:
        return F.silu(h)
    return F.silu(h, inplace=True)


def add_skip(h: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """skip + h; added into h's buffer when no graph is recorded and the two match in shape and
    dtype (the same bits: addition is commutative)."""
    if (
        h.dtype != skip.dtype
        or h.shape != skip.shape
        or (torch.is_grad_enabled() and (h.requires_grad or skip.requires_grad))
    ):
        return skip + h
    return h.add_(skip)
