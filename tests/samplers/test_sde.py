"""Score-SDE samplers on Gaussian data, where the ideal denoiser and the transport are analytic.

Data x_0 ~ N(mu, s^2) per element under SD's schedule; the ideal eps-predictor at alpha_bar a is
eps*(x_t) = sqrt(1 - a) (x_t - sqrt(a) mu) / (a s^2 + 1 - a). Every sampler must land on N(mu, s^2);
the probability-flow ODE must reproduce the closed-form transport
x_VE(sigma) - mu ∝ sqrt(s^2 + sigma^2), followed by the Tweedie denoiser.
"""

import math

import pytest
import torch

from ldm.diffusion import make_beta_schedule
from ldm.diffusion.discretization import DiscreteSchedule, build_sigmas
from ldm.samplers import SAMPLERS, sample
from ldm.samplers.sde import SDE, probability_flow, reverse_sde

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread is fastest


MU, S = 0.5, 0.3
AC = torch.cumprod(1 - make_beta_schedule("linear", 1000, 0.00085, 0.012), 0)
SCHED = DiscreteSchedule(AC)
SHAPE = (32, 1, 32, 32)  # Langevin step sizes use per-sample norms: 1024 elements each


def ideal_model(parameterization: str = "eps"):
    def model_fn(x, t):
        sigma = SCHED.t_to_sigma(t.double().cpu()).to(x).view(-1, 1, 1, 1)
        a = 1 / (1 + sigma**2)
        eps = (1 - a).sqrt() * (x - a.sqrt() * MU) / (a * S**2 + 1 - a)
        if parameterization == "eps":
            return eps
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        return a.sqrt() * eps - (1 - a).sqrt() * x0  # v

    return model_fn


def _noise(seed=0):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_sde_names_are_registered():
    for name in ("vp_sde", "ve_sde", "vp_pc", "ve_pc", "probability_flow", "annealed_langevin"):
        assert name in SAMPLERS


@pytest.mark.parametrize("name", ["vp_sde", "ve_sde", "vp_pc", "ve_pc"])
def test_reverse_sde_samplers_land_on_the_data_distribution(name):
    g = torch.Generator().manual_seed(1)
    x = sample(ideal_model(), _noise(), sampler=name, steps=400, alphas_cumprod=AC, generator=g)
    assert abs(x.mean().item() - MU) < 0.02
    assert x.std().item() == pytest.approx(S, rel=0.03)


def test_v_parameterization_gives_the_same_sde_samples():
    a = sample(
        ideal_model("eps"),
        _noise(),
        sampler="ve_sde",
        steps=50,
        alphas_cumprod=AC,
        generator=torch.Generator().manual_seed(3),
    )
    b = sample(
        ideal_model("v"),
        _noise(),
        sampler="ve_sde",
        steps=50,
        alphas_cumprod=AC,
        parameterization="v",
        generator=torch.Generator().manual_seed(3),
    )
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def _exact_transport(x_T, sigma_max, sigma_min):
    """PF-ODE from x_VE(sigma_max) = x_T sqrt(1 + sigma_max^2) to sigma_min, then Tweedie."""
    x_ve = x_T * math.sqrt(1 + sigma_max**2)
    x_end = MU + (x_ve - MU) * math.sqrt(S**2 + sigma_min**2) / math.sqrt(S**2 + sigma_max**2)
    return MU + S**2 / (S**2 + sigma_min**2) * (x_end - MU)


@pytest.mark.parametrize("view", ["vp", "ve"])
def test_probability_flow_ode_converges_to_the_exact_transport(view):
    x_T = _noise(2)[:20]
    errors = []
    for steps in (10, 40, 160):
        x = sample(
            ideal_model(), x_T, sampler="probability_flow", steps=steps, alphas_cumprod=AC, sde=view
        )
        ladder = build_sigmas(SCHED, steps, exponential=view == "ve")[:-1]
        exact = _exact_transport(x_T, float(ladder[0]), float(ladder[-1]))
        errors.append((x - exact).abs().max().item())
    assert errors[2] < 2e-3, errors
    assert errors[0] > errors[1] > errors[2]
    # Heun is second order: 4x the steps shrink the error by far more than 4x at fine steps
    assert errors[1] / errors[2] > 6, errors


def test_probability_flow_maps_noise_to_data_statistics():
    x = sample(ideal_model(), _noise(4), sampler="probability_flow", steps=100, alphas_cumprod=AC)
    assert abs(x.mean().item() - MU) < 0.02
    assert x.std().item() == pytest.approx(S, rel=0.03)


def test_annealed_langevin_dynamics_reaches_the_noised_marginal():
    """NCSN: at the last level sigma_L the chain samples N(mu, s^2 + sigma_L^2)."""
    g = torch.Generator().manual_seed(5)
    sigma_l = 0.1
    x_T = _noise(5)[:8]  # fixed step sizes (no per-sample norms): 8192 values suffice
    x = sample(
        ideal_model(),
        x_T,
        sampler="annealed_langevin",
        steps=10,
        alphas_cumprod=AC,
        generator=g,
        n_steps_each=150,
        step_lr=2e-3,
        sigma_min=sigma_l,
        denoise_last=False,
    )
    assert abs(x.mean().item() - MU) < 0.02
    assert x.std().item() == pytest.approx(math.sqrt(S**2 + sigma_l**2), rel=0.03)


def test_functions_work_on_a_plain_ve_denoiser():
    """The solvers take any D(x; sigma): the NCSN analytic denoiser gives the same laws."""

    def denoiser(x, sigma):
        return MU + S**2 / (S**2 + sigma**2) * (x - MU)

    sigmas = torch.logspace(math.log10(50.0), math.log10(0.01), 300, dtype=torch.float64)
    x_T = _noise(6) * 50.0
    x = probability_flow(denoiser, x_T, sigmas, SDE("ve"))
    x_end = MU + (x_T - MU) * math.sqrt(S**2 + 0.01**2) / math.sqrt(S**2 + 50.0**2)
    exact = MU + S**2 / (S**2 + 0.01**2) * (x_end - MU)
    assert (x - exact).abs().max().item() < 1e-3
    from ldm.samplers.context import SamplerContext

    y = reverse_sde(
        denoiser, x_T, sigmas, SDE("ve"), SamplerContext(torch.Generator().manual_seed(7))
    )
    assert abs(y.mean().item() - MU) < 0.02
    assert y.std().item() == pytest.approx(S, rel=0.03)


def test_unknown_option_is_reported():
    with pytest.raises(ValueError, match="unknown option"):
        sample(ideal_model(), _noise()[:2], sampler="vp_sde", steps=2, alphas_cumprod=AC, foo=1)
