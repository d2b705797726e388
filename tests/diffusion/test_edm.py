"""Sigma-conditioned (EDM / VE) denoiser training (Karras et al. 2022, Table 1)."""

import math

import pytest
import torch

from ldm.diffusion.edm import SigmaTraining

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread is fastest


def test_edm_preconditioning_has_unit_loss_for_the_ideal_zero_network():
    """For y ~ N(0, sigma_data^2) the ideal denoiser is c_skip x, i.e. F = 0, and EDM's weighting
    makes the expected loss exactly 1 at every sigma (the unit-variance design of Sec. 5)."""
    st = SigmaTraining("edm", sigma_data=0.5)
    g = torch.Generator().manual_seed(0)
    y = 0.5 * torch.randn(20000, 1, 1, 1, generator=g)

    def zero_net(x, c_noise):
        return torch.zeros_like(x)

    for sigma in (0.01, 0.5, 10.0, 80.0):
        x = y + sigma * torch.randn(y.shape, generator=g)
        d = st.denoise(zero_net, x, torch.full((y.shape[0],), sigma))
        torch.testing.assert_close(d, 0.25 / (sigma**2 + 0.25) * x)
        loss = st.loss_weight(torch.tensor(sigma)) * ((d - y) ** 2).mean()
        assert loss.item() == pytest.approx(1.0, rel=0.03)
    c_skip, c_out, c_in, c_noise = st.precondition(torch.tensor([1.0]))
    assert c_in.item() == pytest.approx(1 / math.sqrt(1.25))
    assert c_out.item() == pytest.approx(0.5 / math.sqrt(1.25))
    assert c_noise.item() == pytest.approx(0.0)


def test_sigma_sampling_distributions():
    g = torch.Generator().manual_seed(1)
    st = SigmaTraining("edm", p_mean=-1.2, p_std=1.2)
    log_s = st.sample_sigma(50000, generator=g).log()
    assert log_s.mean().item() == pytest.approx(-1.2, abs=0.03)
    assert log_s.std().item() == pytest.approx(1.2, rel=0.03)
    ve = SigmaTraining("ve", sigma_min=0.02, sigma_max=100.0)
    s = ve.sample_sigma(50000, generator=g)
    assert s.min() >= 0.02 and s.max() <= 100.0
    u = (s.log() - math.log(0.02)) / (math.log(100.0) - math.log(0.02))
    assert u.mean().item() == pytest.approx(0.5, abs=0.01)
    # VE: D = x + sigma F, loss weight 1 / sigma^2
    c_skip, c_out, c_in, c_noise = ve.precondition(torch.tensor([2.0]))
    assert (c_skip.item(), c_out.item(), c_in.item(), c_noise.item()) == (1.0, 2.0, 1.0, 0.0)
    with pytest.raises(ValueError, match="kind"):
        SigmaTraining("vp")


def test_tiny_ldm_with_edm_training_learns_a_gaussian():
    from ldm.util import instantiate_from_config

    torch.manual_seed(0)
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = instantiate_from_config(
            {
                "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
                "params": {
                    "first_stage_config": {"target": "ldm.models.autoencoder.IdentityFirstStage"},
                    "cond_stage_config": "__is_unconditional__",
                    "first_stage_key": "image",
                    "image_size": 1,
                    "channels": 2,
                    "use_ema": False,
                    "sigma_training": {"kind": "edm", "sigma_data": 0.5, "c_noise_scale": 250.0},
                    "unet_config": {
                        "target": "toy_denoiser.ToyDenoiser",
                        "params": {"in_channels": 2, "width": 64},
                    },
                },
            }
        )
        g = torch.Generator().manual_seed(2)
        data = torch.tensor([0.5, -0.3]) + torch.tensor([0.2, 0.4]) * torch.randn(
            4096, 2, generator=g
        )
        data = data.view(-1, 1, 1, 2)
        opt = torch.optim.AdamW(model.model.parameters(), lr=3e-3)
        losses = []
        for i in range(250):
            idx = torch.randint(0, 4096, (256,), generator=g)
            loss = model.training_step({"image": data[idx]}, i)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert sum(losses[-25:]) / 25 < 0.8 * sum(losses[:5]) / 5
        model.eval()
        z = model.sample(batch_size=4000, steps=40).view(-1, 2)
    finally:
        torch.set_num_threads(n_threads)
    torch.testing.assert_close(z.mean(0), torch.tensor([0.5, -0.3]), atol=0.05, rtol=0)
    torch.testing.assert_close(z.std(0), torch.tensor([0.2, 0.4]), atol=0.05, rtol=0.1)
