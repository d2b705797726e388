"""Beta schedules beta_1..beta_T in float64 (DDPM, Ho et al. 2020; Improved DDPM, Nichol & Dhariwal 2021).

Names follow CompVis (the SD configs' ``beta_schedule``), so configs mean what they meant there:

- ``linear`` (CompVis, SD's default): betas linear in sqrt-space, squared. diffusers calls this
  ``scaled_linear`` (accepted as an alias).
- ``sqrt_linear`` (CompVis): betas linear in beta itself. diffusers calls this ``linear``; use
  ``sqrt_linear`` (or the explicit alias ``linear_beta``) for it here.
- ``sqrt``: sqrt of a linear ramp; ``cosine`` (CompVis, alphas_cumprod ratio clipped at 0.999);
  ``squaredcos_cap_v2`` (diffusers/Improved DDPM ``betas_for_alpha_bar``); ``given_betas``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

BETA_SCHEDULES = (
    "linear",
    "scaled_linear",
    "sqrt_linear",
    "linear_beta",
    "sqrt",
    "cosine",
    "squaredcos_cap_v2",
    "given_betas",
)


def _cosine_alphas_cumprod(n_timestep: int, cosine_s: float) -> torch.Tensor:
    """alpha_bar(t) = cos^2(((t/T + s)/(1 + s)) * pi/2), normalised (Improved DDPM eq. 17)."""
    steps = torch.arange(n_timestep + 1, dtype=torch.float64) / n_timestep + cosine_s
    alphas = torch.cos(steps / (1 + cosine_s) * math.pi / 2).pow(2)
    return alphas / alphas[0]


def make_beta_schedule(
    schedule: str,
    n_timestep: int,
    linear_start: float = 1e-4,
    linear_end: float = 2e-2,
    cosine_s: float = 8e-3,
    given_betas: Sequence[float] | torch.Tensor | None = None,
) -> torch.Tensor:
    """Betas [n_timestep] in float64 for a named schedule (CompVis ``make_beta_schedule`` names)."""
    f64 = torch.float64
    if given_betas is not None or schedule == "given_betas":
        if given_betas is None:
            raise ValueError(
                "schedule 'given_betas' needs given_betas=[...] (one beta per timestep)"
            )
        betas = torch.as_tensor(given_betas, dtype=f64).flatten()
        if betas.numel() != n_timestep:
            raise ValueError(
                f"given_betas has {betas.numel()} values but n_timestep={n_timestep}; "
                "pass one beta per training timestep"
            )
        return betas
    if schedule in ("linear", "scaled_linear"):
        return torch.linspace(linear_start**0.5, linear_end**0.5, n_timestep, dtype=f64) ** 2
    if schedule in ("sqrt_linear", "linear_beta"):
        return torch.linspace(linear_start, linear_end, n_timestep, dtype=f64)
    if schedule == "sqrt":
        return torch.linspace(linear_start, linear_end, n_timestep, dtype=f64) ** 0.5
    if schedule == "cosine":
        ac = _cosine_alphas_cumprod(n_timestep, cosine_s)
        return (1 - ac[1:] / ac[:-1]).clamp(min=0.0, max=0.999)
    if schedule == "squaredcos_cap_v2":
        t = torch.arange(n_timestep + 1, dtype=f64) / n_timestep
        alpha_bar = torch.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)
    raise ValueError(f"unknown beta schedule {schedule!r}; expected one of {list(BETA_SCHEDULES)}")


def alphas_cumprod_from_betas(betas: torch.Tensor) -> torch.Tensor:
    """alpha_bar_t = prod_{s<=t} (1 - beta_s) (DDPM eq. 4), in float64."""
    return torch.cumprod(1.0 - betas.to(torch.float64), dim=0)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Shift/scale sqrt(alpha_bar) so the last timestep has SNR 0 (Lin et al. 2023, arXiv 2305.08891, Alg. 1)."""
    dtype = betas.dtype
    sqrt_ac = alphas_cumprod_from_betas(betas).sqrt()
    first, last = sqrt_ac[0].clone(), sqrt_ac[-1].clone()
    sqrt_ac = (sqrt_ac - last) * first / (first - last)
    ac = sqrt_ac**2
    alphas = torch.cat([ac[:1], ac[1:] / ac[:-1]])
    return (1 - alphas).to(dtype)
