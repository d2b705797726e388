"""Inference timesteps and noise-level ladders: timestep spacings, Karras and exponential sigmas.

Spacings follow the diffusers scheduler with the same family (Lin et al. 2023, arXiv 2305.08891, Table 2):
``style="k"`` (DDIM, PNDM, Euler/Heun/LMS family): ``linspace`` = N points from T-1 to 0 (fractional),
``leading`` = k * (T // N) + offset, ``trailing`` = round(T - k * T / N) - 1.
``style="dpm"`` (DPMSolverMultistep, UniPC): ``linspace`` = N+1 rounded points from T-1 to 0 without
the last, ``leading`` = k * (T // (N + 1)) + offset without the last, ``trailing`` as above.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ldm.samplers.schedule import DiscreteSchedule

TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")


def spaced_timesteps(
    spacing: str,
    steps: int,
    num_timesteps: int,
    steps_offset: int = 0,
    style: str = "k",
) -> np.ndarray:
    """Descending inference timesteps [steps] (float64; fractional only for ``style="k"`` linspace)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    T, N = num_timesteps, steps
    if style not in ("k", "dpm"):
        raise ValueError(f"style must be 'k' or 'dpm', got {style!r}")
    if spacing == "linspace":
        if style == "k":
            ts = np.linspace(0, T - 1, N, dtype=np.float64)[::-1]
        else:
            ts = np.linspace(0, T - 1, N + 1).round()[::-1][:-1]
    elif spacing == "leading":
        if style == "k":
            ts = (np.arange(0, N) * (T // N)).round()[::-1] + steps_offset
        else:
            ts = (np.arange(0, N + 1) * (T // (N + 1))).round()[::-1][:-1] + steps_offset
    elif spacing == "trailing":
        ts = np.arange(T, 0, -T / N).round() - 1
    else:
        raise ValueError(
            f"unknown timestep_spacing {spacing!r}; expected one of {list(TIMESTEP_SPACINGS)}"
        )
    ts = np.array(ts, dtype=np.float64)  # a copy: positive strides for torch.from_numpy
    if ts.max() > T - 1 or ts.min() < 0:
        raise ValueError(
            f"timesteps {ts.tolist()} leave [0, {T - 1}] (spacing={spacing!r}, steps={N}, "
            f"steps_offset={steps_offset}); lower steps_offset or steps"
        )
    return ts


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """sigma_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho (EDM eq. 5)."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def exponential_sigmas(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """Sigmas evenly spaced in log(sigma) from sigma_max to sigma_min."""
    return torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64).exp()


def build_sigmas(
    schedule: DiscreteSchedule,
    steps: int,
    *,
    karras: bool = False,
    exponential: bool = False,
    rho: float = 7.0,
    timestep_spacing: str = "linspace",
    steps_offset: int = 0,
    style: str = "k",
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    final_sigma: str = "zero",
) -> torch.Tensor:
    """Descending noise levels [steps + 1] (float64) ending in 0 (or sigma(t=0) for final_sigma="sigma_min").

    Karras / exponential ladders span [sigma_min, sigma_max] of the whole training schedule unless
    given; otherwise sigma is read off the spaced timesteps through the schedule's interpolation.
    """
    if karras and exponential:
        raise ValueError("choose at most one of karras=True and exponential=True")
    lo = schedule.sigma_min if sigma_min is None else float(sigma_min)
    hi = schedule.sigma_max if sigma_max is None else float(sigma_max)
    if karras:
        sig = karras_sigmas(steps, lo, hi, rho)
    elif exponential:
        sig = exponential_sigmas(steps, lo, hi)
    else:
        ts = spaced_timesteps(timestep_spacing, steps, schedule.num_timesteps, steps_offset, style)
        sig = schedule.t_to_sigma(torch.from_numpy(ts))
    if final_sigma == "zero":
        last = 0.0
    elif final_sigma == "sigma_min":
        last = schedule.sigma_min
    else:
        raise ValueError(f"final_sigma must be 'zero' or 'sigma_min', got {final_sigma!r}")
    return torch.cat([sig, sig.new_tensor([last])])
