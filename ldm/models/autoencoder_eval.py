"""Held-out reconstruction quality of a first stage: PSNR / SSIM on photo crops it never saw."""

from __future__ import annotations

import torch

from ldm.data.photos import VALIDATION_PHOTOS, PhotoCropsValidation
from ldm.metrics import psnr, ssim

__all__ = ["evaluate_reconstruction"]


@torch.no_grad()
def evaluate_reconstruction(
    model: torch.nn.Module,
    n_crops: int = 256,
    size: int = 64,
    batch_size: int = 32,
    seed: int = 4321,
) -> dict:
    """Mean PSNR (dB) / SSIM of model.reconstruct(x) on `n_crops` fixed crops of the held-out photos."""
    was_training = model.training
    model.eval()
    ds = PhotoCropsValidation(size=size, length=n_crops, seed=seed)
    device = next(model.parameters()).device
    p, s = [], []
    for i in range(0, n_crops, batch_size):
        x = torch.stack(
            [torch.from_numpy(ds[j]["image"]) for j in range(i, min(i + batch_size, n_crops))]
        )
        x = x.permute(0, 3, 1, 2).to(device)  # [B, 3, H, W]
        xrec = model.reconstruct(x)[0].clamp(-1, 1)
        p.append(psnr(x, xrec).cpu())
        s.append(ssim(x, xrec).cpu())
    model.train(was_training)
    p_all, s_all = torch.cat(p), torch.cat(s)
    return {
        "psnr_db": round(p_all.mean().item(), 3),
        "ssim": round(s_all.mean().item(), 4),
        "n_crops": n_crops,
        "crop_size": size,
        "photos": list(VALIDATION_PHOTOS),
    }
