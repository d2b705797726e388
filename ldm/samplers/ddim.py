"""DDIM sampling and deterministic DDIM inversion (Song et al. 2021, arXiv 2010.02502, eq. 12)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from ldm.diffusion.denoiser import DiscreteDenoiser, ModelFn
from ldm.diffusion.discretization import Level, make_ladder
from ldm.samplers.context import SamplerContext
from ldm.samplers.driver import VPChain, VPModel, register_solver


def ddim_step(
    x0: torch.Tensor,
    eps: torch.Tensor,
    a: float,
    a_prev: float,
    eta: float,
    noise: torch.Tensor | None,
) -> torch.Tensor:
    """x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma z (DDIM eq. 12, sigma from eq. 16)."""
    sigma = eta * math.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
    x = math.sqrt(a_prev) * x0 + math.sqrt(max(1 - a_prev - sigma**2, 0.0)) * eps
    return x + sigma * noise if sigma > 0 and noise is not None else x


@register_solver(
    "ddim", view="vp", timestep_spacing="leading", steps_offset=None, final_sigma="sigma_min"
)
def ddim(
    model: VPModel,
    x: torch.Tensor,
    chain: VPChain,
    ctx: SamplerContext,
    *,
    eta: float = 0.0,
    noise: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """DDIM; eta=0 deterministic, eta=1 DDPM-like. ``noise`` optionally gives the per-step z's."""
    for i in ctx.steps(len(chain.timesteps)):
        eps, x0 = model(x, i)
        ctx.report(i=i, x=x, t=chain.timesteps[i], denoised=x0)
        z = None
        if eta > 0:
            z = noise[i] if noise is not None else ctx.randn(x)
        x = ddim_step(x0, eps, chain.alphas[i], chain.alphas_prev[i], eta, z)
    return x


def ddim_invert(
    model_fn: ModelFn,
    x0: torch.Tensor,
    *,
    steps: int,
    alphas_cumprod: torch.Tensor,
    parameterization: str = "eps",
    timestep_spacing: str = "leading",
    steps_offset: int | None = None,
    timesteps: list[int] | None = None,
    set_alpha_to_one: bool = False,
    callback: Callable[[dict[str, Any]], None] | None = None,
    disable: bool | None = None,
) -> torch.Tensor:
    """Deterministic DDIM inversion x_0 -> x_T: eq. 12 (eta=0) run upwards, eps taken at the current level.

    Uses the ladder that ``sample(..., sampler="ddim")`` with the same options walks down, so sampling
    the result reproduces ``x0`` up to the discretisation error. The first evaluation is at t=0.
    """
    denoiser = DiscreteDenoiser(alphas_cumprod, parameterization)
    ladder = make_ladder(
        steps,
        schedule=denoiser.schedule,
        timestep_spacing=timestep_spacing,
        steps_offset=steps_offset,
        final_sigma="zero" if set_alpha_to_one else "sigma_min",
        integer_timesteps=True,
        timesteps=timesteps,
    )
    ctx = SamplerContext(callback=callback, disable=disable, name="ddim_invert")
    up = list(reversed(ladder.levels))  # ascending; up[0] is the target level of sampling
    x = x0
    current = Level(up[0].sigma, 0, up[0].alpha_bar)
    for i in ctx.steps(len(up) - 1):
        eps, pred_x0 = denoiser.eps_x0(model_fn, x, current)
        ctx.report(i=i, x=x, t=current.t, denoised=pred_x0)
        a = up[i + 1].alpha_bar
        x = math.sqrt(a) * pred_x0 + math.sqrt(1 - a) * eps
        current = up[i + 1]
    return x
