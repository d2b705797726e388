"""A small KL autoencoder learns real photographs (scikit-image crops) on CPU."""

from __future__ import annotations

import pytest
import torch

from ldm.data.photos import PhotoCrops
from ldm.metrics import psnr
from ldm.models.autoencoder import AutoencoderKL

DD = dict(
    double_z=True,
    z_channels=3,
    resolution=32,
    in_channels=3,
    out_ch=3,
    ch=32,
    ch_mult=[1, 2],
    num_res_blocks=1,
    attn_resolutions=[],
    dropout=0.0,
)
LOSS = {
    "target": "ldm.modules.losses.LPIPSWithDiscriminator",
    "params": {
        "disc_start": 10**6,
        "perceptual_weight": 0.0,
        "kl_weight": 1e-6,
        "disc_num_layers": 2,
    },
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread is fastest


def _crops(n: int) -> torch.Tensor:
    ds = PhotoCrops(photos=["astronaut", "coffee"], size=32, length=n, deterministic=True, seed=7)
    return torch.stack([torch.from_numpy(ds[i]["image"]) for i in range(n)]).permute(0, 3, 1, 2)


def _train(model: AutoencoderKL, x: torch.Tensor, steps: int, lr: float) -> list[float]:
    opt = torch.optim.Adam(model.ae_parameters(), lr=lr, betas=(0.5, 0.9))
    losses = []
    for _ in range(steps):
        loss, _, _, _ = model.generator_loss(x, 0, "train", sample_posterior=True)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_reconstruction_loss_falls_on_real_crops() -> None:
    torch.manual_seed(0)
    model = AutoencoderKL(DD, LOSS, embed_dim=3)
    x = _crops(2)
    before = psnr(x, model.reconstruct(x)[0].clamp(-1, 1)).mean()
    losses = _train(model, x, steps=12, lr=2e-3)
    assert sum(losses[-3:]) / 3 < 0.6 * sum(losses[:3]) / 3
    assert psnr(x, model.reconstruct(x)[0].clamp(-1, 1)).mean() > before + 3.0


@pytest.mark.slow
def test_small_kl_autoencoder_overfits_real_crops_above_30db() -> None:
    torch.manual_seed(0)
    model = AutoencoderKL(DD, LOSS, embed_dim=3)
    x = _crops(4)
    for _ in range(12):  # at most 600 steps; stop as soon as the bar is cleared
        _train(model, x, steps=50, lr=2e-3)
        value = psnr(x, model.reconstruct(x)[0].clamp(-1, 1)).mean().item()
        if value > 30.0:
            break
    assert value > 30.0
