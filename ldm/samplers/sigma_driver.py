"""Driver for solvers over a noise-level ladder (k-diffusion style): schedule, init noise, img2img, inpaint.

A solver is ``solver(denoise, x, sigmas, ctx, **opts) -> x`` with ``denoise(x, sigma) -> x_0``,
``sigmas`` a descending list of floats ending in 0, and x = x_0 + sigma * eps (variance-exploding view).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from ldm.samplers.context import SamplerContext
from ldm.samplers.denoiser import Denoiser, KnownRegion, ModelFn
from ldm.samplers.options import check_x0, img2img_start, split_solver_options
from ldm.samplers.registry import register_sampler
from ldm.samplers.schedule import DiscreteSchedule
from ldm.samplers.sigmas import build_sigmas

SigmaSolver = Callable[..., torch.Tensor]

COMMON_OPTIONS = (
    "karras",
    "exponential",
    "rho",
    "timestep_spacing",
    "steps_offset",
    "sigma_interpolation",
    "round_timesteps",
    "noise_scaling",
    "final_sigma",
    "sigma_min",
    "sigma_max",
    "sigmas",
    "x0",
    "strength",
    "mask",
    "generator",
    "callback",
    "disable",
)


def run_sigma_solver(
    name: str,
    solver: SigmaSolver,
    model_fn: ModelFn,
    x_T: torch.Tensor,
    *,
    steps: int,
    alphas_cumprod: torch.Tensor,
    parameterization: str = "eps",
    style: str = "k",
    karras: bool = False,
    exponential: bool = False,
    rho: float = 7.0,
    timestep_spacing: str = "linspace",
    steps_offset: int = 0,
    sigma_interpolation: str = "log",
    round_timesteps: bool = False,
    noise_scaling: str = "sigma",
    final_sigma: str = "zero",
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    sigmas: torch.Tensor | None = None,
    x0: torch.Tensor | None = None,
    strength: float = 1.0,
    mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    disable: bool | None = None,
    **solver_options: Any,
) -> torch.Tensor:
    """Build the sigma ladder, scale x_T to it (sigma_max, or sqrt(1 + sigma_max^2) for "vp"), run ``solver``."""
    split_solver_options(name, solver, solver_options, COMMON_OPTIONS)
    check_x0(x0, x_T, strength, mask)
    schedule = DiscreteSchedule(alphas_cumprod, sigma_interpolation)
    if sigmas is None:
        sigmas = build_sigmas(
            schedule,
            steps,
            karras=karras,
            exponential=exponential,
            rho=rho,
            timestep_spacing=timestep_spacing,
            steps_offset=steps_offset,
            style=style,
            sigma_min=sigma_min,
            sigma_max=sigma_max,
            final_sigma=final_sigma,
        )
    sig = [float(s) for s in torch.as_tensor(sigmas, dtype=torch.float64).flatten()]
    start = img2img_start(len(sig) - 1, strength)
    sig = sig[start:]
    if len(sig) < 2:
        return x0.clone()
    ctx = SamplerContext(generator=generator, callback=callback, disable=disable, name=name)
    if strength < 1.0:
        x = x0 + sig[0] * x_T
    elif noise_scaling == "sigma":
        x = x_T * sig[0]
    elif noise_scaling == "vp":
        x = x_T * math.sqrt(sig[0] ** 2 + 1)
    else:
        raise ValueError(f"noise_scaling must be 'sigma' or 'vp', got {noise_scaling!r}")
    known = KnownRegion(x0, mask, ctx) if mask is not None else None
    denoise = Denoiser(model_fn, schedule, parameterization, round_timesteps, known)
    x = solver(denoise, x, sig, ctx, **solver_options)
    return known.final(x) if known is not None else x


def register_sigma_solver(name: str, style: str = "k") -> Callable[[SigmaSolver], SigmaSolver]:
    """Decorator: register ``solver`` under ``name`` behind ``run_sigma_solver``."""

    def deco(solver: SigmaSolver) -> SigmaSolver:
        def sampler(model_fn: ModelFn, x_T: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            return run_sigma_solver(name, solver, model_fn, x_T, style=style, **kwargs)

        sampler.__doc__ = solver.__doc__
        sampler.__name__ = f"sample_{name}"
        register_sampler(name, sampler)
        return solver

    return deco
