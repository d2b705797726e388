"""Reconstruction term w_pix |x - x_rec| + w_p * LPIPS(x, x_rec) shared by the KL and VQ losses."""

from __future__ import annotations

import os

import torch

from ldm.modules.losses.lpips import LPIPS

__all__ = ["build_lpips", "reconstruction_loss"]


def build_lpips(
    perceptual_weight: float,
    vgg_weights: str | os.PathLike | None = None,
    lpips_weights: str | os.PathLike | None = None,
) -> LPIPS | None:
    """The frozen LPIPS network, or None when perceptual_weight is 0 (no weight files needed)."""
    if perceptual_weight <= 0:
        return None
    return LPIPS(vgg_weights=vgg_weights, lpips_weights=lpips_weights).eval()


def reconstruction_loss(
    x: torch.Tensor,
    xrec: torch.Tensor,
    lpips: LPIPS | None,
    perceptual_weight: float,
    pixel_loss: str = "l1",
    pixel_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (per-pixel loss [B, C, H, W] incl. the perceptual term, p_loss [B, 1, 1, 1] or 0)."""
    x, xrec = x.contiguous(), xrec.contiguous()
    diff = xrec - x
    if pixel_loss == "l1":
        rec = diff.abs()
    elif pixel_loss == "l2":
        rec = diff.pow(2)
    else:
        raise ValueError(f"pixel_loss must be 'l1' or 'l2', got {pixel_loss!r}.")
    if pixel_weight != 1.0:
        rec = pixel_weight * rec
    if lpips is None:
        return rec, torch.zeros((), device=x.device)
    p_loss = lpips(x, xrec)
    return rec + perceptual_weight * p_loss, p_loss
