"""The forward-process buffers of a DDPM, with CompVis names so SD checkpoints load strictly.

Ho et al. 2020: alpha_bar_t = prod (1 - beta_s) (eq. 4), posterior q(x_{t-1} | x_t, x_0) with
variance beta~_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) beta_t and mean coefficients
(eq. 6-7). `v_posterior` interpolates the variance towards beta_t (CompVis: sigma^2 =
(1 - v) beta~_t + v beta_t). Values are computed in float64 and stored as float32 buffers.
"""

from __future__ import annotations

import torch
from torch import nn

from ldm.diffusion.schedules import alphas_cumprod_from_betas

#: Persistent schedule buffers, in the order CompVis registers them (all of shape [T]).
SCHEDULE_BUFFERS = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)


def schedule_tensors(betas: torch.Tensor, v_posterior: float = 0.0) -> dict[str, torch.Tensor]:
    """All SCHEDULE_BUFFERS in float64 from betas [T] (DDPM eq. 4, 6, 7)."""
    with torch.device("cpu"):
        return _schedule_tensors(torch.as_tensor(betas, dtype=torch.float64), v_posterior)


def _schedule_tensors(betas: torch.Tensor, v_posterior: float) -> dict[str, torch.Tensor]:
    alphas = 1.0 - betas
    ac = alphas_cumprod_from_betas(betas)
    ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    post_var = (1 - v_posterior) * betas * (1.0 - ac_prev) / (1.0 - ac) + v_posterior * betas
    return {
        "betas": betas,
        "alphas_cumprod": ac,
        "alphas_cumprod_prev": ac_prev,
        "sqrt_alphas_cumprod": ac.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1.0 - ac).sqrt(),
        "log_one_minus_alphas_cumprod": torch.log(1.0 - ac),
        "sqrt_recip_alphas_cumprod": (1.0 / ac).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / ac - 1).sqrt(),
        "posterior_variance": post_var,
        # log of the posterior variance, clipped because beta~_0 = 0 at the start of the chain
        "posterior_log_variance_clipped": torch.log(post_var.clamp(min=1e-20)),
        "posterior_mean_coef1": betas * ac_prev.sqrt() / (1.0 - ac),
        "posterior_mean_coef2": (1.0 - ac_prev) * alphas.sqrt() / (1.0 - ac),
    }


def register_schedule_buffers(module: nn.Module, betas: torch.Tensor, v_posterior: float) -> None:
    """Register (or overwrite) the SCHEDULE_BUFFERS on `module` as float32 buffers."""
    for name, value in schedule_tensors(betas, v_posterior).items():
        module.register_buffer(name, value.to(torch.float32))
