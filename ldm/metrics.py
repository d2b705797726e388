"""Image reconstruction metrics: PSNR and SSIM (Wang et al. 2004), batched in torch.

SSIM matches `skimage.metrics.structural_similarity` with its defaults (7x7 uniform window,
K1=0.01, K2=0.03, sample covariance, mean over the valid region and over channels).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["psnr", "ssim"]


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """PSNR = 10 log10(R^2 / MSE) per image; x, y [B, C, H, W] -> [B] (R = 2 for [-1, 1] images)."""
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(dim=1)
    return 10.0 * torch.log10(data_range**2 / mse.clamp_min(1e-20))


def ssim(
    x: torch.Tensor,
    y: torch.Tensor,
    data_range: float = 2.0,
    win_size: int = 7,
    k1: float = 0.01,
    k2: float = 0.03,
) -> torch.Tensor:
    """Mean structural similarity (Wang et al. 2004, Eq. 13) per image; [B, C, H, W] -> [B]."""
    if min(x.shape[-2:]) < win_size:
        raise ValueError(
            f"ssim needs images of at least {win_size}x{win_size}, got {tuple(x.shape[-2:])}."
        )
    x, y = x.double(), y.double()
    c = x.shape[1]

    def mean_filter(t: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(t, win_size, stride=1)  # valid region, as skimage crops its border

    n = win_size * win_size
    cov_norm = n / (n - 1.0)  # sample covariance
    ux, uy = mean_filter(x), mean_filter(y)
    vx = cov_norm * (mean_filter(x * x) - ux * ux)
    vy = cov_norm * (mean_filter(y * y) - uy * uy)
    vxy = cov_norm * (mean_filter(x * y) - ux * uy)
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.reshape(s.shape[0], c, -1).mean(dim=2).mean(dim=1).float()
