"""SigmaTraining (EDM / VE) written out from Karras et al. 2022, Table 1, draw by draw (mutation tests).

The loss draws sigma then the noise from the same generator; a second generator with the same
seed reproduces both draws, so the expected loss is computed here from the paper's formulas.
"""

from __future__ import annotations

import math

import pytest
import torch

from ldm.diffusion.edm import SigmaTraining

pytestmark = pytest.mark.usefixtures("one_thread")


def net(x_in: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
    """A network that depends on both of its inputs."""
    return 0.3 * x_in + 0.1 * c_noise.reshape(-1, *[1] * (x_in.ndim - 1))


def edm_scalings(s: torch.Tensor, sd: float) -> tuple:
    """(c_skip, c_out, c_in, c_noise) of EDM, Table 1."""
    return (
        sd**2 / (s**2 + sd**2),
        s * sd / torch.sqrt(s**2 + sd**2),
        1 / torch.sqrt(s**2 + sd**2),
        torch.log(s) / 4,
    )


@pytest.mark.parametrize("loss_type", ["l2", "l1"])
def test_edm_loss_draw_by_draw(loss_type):
    st = SigmaTraining("edm", sigma_data=0.6, p_mean=-0.4, p_std=1.4)
    y = torch.randn(5, 2, 3, generator=torch.Generator().manual_seed(7))
    loss = st.loss(net, y, loss_type, generator=torch.Generator().manual_seed(11))
    g = torch.Generator().manual_seed(11)
    sigma = torch.exp(-0.4 + 1.4 * torch.randn(5, generator=g))  # ln sigma ~ N(P_mean, P_std^2)
    n = torch.randn(5, 2, 3, generator=g)
    s = sigma[:, None, None]
    c_skip, c_out, c_in, c_noise = edm_scalings(s, 0.6)
    x = y + s * n
    d = c_skip * x + c_out * (0.3 * c_in * x + 0.1 * c_noise)
    err = (d - y) ** 2 if loss_type == "l2" else (d - y).abs()
    weight = (sigma**2 + 0.36) / (sigma * 0.6) ** 2
    torch.testing.assert_close(loss, weight * err.mean(dim=(1, 2)))
    with pytest.raises(ValueError, match="loss_type"):
        st.loss(net, y, "huber")


def test_ve_loss_and_preconditioning_draw_by_draw():
    st = SigmaTraining("ve", sigma_min=0.05, sigma_max=20.0, c_noise_scale=3.0)
    assert st.sigma_sampling == "loguniform"
    y = torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
    loss = st.loss(net, y, generator=torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(2)
    u = torch.rand(4, generator=g)
    sigma = torch.exp(math.log(0.05) + u * (math.log(20.0) - math.log(0.05)))
    n = torch.randn(4, 3, generator=g)
    s = sigma[:, None]
    x = y + s * n
    # VE: D = x + sigma F(x, ln(sigma / 2)), lambda = 1 / sigma^2
    d = x + s * (0.3 * x + 0.1 * 3.0 * torch.log(s / 2))
    torch.testing.assert_close(loss, ((d - y) ** 2).mean(dim=1) / sigma**2)
    c_skip, c_out, c_in, c_noise = st.precondition(torch.tensor([0.5, 4.0]))
    torch.testing.assert_close(c_noise, 3.0 * torch.log(torch.tensor([0.25, 2.0])))
    torch.testing.assert_close(c_out, torch.tensor([0.5, 4.0]))
    torch.testing.assert_close(c_skip, torch.ones(2))
    torch.testing.assert_close(c_in, torch.ones(2))


def test_sample_sigma_reproduces_the_formulas_with_and_without_a_generator():
    st = SigmaTraining("edm", p_mean=0.3, p_std=0.7)
    s = st.sample_sigma(6, generator=torch.Generator().manual_seed(9))
    z = torch.randn(6, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(s, torch.exp(0.3 + 0.7 * z))
    torch.manual_seed(5)
    s = st.sample_sigma(6, device="cpu")
    torch.manual_seed(5)
    torch.testing.assert_close(s, torch.exp(0.3 + 0.7 * torch.randn(6)))
    assert s.device.type == "cpu"
    # log-uniform chosen explicitly for an EDM model
    lu = SigmaTraining("edm", sigma_min=0.1, sigma_max=10.0, sigma_sampling="loguniform")
    s = lu.sample_sigma(6, generator=torch.Generator().manual_seed(9))
    u = torch.rand(6, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(s, torch.exp(math.log(0.1) + u * (math.log(10.0) - math.log(0.1))))
    torch.manual_seed(5)
    s = lu.sample_sigma(6)
    torch.manual_seed(5)
    torch.testing.assert_close(s, torch.exp(math.log(0.1) + torch.rand(6) * math.log(100.0)))
    # and log-normal for a VE model
    ve = SigmaTraining("ve", sigma_sampling="lognormal", p_mean=0.0, p_std=1.0)
    s = ve.sample_sigma(6, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(
        s, torch.exp(torch.randn(6, generator=torch.Generator().manual_seed(9)))
    )
    with pytest.raises(ValueError, match="sigma_sampling"):
        SigmaTraining("edm", sigma_sampling="uniform")


def test_defaults_are_edms():
    st = SigmaTraining()
    assert (st.kind, st.sigma_data, st.p_mean, st.p_std) == ("edm", 0.5, -1.2, 1.2)
    assert (st.sigma_min, st.sigma_max, st.sigma_sampling, st.c_noise_scale) == (
        0.002,
        80.0,
        "lognormal",
        1.0,
    )


def test_denoise_scalar_and_batched_sigma():
    st = SigmaTraining("edm", sigma_data=0.5, c_noise_scale=250.0)
    x = torch.tensor([[1.0, 2.0], [-1.0, 0.5], [0.0, 3.0]], dtype=torch.float64)
    seen = []

    def spy(x_in, c_noise):
        seen.append((x_in, c_noise))
        return net(x_in, c_noise)

    out = st.denoise(spy, x, torch.tensor(1.5))  # 0-d sigma: one per batch row
    s = torch.full((3, 1), 1.5, dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = edm_scalings(s, 0.5)
    expected = c_skip * x + c_out * (0.3 * c_in * x + 0.1 * 250.0 * c_noise)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    assert out.dtype == torch.float64
    assert seen[0][1].shape == (3,)
    torch.testing.assert_close(seen[0][1], torch.full((3,), 250.0 * math.log(1.5) / 4))
    sig = torch.tensor([0.1, 1.0, 30.0])
    out = st.denoise(net, x, sig)
    c_skip, c_out, c_in, c_noise = edm_scalings(sig.double()[:, None], 0.5)
    torch.testing.assert_close(
        out, c_skip * x + c_out * (0.3 * c_in * x + 0.1 * 250.0 * c_noise), rtol=1e-6, atol=1e-6
    )  # the scalings are float32
    # loss weight 1 / c_out^2
    w = st.loss_weight(sig)
    torch.testing.assert_close(w, (sig**2 + 0.25) / (sig * 0.5) ** 2)
    torch.testing.assert_close(SigmaTraining("ve").loss_weight(sig), 1 / sig**2)


def test_low_precision_data_keeps_its_dtype():
    """bf16 latents: the float32 scalings and noise are cast to the data's dtype (sgm / EDM2 practice)."""
    st = SigmaTraining("edm", sigma_data=0.5)

    def net(x_in, c_noise):  # a network that computes in its input's dtype
        return 0.3 * x_in + (0.1 * c_noise).to(x_in.dtype)[:, None]

    x = torch.tensor([[1.0, -2.0]], dtype=torch.bfloat16)
    out = st.denoise(net, x, torch.tensor([2.0]))
    assert out.dtype == torch.bfloat16
    s = torch.tensor([[2.0]])
    c_skip, c_out, c_in, c_noise = edm_scalings(s, 0.5)
    c_skip, c_out, c_in = (c.to(torch.bfloat16) for c in (c_skip, c_out, c_in))
    f = 0.3 * (c_in * x) + (0.1 * c_noise).to(torch.bfloat16)
    torch.testing.assert_close(out, c_skip * x + c_out * f)
    y = torch.tensor([[0.3, -0.7, 1.1]], dtype=torch.bfloat16)
    loss = st.loss(net, y, generator=torch.Generator().manual_seed(8))
    assert loss.dtype == torch.bfloat16
    g = torch.Generator().manual_seed(8)
    sigma = torch.exp(-1.2 + 1.2 * torch.randn(1, generator=g))
    n = torch.randn(1, 3, generator=g).to(torch.bfloat16)  # the noise in the data's dtype
    xn = y + sigma.to(torch.bfloat16)[:, None] * n
    d = st.denoise(net, xn, sigma)
    expected = st.loss_weight(sigma).to(torch.bfloat16) * ((d - y) ** 2).mean(dim=1)
    torch.testing.assert_close(loss, expected)
    # the scalings themselves are float32 whatever sigma's dtype
    for c in st.precondition(torch.tensor([0.5, 4.0], dtype=torch.float64)):
        assert c.dtype == torch.float32
