"""Schedules vs diffusers' betas and CompVis formulas; q_sample / posterior; eps-x0-v round trips."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ldm.diffusion import (
    alphas_cumprod_from_betas,
    eps_from_v,
    make_beta_schedule,
    posterior,
    predict_eps_from_x0,
    predict_x0_from_eps,
    q_sample,
    rescale_zero_terminal_snr,
    snr,
    to_eps_x0,
    v_from_eps_x0,
    x0_from_v,
)
from ldm.diffusion.gaussian import posterior_coefficients


def sd_ac() -> torch.Tensor:
    return alphas_cumprod_from_betas(make_beta_schedule("linear", 1000, 0.00085, 0.012))


@pytest.mark.parametrize(
    "ours, theirs",
    [
        ("linear", "scaled_linear"),
        ("scaled_linear", "scaled_linear"),
        ("sqrt_linear", "linear"),
        ("squaredcos_cap_v2", "squaredcos_cap_v2"),
    ],
)
def test_betas_match_diffusers(ours, theirs, diffusers):
    start, end = (0.00085, 0.012) if "linear" in theirs else (1e-4, 2e-2)
    b = make_beta_schedule(ours, 1000, start, end)
    ref = diffusers.DDPMScheduler(beta_start=start, beta_end=end, beta_schedule=theirs).betas
    assert b.dtype == torch.float64 and b.shape == (1000,)
    torch.testing.assert_close(b.float(), ref, rtol=1e-5, atol=1e-7)


def test_compvis_linear_is_sd_schedule_and_sqrt_cosine_formulas():
    # CompVis "linear" (SD's default) = linspace in sqrt(beta), squared; alphas_cumprod[-1] of SD
    ac = sd_ac()
    assert abs(float(ac[-1]) - 0.00466010) < 1e-7  # golden value of SD v1/v2
    b = make_beta_schedule("sqrt", 10, 1e-4, 2e-2)
    torch.testing.assert_close(b, torch.linspace(1e-4, 2e-2, 10, dtype=torch.float64).sqrt())
    b = make_beta_schedule("cosine", 1000, cosine_s=8e-3)
    f = [math.cos((t / 1000 + 8e-3) / (1 + 8e-3) * math.pi / 2) ** 2 for t in range(1001)]
    expected = np.clip(1 - np.array(f[1:]) / np.array(f[:-1]), 0, 0.999)
    np.testing.assert_allclose(b.numpy(), expected, rtol=1e-9, atol=1e-12)
    assert float(b.max()) <= 0.999


def test_given_betas_and_errors():
    betas = torch.linspace(1e-4, 0.02, 50)
    out = make_beta_schedule("given_betas", 50, given_betas=betas)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out.float(), betas)
    with pytest.raises(ValueError, match="one beta per"):
        make_beta_schedule("given_betas", 40, given_betas=betas)
    with pytest.raises(ValueError, match="expected one of"):
        make_beta_schedule("quadratic", 10)


def test_zero_terminal_snr_matches_diffusers_and_keeps_first_alpha(diffusers):
    from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr as ref_fn

    betas = make_beta_schedule("linear", 1000, 0.00085, 0.012)
    ours = rescale_zero_terminal_snr(betas)
    torch.testing.assert_close(ours.float(), ref_fn(betas.float()), rtol=1e-4, atol=1e-6)
    ac_new, ac_old = alphas_cumprod_from_betas(ours), alphas_cumprod_from_betas(betas)
    assert float(ac_new[-1]) == pytest.approx(0.0, abs=1e-15)
    assert float(ac_new[0]) == pytest.approx(float(ac_old[0]), rel=1e-12)
    assert torch.all(ac_new[1:] < ac_new[:-1])


def test_q_sample_and_snr(diffusers):
    ac = sd_ac()
    x0, noise = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    t = torch.tensor([0, 500, 999])
    xt = q_sample(x0, t, noise, ac)
    for i, ti in enumerate(t.tolist()):
        a = float(ac[ti])
        torch.testing.assert_close(xt[i], math.sqrt(a) * x0[i] + math.sqrt(1 - a) * noise[i])
    torch.testing.assert_close(snr(t, ac), ac[t] / (1 - ac[t]))
    ref = diffusers.DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    torch.testing.assert_close(xt, ref.add_noise(x0, noise, t), rtol=1e-5, atol=1e-5)


def test_posterior_matches_bayes_and_diffusers_variance(diffusers):
    ac = sd_ac()
    c = posterior_coefficients(ac)
    ref = diffusers.DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    ts = [1, 10, 500, 999]
    ours = torch.stack([c["posterior_variance"][t] for t in ts]).float()
    theirs = torch.stack([ref._get_variance(t) for t in ts]).float()
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-10)  # theirs is float32
    # Gaussian conditioning: q(x_{t-1}|x_t,x0) ∝ q(x_t|x_{t-1}) q(x_{t-1}|x0)
    t = 300
    a_t, a_p = float(ac[t]), float(ac[t - 1])
    alpha, beta = a_t / a_p, 1 - a_t / a_p
    prec = alpha / beta + 1 / (1 - a_p)
    x0, xt = torch.randn(2, 5), torch.randn(2, 5)
    mean_expected = (math.sqrt(alpha) / beta * xt + math.sqrt(a_p) / (1 - a_p) * x0) / prec
    mean, var, logvar = posterior(x0, xt, torch.tensor([t, t]), ac)
    torch.testing.assert_close(mean, mean_expected.float(), rtol=1e-4, atol=1e-5)
    assert float(var[0, 0]) == pytest.approx(1 / prec, rel=1e-5)
    assert float(logvar[0, 0]) == pytest.approx(math.log(1 / prec), rel=1e-5)
    # t = 0 has zero variance; the clipped log-variance stays finite (CompVis clamp at 1e-20)
    assert float(c["posterior_variance"][0]) == 0.0
    assert math.isfinite(float(c["posterior_log_variance_clipped"][0]))
    # v_posterior blends toward beta_t
    c1 = posterior_coefficients(ac, v_posterior=1.0)
    torch.testing.assert_close(c1["posterior_variance"][1:], 1 - ac[1:] / ac[:-1])


def test_conversions_round_trip(diffusers):
    ac = sd_ac()
    x0, eps = (
        torch.randn(4, 3, 5, 5, dtype=torch.float64),
        torch.randn(4, 3, 5, 5, dtype=torch.float64),
    )
    t = torch.tensor([0, 10, 400, 999])
    xt = q_sample(x0, t, eps, ac)
    v = v_from_eps_x0(eps, x0, t, ac)
    torch.testing.assert_close(predict_x0_from_eps(xt, t, eps, ac), x0)
    torch.testing.assert_close(predict_eps_from_x0(xt, t, x0, ac), eps)
    torch.testing.assert_close(x0_from_v(xt, t, v, ac), x0)
    torch.testing.assert_close(eps_from_v(xt, t, v, ac), eps)
    for param, out in (("eps", eps), ("x0", x0), ("v", v)):
        e, x = to_eps_x0(out, xt, t, ac, param)
        torch.testing.assert_close(e, eps)
        torch.testing.assert_close(x, x0)
    ref = diffusers.DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    torch.testing.assert_close(
        v.float(), ref.get_velocity(x0.float(), eps.float(), t), rtol=1e-5, atol=1e-5
    )
    with pytest.raises(ValueError, match="parameterization"):
        to_eps_x0(eps, xt, t, ac, "score")
