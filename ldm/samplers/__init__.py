"""Samplers: stateless solvers over ``model_fn(x, t)`` and a VP schedule, behind one entry point.

``sample(model_fn, x_T, sampler=NAME, steps=N, alphas_cumprod=..., parameterization=..., **options)``.
Extra samplers register through ``ldm.samplers.registry.register_sampler`` (``SAMPLERS`` is live).
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

import torch

from ldm.samplers import ddim, ddpm, dpm_adaptive, dpmpp, euler, lms, plms, unipc  # noqa: F401
from ldm.samplers.ddim import ddim_invert
from ldm.samplers.denoiser import ModelFn
from ldm.samplers.guidance import cfg_model_fn, rescale_guidance
from ldm.samplers.registry import SAMPLERS, get_sampler, register_sampler

# Modules owned elsewhere that add names to the registry when present (score-SDE family).
for _name in ("ldm.samplers.sde",):
    if importlib.util.find_spec(_name) is not None:
        importlib.import_module(_name)


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

    ``model_fn(x, t)`` gets x at the VP scale sqrt(a) x_0 + sqrt(1 - a) eps and float timesteps t [B]
    (fractional for sigma-based solvers: log-sigma interpolation) and returns eps, v or x0.
    Common options: generator, callback, disable (tqdm), x0 + strength (img2img), x0 + mask
    (inpainting, mask 1 = keep x0); sigma solvers: karras, exponential, timestep_spacing, ...;
    VP solvers (ddpm, ddim, plms): timestep_spacing, steps_offset, set_alpha_to_one, eta (ddim).
    """
    fn = get_sampler(sampler)
    if alphas_cumprod is None:
        raise ValueError(
            "sample() needs alphas_cumprod=<[T] tensor of the model's training schedule>"
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
    "sample",
]
