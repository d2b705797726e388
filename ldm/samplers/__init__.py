"""Samplers: stateless solvers over ``model_fn(x, t)`` and a VP schedule, behind one entry point.

``sample(model_fn, x_T, sampler=NAME, steps=N, alphas_cumprod=..., parameterization=..., **options)``.
Extra samplers register through ``ldm.samplers.registry.register_sampler`` (``SAMPLERS`` is live).
"""

from __future__ import annotations

from typing import Any

import torch

from ldm.diffusion.denoiser import ModelFn
from ldm.samplers import ddim, ddpm, dpm_adaptive, dpmpp, euler, lms, plms, sde, unipc  # noqa: F401
from ldm.samplers.ddim import ddim_invert
from ldm.samplers.guidance import cfg_model_fn, rescale_guidance
from ldm.samplers.registry import SAMPLERS, get_sampler, register_sampler, resolve_sampler


def sample(
    model_fn: ModelFn,
    x_T: torch.Tensor,
    sampler: str = "dpmpp_2m",
    steps: int = 20,
    alphas_cumprod: torch.Tensor | None = None,
    parameterization: str = "eps",
    **options: Any,
) -> torch.Tensor:
    """Run ``sampler`` from unit-variance noise ``x_T`` to x_0; see the sampler modules for ``options``.

    ``sampler`` is a registered name or another name of it (``ldm.samplers.aliases``: k-diffusion,
    ComfyUI, A1111 and diffusers scheduler names; a " Karras" / "_karras" suffix sets karras=True).

    ``model_fn(x, t)`` gets x at the VP scale sqrt(a) x_0 + sqrt(1 - a) eps and float timesteps t [B]
    (fractional for sigma-based solvers: log-sigma interpolation) and returns eps, v or x0.
    Common options: generator, callback, disable (tqdm), x0 + strength (img2img), x0 + mask
    (inpainting, mask 1 = keep x0); the discretization, for every solver: karras, exponential,
    timestep_spacing, steps_offset, timesteps, sigmas, final_sigma / set_alpha_to_one;
    ``denoiser=`` replaces (alphas_cumprod, parameterization) by any ``ldm.diffusion.denoiser``
    object (EDM / VE sigma-trained models). Solver options: eta (ddim, ancestral), order, ...
    """
    sampler, options = resolve_sampler(sampler, options)  # an alias: "DPM++ 2M Karras", ...
    fn = SAMPLERS[sampler]
    if alphas_cumprod is None and options.get("denoiser") is None:
        raise ValueError(
            "sample() needs alphas_cumprod=<[T] tensor of the model's training schedule> "
            "or denoiser=<ldm.diffusion.denoiser.Denoiser>"
        )
    return fn(
        model_fn,
        x_T,
        steps=steps,
        alphas_cumprod=alphas_cumprod,
        parameterization=parameterization,
        **options,
    )


__all__ = [
    "SAMPLERS",
    "cfg_model_fn",
    "ddim_invert",
    "get_sampler",
    "register_sampler",
    "rescale_guidance",
    "resolve_sampler",
    "sample",
]
