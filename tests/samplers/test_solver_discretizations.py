"""Every solver x every discretization, on the analytic Gaussian target.

For data x_0 ~ N(MU, S^2) the ideal denoiser is closed form, and so is the marginal at any noise
level; starting each run at that exact marginal, every solver on every ladder (the three timestep
spacings, Karras and exponential sigmas) must land on N(MU, S^2). One driver builds all ladders,
so a solver never refuses a discretization (``ddim`` with Karras sigmas included).
"""

from __future__ import annotations

import math

import pytest
import torch

from ldm.diffusion import alphas_cumprod_from_betas, make_beta_schedule
from ldm.diffusion.discretization import DiscreteSchedule, make_ladder
from ldm.samplers import SAMPLERS, sample
from ldm.samplers.driver import SOLVERS

pytestmark = pytest.mark.usefixtures("one_thread")

MU, S = 0.5, 0.3
AC = alphas_cumprod_from_betas(make_beta_schedule("linear", 1000, 0.00085, 0.012))
DISCRETIZATIONS = {
    "linspace": {"timestep_spacing": "linspace"},
    "leading": {"timestep_spacing": "leading", "steps_offset": 1},
    "trailing": {"timestep_spacing": "trailing"},
    "karras": {"karras": True},
    "exponential": {"exponential": True},
}
# Steps: Karras / exponential ladders are accurate at 60 steps; the uniform timestep spacings put
# few levels where SD's schedule needs them (all solvers under-disperse by ~7% at 60 steps, the
# error of the ladder, not of the solver), and Euler-Maruyama (the SDE family) is first order.
# Ancestral DDPM / Euler converge slowly (fresh noise each step): 800 steps.
STEPS_SIGMA_LADDER, STEPS_SPACING, STEPS_SDE, STEPS_ANCESTRAL = 60, 250, 250, 800
ANCESTRAL = ("ddpm", "euler_a")
SDE = ("vp_sde", "ve_sde", "vp_pc", "ve_pc", "annealed_langevin")
TOL = {"annealed_langevin": 0.08, "ve_sde": 0.05, "vp_sde": 0.05, "vp_pc": 0.05, "ve_pc": 0.05}
OPTIONS = {"annealed_langevin": {"n_steps_each": 6, "step_lr": 2e-3}}
SOLVER_NAMES = sorted(n for n in SOLVERS if not n.startswith("test_"))


def ideal_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """E[eps | x_t] for x_0 ~ N(MU, S^2) at (fractional) timesteps t."""
    sigma = DiscreteSchedule(AC).t_to_sigma(t.double())[:, None]  # [B, 1]
    a2 = 1 / (1 + sigma**2)
    a, b = a2.sqrt(), (1 - a2).sqrt()
    return (b * (x.double() - a * MU) / (a2 * S**2 + b**2)).float()


def test_every_registered_solver_is_in_the_matrix():
    assert set(SOLVER_NAMES) >= {
        "ddpm", "ddim", "plms", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m_sde", "dpmpp_2s_a",
        "dpmpp_sde", "euler", "euler_a", "heun", "dpm_2", "dpm_2_a", "lms", "unipc",
        "dpm_adaptive", *SDE, "probability_flow",
    }  # fmt: skip
    assert set(SOLVER_NAMES) <= set(SAMPLERS)


@pytest.mark.parametrize("disc", sorted(DISCRETIZATIONS))
@pytest.mark.parametrize("name", SOLVER_NAMES)
def test_solver_on_discretization_lands_on_the_data(name, disc):
    steps = STEPS_SPACING if "timestep_spacing" in DISCRETIZATIONS[disc] else STEPS_SIGMA_LADDER
    if name in SDE:
        steps = STEPS_SDE
    if name in ANCESTRAL:
        steps = STEPS_ANCESTRAL
    opts = {**DISCRETIZATIONS[disc], **OPTIONS.get(name, {})}
    view = SOLVERS[name].view
    ladder = make_ladder(  # the ladder the driver builds, for the first level's sigma
        steps,
        schedule=DiscreteSchedule(AC),
        style=(SOLVERS[name].defaults or {}).get("style", "k"),
        final_sigma="zero",
        integer_timesteps=view == "vp",
        **DISCRETIZATIONS[disc],
    )
    s0 = ladder.levels[0].sigma
    z = torch.randn(8, 2000, generator=torch.Generator().manual_seed(0))
    x_T = (MU + math.sqrt(S**2 + s0**2) * z) / math.sqrt(1 + s0**2)  # the exact marginal at s0
    out = sample(
        ideal_model,
        x_T,
        sampler=name,
        steps=steps,
        alphas_cumprod=AC,
        noise_scaling="vp",
        final_sigma="zero",
        generator=torch.Generator().manual_seed(1),
        disable=True,
        **opts,
    )
    tol = TOL.get(name, 0.03)
    mean, std = out.mean().item(), out.std().item()
    assert abs(mean / MU - 1) < tol, f"{name} on {disc}: mean {mean:.4f} vs {MU}"
    assert abs(std / S - 1) < tol, f"{name} on {disc}: std {std:.4f} vs {S}"


def test_option_a_solver_does_not_take_is_a_clear_error():
    with pytest.raises(ValueError, match=r"ddim.*unknown option.*s_churn.*valid options.*eta"):
        sample(
            ideal_model, torch.randn(2, 3), sampler="ddim", steps=3, alphas_cumprod=AC, s_churn=1
        )
    # karras=False is never an error, for any solver
    for name in ("ddim", "plms", "ddpm", "euler"):
        sample(
            ideal_model, torch.randn(2, 3), sampler=name, steps=3, alphas_cumprod=AC, karras=False
        )


def test_ddim_with_karras_sigmas_follows_the_karras_ladder():
    """DDIM on a Karras ladder: the network sees the (fractional) timesteps of the Karras sigmas."""
    seen = []

    def spy(x, t):
        seen.append(float(t[0]))
        return ideal_model(x, t)

    sample(spy, torch.randn(2, 3), sampler="ddim", steps=6, alphas_cumprod=AC, karras=True)
    sched = DiscreteSchedule(AC)
    from ldm.diffusion.discretization import karras_sigmas

    expected = sched.sigma_to_t(karras_sigmas(6, sched.sigma_min, sched.sigma_max))
    assert seen == pytest.approx(expected.tolist(), abs=1e-3)
    assert seen[1] != round(seen[1])  # not the leading spacing's integers
