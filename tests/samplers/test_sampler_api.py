"""Entry point, registry, options, noise reproducibility, sigma <-> t interpolation, spacings vs diffusers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ldm.diffusion import alphas_cumprod_from_betas, make_beta_schedule
from ldm.diffusion.discretization import (
    DiscreteSchedule,
    build_sigmas,
    karras_sigmas,
    spaced_timesteps,
    vp_timesteps,
)
from ldm.samplers import SAMPLERS, register_sampler, sample

AC = alphas_cumprod_from_betas(make_beta_schedule("linear", 1000, 0.00085, 0.012))


def toy(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return 0.5 * torch.tanh(x) + 0.001 * t.reshape(-1, *[1] * (x.ndim - 1))  # [B, 1, ...]


def test_unknown_sampler_lists_valid_names():
    with pytest.raises(ValueError) as err:
        sample(toy, torch.randn(2, 3), sampler="dpmpp_9m", alphas_cumprod=AC)
    msg = str(err.value)
    assert "dpmpp_9m" in msg
    for name in ("ddim", "dpmpp_2m", "euler_a", "unipc", "dpm_adaptive"):
        assert name in msg


def test_option_errors_name_the_fix():
    with pytest.raises(ValueError, match="valid options.*karras"):
        sample(toy, torch.randn(2, 3), sampler="euler", steps=3, alphas_cumprod=AC, karas=True)
    with pytest.raises(ValueError, match="valid options.*eta"):
        sample(toy, torch.randn(2, 3), sampler="ddim", steps=3, alphas_cumprod=AC, s_churn=1.0)
    with pytest.raises(ValueError, match="alphas_cumprod"):
        sample(toy, torch.randn(2, 3), sampler="ddim", steps=3)
    with pytest.raises(ValueError, match="parameterization"):
        sample(
            toy,
            torch.randn(2, 3),
            sampler="euler",
            steps=3,
            alphas_cumprod=AC,
            parameterization="score",
        )
    with pytest.raises(ValueError, match="x0="):
        sample(toy, torch.randn(2, 3), sampler="euler", steps=3, alphas_cumprod=AC, strength=0.5)
    with pytest.raises(ValueError, match="shaped like x"):
        sample(lambda x, t: x[:1], torch.randn(2, 3), sampler="euler", steps=3, alphas_cumprod=AC)


def test_register_sampler_extends_the_entry_point():
    def halve(model_fn, x_T, *, steps, alphas_cumprod, parameterization, **options):
        return x_T / 2

    register_sampler("test_halve", halve)
    try:
        assert "test_halve" in SAMPLERS
        x = torch.randn(2, 3)
        torch.testing.assert_close(sample(toy, x, sampler="test_halve", alphas_cumprod=AC), x / 2)
        with pytest.raises(ValueError, match="already registered"):
            register_sampler("test_halve", lambda *a, **k: None)
    finally:
        SAMPLERS.pop("test_halve")


@pytest.mark.parametrize("name", ["euler_a", "ddim", "dpmpp_sde", "ddpm", "dpmpp_3m_sde"])
def test_generator_reproducibility(name):
    x = torch.randn(2, 3, 4)
    opts = {"eta": 1.0} if name == "ddim" else {}

    def run(seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return sample(toy, x, sampler=name, steps=6, alphas_cumprod=AC, generator=g, **opts)

    torch.testing.assert_close(run(0), run(0), rtol=0, atol=0)
    assert (run(0) - run(1)).abs().max() > 1e-3


MINE = [
    "ddpm",
    "ddim",
    "plms",
    "dpmpp_2m",
    "dpmpp_2m_sde",
    "dpmpp_3m_sde",
    "dpmpp_2s_a",
    "dpmpp_sde",
    "euler",
    "euler_a",
    "heun",
    "dpm_2",
    "dpm_2_a",
    "lms",
    "unipc",
    "dpm_adaptive",
]


@pytest.mark.parametrize("name", MINE)
def test_every_sampler_handles_few_steps_dtypes_img2img_and_masks(name):
    for steps in (1, 2):
        for dtype in (torch.float32, torch.float64):
            x = torch.randn(1, 2, 3, 3, dtype=dtype)
            y = sample(toy, x, sampler=name, steps=steps, alphas_cumprod=AC, disable=True)
            assert y.dtype == dtype and y.shape == x.shape and torch.isfinite(y).all()
    x0 = torch.zeros(1, 2, 3, 3)
    y = sample(
        toy,
        x0 + 1,
        sampler=name,
        steps=3,
        alphas_cumprod=AC,
        x0=x0,
        strength=0.5,
        mask=torch.ones(1, 1, 3, 3),
    )
    torch.testing.assert_close(y, x0, rtol=0, atol=0)


def test_ddim_accepts_explicit_per_step_noise():
    x = torch.randn(2, 3)
    g = torch.Generator().manual_seed(2)
    drawn = [torch.randn(2, 3, generator=g) for _ in range(5)]
    a = sample(toy, x, sampler="ddim", steps=5, alphas_cumprod=AC, eta=1.0, noise=drawn)
    b = sample(
        toy,
        x,
        sampler="ddim",
        steps=5,
        alphas_cumprod=AC,
        eta=1.0,
        generator=torch.Generator().manual_seed(2),
    )
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_callback_and_progress_bar(capsys):
    seen = []
    sample(
        toy,
        torch.randn(2, 3),
        sampler="heun",
        steps=5,
        alphas_cumprod=AC,
        disable=False,
        callback=seen.append,
    )
    assert [d["i"] for d in seen] == list(range(5))
    assert {"x", "sigma", "denoised"} <= set(seen[0])
    assert "heun" in capsys.readouterr().err


def test_log_sigma_interpolation_and_inverse():
    sched = DiscreteSchedule(AC)
    s = sched.sigmas
    assert float(sched.t_to_sigma(10.5)) == pytest.approx(
        math.sqrt(float(s[10] * s[11])), rel=1e-12
    )
    assert float(sched.t_to_sigma(10.25)) == pytest.approx(
        float(s[10] ** 0.75 * s[11] ** 0.25), rel=1e-12
    )
    t = torch.tensor([0.0, 3.7, 500.5, 998.99, 999.0], dtype=torch.float64)
    torch.testing.assert_close(sched.sigma_to_t(sched.t_to_sigma(t)), t)
    lin = DiscreteSchedule(AC, interpolation="linear")
    assert float(lin.t_to_sigma(10.5)) == pytest.approx(float(s[10] + s[11]) / 2, rel=1e-12)
    torch.testing.assert_close(lin.sigma_to_t(lin.t_to_sigma(t)), t)


def test_sigma_solvers_pass_fractional_t_from_log_sigma():
    seen = []

    def model(x, t):
        seen.append(float(t[0]))
        return torch.zeros_like(x)

    sample(model, torch.randn(1, 2), sampler="euler", steps=6, alphas_cumprod=AC, karras=True)
    sig = karras_sigmas(
        6, float(DiscreteSchedule(AC).sigma_min), float(DiscreteSchedule(AC).sigma_max)
    )
    expected = DiscreteSchedule(AC).sigma_to_t(sig).tolist()
    np.testing.assert_allclose(seen, expected, atol=1e-3)
    assert any(abs(v - round(v)) > 1e-3 for v in seen)
    seen.clear()
    sample(
        model,
        torch.randn(1, 2),
        sampler="euler",
        steps=6,
        alphas_cumprod=AC,
        karras=True,
        round_timesteps=True,
    )
    assert all(v == round(v) for v in seen)


SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("steps", [7, 20, 50])
def test_timestep_spacings_match_diffusers(spacing, steps, diffusers):
    e = diffusers.EulerDiscreteScheduler(**SD, timestep_spacing=spacing, steps_offset=1)
    e.set_timesteps(steps)
    np.testing.assert_allclose(
        spaced_timesteps(spacing, steps, 1000, 1, "k"), e.timesteps.numpy(), atol=1e-3
    )
    d = diffusers.DPMSolverMultistepScheduler(**SD, timestep_spacing=spacing, steps_offset=1)
    d.set_timesteps(steps)
    np.testing.assert_array_equal(
        spaced_timesteps(spacing, steps, 1000, 1, "dpm"), d.timesteps.numpy()
    )
    if spacing != "linspace":
        s = diffusers.DDIMScheduler(**SD, timestep_spacing=spacing, steps_offset=1)
        s.set_timesteps(steps)
        assert vp_timesteps(steps, 1000, spacing, 1) == s.timesteps.tolist()


def test_karras_and_linspace_sigmas_match_diffusers(diffusers):
    for karras in (False, True):
        e = diffusers.EulerDiscreteScheduler(**SD, use_karras_sigmas=karras)
        e.set_timesteps(15)
        ours = build_sigmas(DiscreteSchedule(AC, "linear"), 15, karras=karras)
        np.testing.assert_allclose(ours.numpy(), e.sigmas.numpy(), rtol=5e-5)  # theirs: float32
