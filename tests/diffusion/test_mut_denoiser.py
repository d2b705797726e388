"""Denoisers D(x; sigma) against the EDM Table 1 formulas and an oracle network (mutation tests).

For x = x_0 + sigma n the VP state is x_vp = x / sqrt(1 + sigma^2) = sqrt(a) x_0 + sqrt(1 - a) n
with a = 1 / (1 + sigma^2). A network that returns the true target (n, x_0 or
v = sqrt(a) n - sqrt(1 - a) x_0) must give D = x_0 exactly, in every parameterization.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ldm.diffusion import alphas_cumprod_from_betas, make_beta_schedule
from ldm.diffusion.denoiser import (
    DiscreteDenoiser,
    SigmaDenoiser,
    call_model,
    check_parameterization,
)
from ldm.diffusion.discretization import Level
from ldm.diffusion.edm import SigmaTraining
from ldm.diffusion.gaussian import eps_x0_at

pytestmark = pytest.mark.usefixtures("one_thread")

AC = alphas_cumprod_from_betas(make_beta_schedule("linear", 1000, 0.00085, 0.012))
LOG_SIGMAS = np.log(np.sqrt((1 - AC.numpy()) / AC.numpy()))


def t_ref(sigma: float) -> float:
    """Fractional timestep of sigma: linear interpolation of t over log(sigma) (k-diffusion)."""
    return float(np.interp(math.log(sigma), LOG_SIGMAS, np.arange(1000)))


def oracle(x0: torch.Tensor, n: torch.Tensor, sigma: float, param: str, seen: list):
    a = 1 / (1 + sigma**2)
    target = {"eps": n, "x0": x0, "v": math.sqrt(a) * n - math.sqrt(1 - a) * x0}[param]

    def model_fn(x_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen.append((x_in.clone(), t.clone()))
        return target

    return model_fn


@pytest.mark.parametrize("param", ["eps", "x0", "v"])
@pytest.mark.parametrize("sigma", [0.3, 2.5])
def test_discrete_denoiser_recovers_x0_from_the_oracle_network(param, sigma):
    g = torch.Generator().manual_seed(3)
    x0, n = (
        torch.randn(2, 3, generator=g, dtype=torch.float64),
        torch.randn(2, 3, generator=g, dtype=torch.float64),
    )
    x = x0 + sigma * n
    seen: list = []
    d = DiscreteDenoiser(AC, param)
    out = d.denoise(oracle(x0, n, sigma, param, seen), x, sigma)
    torch.testing.assert_close(out, x0)
    ((x_in, t),) = seen
    torch.testing.assert_close(x_in, x / math.sqrt(1 + sigma**2))  # c_in x: the VP state
    assert t.dtype == torch.float32 and t.shape == (2,)
    assert t.tolist() == pytest.approx([t_ref(sigma)] * 2, abs=1e-3)
    assert t[0] != round(float(t[0]))  # fractional unless rounded
    # eps_x0 at a VP level (no timestep: the network is evaluated at t(sigma))
    a = 1 / (1 + sigma**2)
    seen.clear()
    eps, x0_hat = d.eps_x0(oracle(x0, n, sigma, param, seen), x / math.sqrt(1 + sigma**2),
                           Level(sigma, None, a))  # fmt: skip
    torch.testing.assert_close(eps, n)
    torch.testing.assert_close(x0_hat, x0)
    assert float(seen[0][1][0]) == pytest.approx(t_ref(sigma), abs=1e-3)


def test_discrete_denoiser_rounding_ranges_and_level_timestep():
    d = DiscreteDenoiser(AC, "eps", round_timesteps=True)
    sig = np.exp(LOG_SIGMAS)
    assert d.sigma_min == pytest.approx(sig[0], rel=1e-12)
    assert d.sigma_max == pytest.approx(sig[-1], rel=1e-12)
    assert d.parameterization == "eps" and d.schedule.num_timesteps == 1000
    assert d.t_of(1.0) == round(t_ref(1.0)) and d.t_of(1.0) != t_ref(1.0)
    assert DiscreteDenoiser(AC).t_of(1.0) == pytest.approx(t_ref(1.0), abs=1e-7)
    # linear interpolation of sigma itself (diffusers' interpolation_type="linear")
    lin = DiscreteDenoiser(AC, interpolation="linear")
    t_lin = float(np.interp(1.0, sig, np.arange(1000)))
    assert lin.t_of(1.0) == pytest.approx(t_lin, abs=1e-7)
    assert abs(t_lin - t_ref(1.0)) > 1e-4  # the two interpolations differ
    # a level with its own timestep: the network sees that timestep, and alpha_bar of the level
    seen = []

    def model_fn(x, t):
        seen.append(t.clone())
        return torch.full_like(x, 0.25)

    a = float(AC[400])
    x = torch.ones(2, 2)
    eps, x0 = d.eps_x0(model_fn, x, Level(123.0, 400, a))
    assert seen[0].tolist() == [400.0, 400.0]
    torch.testing.assert_close(eps, torch.full((2, 2), 0.25))
    torch.testing.assert_close(x0, (x - math.sqrt(1 - a) * 0.25) / math.sqrt(a))


@pytest.mark.parametrize("param", ["eps", "x0", "v"])
def test_discrete_targets(param):
    g = torch.Generator().manual_seed(4)
    x0, n = torch.randn(3, 2, generator=g), torch.randn(3, 2, generator=g)
    t = torch.tensor([0, 500, 999])
    out = DiscreteDenoiser(AC, param).target(x0, n, t, AC)
    a = AC[t].float()[:, None]
    expected = {"eps": n, "x0": x0, "v": a.sqrt() * n - (1 - a).sqrt() * x0}[param]
    torch.testing.assert_close(out, expected)


def test_eps_x0_at_every_parameterization():
    g = torch.Generator().manual_seed(5)
    x0, n = (
        torch.randn(4, generator=g, dtype=torch.float64),
        torch.randn(4, generator=g, dtype=torch.float64),
    )
    a = 0.3
    x_t = math.sqrt(a) * x0 + math.sqrt(1 - a) * n
    v = math.sqrt(a) * n - math.sqrt(1 - a) * x0
    for param, out in (("eps", n), ("x0", x0), ("v", v)):
        eps, x0_hat = eps_x0_at(out, x_t, a, param)
        torch.testing.assert_close(eps, n)
        torch.testing.assert_close(x0_hat, x0)
    with pytest.raises(ValueError, match="parameterization"):
        eps_x0_at(n, x_t, a, "score")


def test_parameterization_checks_and_model_output_shape():
    check_parameterization("v")
    with pytest.raises(ValueError, match="parameterization"):
        check_parameterization("score")
    with pytest.raises(ValueError, match="parameterization"):
        DiscreteDenoiser(AC, "score")
    seen = []

    def model_fn(x, t):
        seen.append(t)
        return x * 2

    out = call_model(model_fn, torch.ones(3, 2, dtype=torch.float64), 7)
    torch.testing.assert_close(out, torch.full((3, 2), 2.0, dtype=torch.float64))
    assert seen[0].dtype == torch.float32 and seen[0].tolist() == [7.0, 7.0, 7.0]
    with pytest.raises(ValueError, match="shaped like x"):
        call_model(lambda x, t: x[:1], torch.ones(3, 2), 1.0)


def test_sigma_denoiser_is_the_edm_preconditioning():
    st = SigmaTraining("edm", sigma_data=0.5, sigma_min=0.01, sigma_max=50.0)
    d = SigmaDenoiser(st)
    assert (d.sigma_min, d.sigma_max, d.parameterization) == (0.01, 50.0, "edm")
    assert d.default_ladder == {"karras": True} and d.schedule is None
    seen = []

    def net(x_in, c_noise):
        seen.append((x_in.clone(), c_noise.clone()))
        return torch.full_like(x_in, 0.7)

    x, s = torch.tensor([[1.0, -2.0], [0.5, 3.0]]), 2.0
    out = d.denoise(net, x, s)
    sd2 = 0.25
    c_skip, c_out, c_in = (
        sd2 / (s**2 + sd2),
        s * 0.5 / math.sqrt(s**2 + sd2),
        1 / math.sqrt(s**2 + sd2),
    )
    torch.testing.assert_close(out, c_skip * x + c_out * 0.7)
    torch.testing.assert_close(seen[0][0], c_in * x)
    torch.testing.assert_close(seen[0][1], torch.full((2,), math.log(s) / 4))
    # the VP view of a sigma denoiser: x = x_vp sqrt(1 + s^2), eps = (x - D) / s
    seen.clear()
    x_vp = x / math.sqrt(1 + s**2)
    eps, x0 = d.eps_x0(net, x_vp, Level(s, None, 1 / (1 + s**2)))
    torch.testing.assert_close(x0, c_skip * x + c_out * 0.7)
    torch.testing.assert_close(eps, (x - x0) / s)
