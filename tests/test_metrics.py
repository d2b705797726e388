"""PSNR and SSIM of ldm.metrics against scikit-image (the reference implementation)."""

from __future__ import annotations

import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from ldm.metrics import psnr, ssim


def _pair(seed: int, shape: tuple[int, ...] = (3, 3, 20, 24)) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1
    y = (x + 0.3 * torch.randn(shape, generator=g, dtype=torch.float64)).clamp(-1, 1)
    return x, y


def test_psnr_equals_scikit_image_per_image() -> None:
    x, y = _pair(0)
    ref = [peak_signal_noise_ratio(a, b, data_range=2.0) for a, b in zip(x.numpy(), y.numpy())]
    # psnr works in float32: agreement to ~1e-6 dB
    tol = dict(rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(psnr(x, y).double(), torch.tensor(ref, dtype=torch.float64), **tol)
    # data range 1: the same MSE against a 4x smaller R^2 -> 10 log10(4) dB less
    torch.testing.assert_close(
        psnr(x, y, data_range=1.0).double(),
        torch.tensor(ref) - 10 * torch.log10(torch.tensor(4.0)),
        **tol,
    )


@pytest.mark.parametrize("win_size", [7, 5])
def test_ssim_equals_scikit_image_per_image(win_size: int) -> None:
    x, y = _pair(1)
    ref = [
        structural_similarity(a, b, data_range=2.0, channel_axis=0, win_size=win_size)
        for a, b in zip(x.numpy(), y.numpy())
    ]
    torch.testing.assert_close(
        ssim(x, y, win_size=win_size).double(), torch.tensor(ref, dtype=torch.float64)
    )


def test_ssim_of_identical_images_is_one_and_small_images_are_refused() -> None:
    x, _ = _pair(2)
    torch.testing.assert_close(ssim(x, x).double(), torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="at least 7x7"):
        ssim(x[..., :6, :6], x[..., :6, :6])
