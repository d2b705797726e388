"""DDIM sampling and deterministic DDIM inversion (Song et al. 2021, arXiv 2010.02502, eq. 12)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from ldm.samplers.context import SamplerContext
from ldm.samplers.denoiser import ModelFn, call_model, check_parameterization, vp_eps_x0
from ldm.samplers.vp_driver import VPChain, VPModel, make_chain, register_vp_solver, vp_timesteps


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


@register_vp_solver("ddim")
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

    Uses the chain that ``sample(..., sampler="ddim")`` with the same options walks down, so sampling
    the result reproduces ``x0`` up to the discretisation error. The first evaluation is at t=0.
    """
    check_parameterization(parameterization)
    num_timesteps = torch.as_tensor(alphas_cumprod).numel()
    if timesteps is None:
        timesteps = vp_timesteps(steps, num_timesteps, timestep_spacing, steps_offset)
    chain = make_chain(alphas_cumprod, [int(t) for t in timesteps], set_alpha_to_one)
    ctx = SamplerContext(callback=callback, disable=disable, name="ddim_invert")
    levels = list(reversed(chain.timesteps))  # ascending
    alphas = list(reversed(chain.alphas))
    x, a_cur, t_cur = x0, chain.alphas_prev[-1], 0
    for i in ctx.steps(len(levels)):
        out = call_model(model_fn, x, t_cur)
        eps, pred_x0 = vp_eps_x0(out, x, a_cur, parameterization)
        ctx.report(i=i, x=x, t=t_cur, denoised=pred_x0)
        x = math.sqrt(alphas[i]) * pred_x0 + math.sqrt(1 - alphas[i]) * eps
        a_cur, t_cur = alphas[i], levels[i]
    return x
