"""Diffusion math (no Lightning): beta schedules, the forward process, posteriors, conversions."""

from ldm.diffusion.gaussian import (
    eps_from_v,
    posterior,
    predict_eps_from_x0,
    predict_x0_from_eps,
    q_sample,
    snr,
    to_eps_x0,
    v_from_eps_x0,
    x0_from_v,
)
from ldm.diffusion.schedules import (
    BETA_SCHEDULES,
    alphas_cumprod_from_betas,
    make_beta_schedule,
    rescale_zero_terminal_snr,
)

__all__ = [
    "BETA_SCHEDULES",
    "alphas_cumprod_from_betas",
    "eps_from_v",
    "make_beta_schedule",
    "posterior",
    "predict_eps_from_x0",
    "predict_x0_from_eps",
    "q_sample",
    "rescale_zero_terminal_snr",
    "snr",
    "to_eps_x0",
    "v_from_eps_x0",
    "x0_from_v",
]
