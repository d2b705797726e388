"""PLMS: pseudo linear multistep on eps with DDIM transitions (Liu et al. 2022, arXiv 2202.09778, eq. 12).

Matches CompVis PLMSSampler and diffusers' PNDMScheduler(skip_prk_steps=True): the first step is a
2nd-order pseudo improved Euler step (two evaluations), then Adams-Bashforth of orders 2, 3, 4.
Each model output is converted to eps at its own (x, t) (CompVis), also for v-prediction.
"""

from __future__ import annotations

import torch

from ldm.samplers.context import SamplerContext
from ldm.samplers.ddim import ddim_step
from ldm.samplers.driver import VPChain, VPModel, register_solver


def _model_at_next(model: VPModel, x: torch.Tensor, i: int) -> torch.Tensor:
    """eps at level i + 1 (or the final level, evaluated at the last timestep) for the first PLMS step."""
    j = min(i + 1, len(model.chain.timesteps) - 1)
    return model(x, j)[0]


@register_solver(
    "plms", view="vp", timestep_spacing="leading", steps_offset=None, final_sigma="sigma_min"
)
def plms(model: VPModel, x: torch.Tensor, chain: VPChain, ctx: SamplerContext) -> torch.Tensor:
    """PLMS (pseudo numerical method, linear multistep order 4 after a pseudo improved Euler start)."""
    old_eps: list[torch.Tensor] = []
    n = len(chain.timesteps)
    for i in ctx.steps(n):
        a, a_prev = chain.alphas[i], chain.alphas_prev[i]
        eps, x0 = model(x, i)
        ctx.report(i=i, x=x, t=chain.timesteps[i], denoised=x0)
        if not old_eps:
            x_pred = ddim_step(x0, eps, a, a_prev, 0.0, None)
            eps_prime = (eps + _model_at_next(model, x_pred, i)) / 2
        elif len(old_eps) == 1:
            eps_prime = (3 * eps - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            eps_prime = (23 * eps - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            eps_prime = (55 * eps - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        x0_prime = (x - (1 - a) ** 0.5 * eps_prime) / a**0.5
        x = ddim_step(x0_prime, eps_prime, a, a_prev, 0.0, None)
        old_eps = (old_eps + [eps])[-3:]
    return x
