"""The discrete training schedule of a VP model and its buffers, with CompVis names so SD
checkpoints load strictly.

Ho et al. 2020: alpha_bar_t = prod (1 - beta_s) (eq. 4), posterior q(x_{t-1} | x_t, x_0) with
variance beta~_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) beta_t and mean coefficients
(eq. 6-7). `v_posterior` interpolates the variance towards beta_t (CompVis: sigma^2 =
(1 - v) beta~_t + v beta_t). Values are computed in float64 and stored as float32 buffers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ldm.diffusion.schedules import (
    alphas_cumprod_from_betas,
    make_beta_schedule,
    rescale_zero_terminal_snr,
)

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
        betas = torch.as_tensor(betas, dtype=torch.float64)
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


def register_schedule_buffers(
    module: nn.Module, betas: torch.Tensor, v_posterior: float, persistent: bool = True
) -> None:
    """Register (or overwrite) the SCHEDULE_BUFFERS on `module` as float32 buffers (kept out of
    the state dict when not ``persistent``: SDXL files carry no schedule)."""
    for name, value in schedule_tensors(betas, v_posterior).items():
        module.register_buffer(name, value.to(torch.float32), persistent=persistent)


@dataclass
class TrainingSchedule:
    """beta_1..beta_T of a discrete VP model (CompVis parameter names)."""

    timesteps: int = 1000
    beta_schedule: str = "linear"
    linear_start: float = 1e-4
    linear_end: float = 2e-2
    cosine_s: float = 8e-3
    given_betas: Sequence[float] | None = None
    zero_terminal_snr: bool = False
    v_posterior: float = 0.0
    persistent_buffers: bool = True  # False: the schedule is rebuilt, not saved (sgm / SDXL)

    def __post_init__(self) -> None:
        with torch.device("cpu"):  # schedule math on CPU even inside `with torch.device("meta")`
            betas = make_beta_schedule(
                self.beta_schedule,
                self.timesteps,
                linear_start=self.linear_start,
                linear_end=self.linear_end,
                cosine_s=self.cosine_s,
                given_betas=self.given_betas,
            )
            if self.zero_terminal_snr:
                betas = rescale_zero_terminal_snr(betas)
            self.betas = betas  # float64 [T]
            self.alphas_cumprod = torch.cumprod(1.0 - betas.to(torch.float64), dim=0)

    @property
    def num_timesteps(self) -> int:
        return int(self.betas.shape[0])

    def register(self, module: nn.Module) -> None:
        """The CompVis buffers on ``module``."""
        register_schedule_buffers(module, self.betas, self.v_posterior, self.persistent_buffers)
