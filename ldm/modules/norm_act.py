"""SiLU after a norm, shared by the U-Net and autoencoder ResNet blocks."""

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
