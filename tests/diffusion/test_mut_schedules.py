"""Beta schedules' defaults and aliases, posterior clamp / blend, dtypes (mutation tests).

References: CompVis ``make_beta_schedule`` (defaults linear_start=1e-4, linear_end=2e-2,
cosine_s=8e-3; "linear" in sqrt space), diffusers' ``DDPMScheduler`` betas, DDPM eqs. 6-7.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ldm.diffusion import (
    alphas_cumprod_from_betas,
    make_beta_schedule,
    posterior,
    q_sample,
    rescale_zero_terminal_snr,
    snr,
)
from ldm.diffusion.gaussian import posterior_coefficients

pytestmark = pytest.mark.usefixtures("one_thread")


def test_default_endpoints_match_diffusers(diffusers):
    for ours, theirs in (("linear", "scaled_linear"), ("sqrt_linear", "linear")):
        ref = diffusers.DDPMScheduler(beta_start=1e-4, beta_end=2e-2, beta_schedule=theirs).betas
        np.testing.assert_allclose(make_beta_schedule(ours, 1000).numpy(), ref.numpy(), rtol=1e-5)
    b = make_beta_schedule("linear_beta", 10)
    np.testing.assert_allclose(b.numpy(), np.linspace(1e-4, 2e-2, 10), rtol=1e-12)
    b = make_beta_schedule("sqrt", 10)
    np.testing.assert_allclose(b.numpy(), np.sqrt(np.linspace(1e-4, 2e-2, 10)), rtol=1e-12)
    b = make_beta_schedule("scaled_linear", 10)
    np.testing.assert_allclose(b.numpy(), np.linspace(1e-2, math.sqrt(2e-2), 10) ** 2, rtol=1e-12)


def test_cosine_default_offset_and_clip():
    T = 50
    f = [math.cos((t / T + 8e-3) / (1 + 8e-3) * math.pi / 2) ** 2 for t in range(T + 1)]
    expected = np.clip(1 - np.array(f[1:]) / np.array(f[:-1]), 0.0, 0.999)
    b = make_beta_schedule("cosine", T)
    assert b.dtype == torch.float64
    np.testing.assert_allclose(b.numpy(), expected, rtol=1e-12, atol=1e-15)
    assert float(b[-1]) == 0.999 and float(b[0]) > 0  # the last step is clipped at 0.999
    # a large offset: the betas stay in [0, 0.999]
    b = make_beta_schedule("cosine", T, cosine_s=0.5)
    f = [math.cos((t / T + 0.5) / 1.5 * math.pi / 2) ** 2 for t in range(T + 1)]
    expected = np.clip(1 - np.array(f[1:]) / np.array(f[:-1]), 0.0, 0.999)
    np.testing.assert_allclose(b.numpy(), expected, rtol=1e-12, atol=1e-15)
    # squaredcos_cap_v2 (Improved DDPM betas_for_alpha_bar) also caps at 0.999
    b = make_beta_schedule("squaredcos_cap_v2", 20)
    f = [math.cos((t / 20 + 0.008) / 1.008 * math.pi / 2) ** 2 for t in range(21)]
    expected = np.minimum(1 - np.array(f[1:]) / np.array(f[:-1]), 0.999)
    np.testing.assert_allclose(b.numpy(), expected, rtol=1e-12, atol=1e-15)


def test_given_betas_win_over_the_schedule_name_and_are_flattened():
    betas = [[0.1, 0.2], [0.3, 0.4]]
    out = make_beta_schedule("linear", 4, given_betas=betas)
    assert out.dtype == torch.float64 and out.shape == (4,)
    np.testing.assert_allclose(out.numpy(), [0.1, 0.2, 0.3, 0.4], rtol=1e-15)
    with pytest.raises(ValueError, match="needs given_betas"):
        make_beta_schedule("given_betas", 4)


def test_alphas_cumprod_and_zero_snr_dtypes():
    betas = torch.tensor([0.1, 0.2, 0.5], dtype=torch.float32)
    ac = alphas_cumprod_from_betas(betas)
    assert ac.dtype == torch.float64
    np.testing.assert_allclose(ac.numpy(), [0.9, 0.9 * 0.8, 0.9 * 0.8 * 0.5], rtol=1e-7)
    out = rescale_zero_terminal_snr(betas)
    assert out.dtype == torch.float32
    # Lin et al. Alg. 1 by hand: sqrt(ac) shifted so the last is 0, scaled so the first is kept
    s = np.sqrt(np.array([0.9, 0.72, 0.36]))
    s = (s - s[-1]) * s[0] / (s[0] - s[-1])
    a = s**2
    expected = 1 - np.concatenate([a[:1], a[1:] / a[:-1]])
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-6)


def test_posterior_clamp_and_partial_blend():
    ac = alphas_cumprod_from_betas(make_beta_schedule("linear", 100, 0.00085, 0.012))
    c = posterior_coefficients(ac)
    # CompVis: log(max(variance, 1e-20)); at t = 0 the variance is 0
    assert float(c["posterior_log_variance_clipped"][0]) == pytest.approx(math.log(1e-20))
    torch.testing.assert_close(
        c["posterior_log_variance_clipped"][1:], c["posterior_variance"][1:].log()
    )
    betas = 1 - ac / torch.cat([ac.new_ones(1), ac[:-1]])
    ac_prev = torch.cat([ac.new_ones(1), ac[:-1]])
    tilde = betas * (1 - ac_prev) / (1 - ac)
    c = posterior_coefficients(ac, v_posterior=0.25)
    torch.testing.assert_close(c["posterior_variance"], 0.75 * tilde + 0.25 * betas)
    # posterior() gathers per sample and casts to the data's dtype
    x0, xt = torch.ones(2, 3), torch.zeros(2, 3)
    mean, var, logvar = posterior(x0, xt, torch.tensor([5, 50]), ac, v_posterior=0.25)
    assert mean.dtype == var.dtype == logvar.dtype == torch.float32
    assert var.shape == (2, 1)
    coef1 = betas * ac_prev.sqrt() / (1 - ac)
    torch.testing.assert_close(mean[:, 0], coef1[[5, 50]].float())
    torch.testing.assert_close(var[:, 0], (0.75 * tilde + 0.25 * betas)[[5, 50]].float())


def test_q_sample_and_snr_take_lists_and_cast():
    ac = alphas_cumprod_from_betas(make_beta_schedule("linear", 100, 0.00085, 0.012))
    x0, n = (
        torch.ones(2, 2, 2, dtype=torch.float64),
        torch.full((2, 2, 2), 2.0, dtype=torch.float64),
    )
    xt = q_sample(x0, [3, 70], n, ac.float())
    assert xt.dtype == torch.float64
    for i, t in enumerate((3, 70)):
        a = float(ac[t])
        torch.testing.assert_close(xt[i], torch.full((2, 2), math.sqrt(a) + 2 * math.sqrt(1 - a),
                                                     dtype=torch.float64), rtol=1e-6, atol=1e-6)  # fmt: skip
    out = snr([3, 70], ac)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ac[[3, 70]] / (1 - ac[[3, 70]]))


def test_float32_schedules_are_used_in_float64():
    """alphas_cumprod given in float32: the coefficients are computed in float64 from those values."""
    ac32 = alphas_cumprod_from_betas(make_beta_schedule("linear", 100, 0.00085, 0.012)).float()
    x0 = torch.ones(1, 1, dtype=torch.float64)
    n = torch.zeros(1, 1, dtype=torch.float64)
    xt = q_sample(x0, torch.tensor([37]), n, ac32)
    assert float(xt[0, 0]) == pytest.approx(math.sqrt(float(ac32[37])), rel=1e-15)
    out = snr(torch.tensor([37]), ac32)
    assert out.dtype == torch.float64
    a = float(ac32[37])
    assert float(out[0]) == pytest.approx(a / (1 - a), rel=1e-15)
