"""Ancestral DDPM sampling over a (possibly respaced) timestep chain (Ho et al. 2020, Alg. 2; Nichol & Dhariwal 2021 sec. 4)."""

from __future__ import annotations

import math

import torch

from ldm.samplers.context import SamplerContext
from ldm.samplers.driver import VPChain, VPModel, register_solver


@register_solver(
    "ddpm", view="vp", timestep_spacing="leading", steps_offset=None, final_sigma="zero"
)
def ddpm(
    model: VPModel,
    x: torch.Tensor,
    chain: VPChain,
    ctx: SamplerContext,
    *,
    variance: str = "fixed_small",
) -> torch.Tensor:
    """x_{t'} ~ q(x_{t'} | x_t, x0_hat) with respaced beta = 1 - a_t / a_t' (DDPM eq. 6-7)."""
    if variance not in ("fixed_small", "fixed_large"):
        raise ValueError(f"variance must be 'fixed_small' or 'fixed_large', got {variance!r}")
    n = len(chain.timesteps)
    for i in ctx.steps(n):
        a, a_prev = chain.alphas[i], chain.alphas_prev[i]
        _, x0 = model(x, i)
        ctx.report(i=i, x=x, t=chain.timesteps[i], denoised=x0)
        beta = 1 - a / a_prev
        coef_x0 = math.sqrt(a_prev) * beta / (1 - a)
        coef_xt = math.sqrt(1 - beta) * (1 - a_prev) / (1 - a)
        x = coef_x0 * x0 + coef_xt * x
        if i < n - 1:
            var = beta * (1 - a_prev) / (1 - a) if variance == "fixed_small" else beta
            if var > 0:
                x = x + math.sqrt(var) * ctx.randn(x)
    return x
