"""Driver for solvers over integer timesteps of the VP chain (DDPM, DDIM, PLMS): spacing, img2img, inpaint.

A solver is ``solver(model, x, chain, ctx, **opts) -> x`` where ``model(x, i) -> (eps, x_0)`` evaluates the
network at ``chain.timesteps[i]`` and ``chain.alphas[i]`` / ``chain.alphas_prev[i]`` are alpha_bar at the
current and next level (the last next level is ``alphas_cumprod[0]``, or 1 with ``set_alpha_to_one``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ldm.samplers.context import SamplerContext
from ldm.samplers.denoiser import (
    KnownRegion,
    ModelFn,
    call_model,
    check_parameterization,
    vp_eps_x0,
)
from ldm.samplers.options import check_x0, img2img_start, split_solver_options
from ldm.samplers.registry import register_sampler
from ldm.samplers.sigmas import spaced_timesteps

COMMON_OPTIONS = (
    "timestep_spacing",
    "steps_offset",
    "timesteps",
    "set_alpha_to_one",
    "clip_denoised",
    "x0",
    "strength",
    "mask",
    "generator",
    "callback",
    "disable",
)


@dataclass
class VPChain:
    """Descending integer timesteps and alpha_bar at each level and at the level after it."""

    timesteps: list[int]
    alphas: list[float]
    alphas_prev: list[float]


def vp_timesteps(
    steps: int,
    num_timesteps: int,
    timestep_spacing: str = "leading",
    steps_offset: int | None = None,
) -> list[int]:
    """Descending integer timesteps; ``steps_offset=None`` means 1 for "leading" (CompVis/SD) when it fits."""
    if steps_offset is None:
        fits = (steps - 1) * (num_timesteps // steps) + 1 <= num_timesteps - 1
        steps_offset = 1 if timestep_spacing == "leading" and fits else 0
    ts = spaced_timesteps(timestep_spacing, steps, num_timesteps, steps_offset, style="k")
    return [int(t) for t in ts.round()]


def make_chain(
    alphas_cumprod: torch.Tensor, timesteps: list[int], set_alpha_to_one: bool = False
) -> VPChain:
    ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten()
    final = 1.0 if set_alpha_to_one else float(ac[0])
    alphas = [float(ac[t]) for t in timesteps]
    return VPChain(list(timesteps), alphas, alphas[1:] + [final])


class VPModel:
    """(eps, x_0) at chain level i, with optional inpainting blend and x_0 clipping to [-1, 1]."""

    def __init__(
        self,
        model_fn: ModelFn,
        chain: VPChain,
        parameterization: str,
        known: KnownRegion | None = None,
        clip_denoised: bool = False,
    ) -> None:
        check_parameterization(parameterization)
        self.model_fn, self.chain, self.parameterization = model_fn, chain, parameterization
        self.known, self.clip_denoised = known, clip_denoised
        self.nfe = 0

    def __call__(self, x: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.chain.alphas[i]
        if self.known is not None:
            x = self.known.blend_vp(x, a)
        out = call_model(self.model_fn, x, self.chain.timesteps[i])
        self.nfe += 1
        eps, x0 = vp_eps_x0(out, x, a, self.parameterization)
        if self.clip_denoised:
            x0 = x0.clamp(-1, 1)
        return eps, x0


def run_vp_solver(
    name: str,
    solver: Callable[..., torch.Tensor],
    model_fn: ModelFn,
    x_T: torch.Tensor,
    *,
    steps: int,
    alphas_cumprod: torch.Tensor,
    parameterization: str = "eps",
    default_spacing: str = "leading",
    timestep_spacing: str | None = None,
    steps_offset: int | None = None,
    timesteps: list[int] | None = None,
    default_alpha_to_one: bool = False,
    set_alpha_to_one: bool | None = None,
    clip_denoised: bool = False,
    x0: torch.Tensor | None = None,
    strength: float = 1.0,
    mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    disable: bool | None = None,
    **solver_options: Any,
) -> torch.Tensor:
    """Build the timestep chain, start from x_T (or q_sample(x0) at ``strength``), run ``solver``."""
    split_solver_options(name, solver, solver_options, COMMON_OPTIONS)
    check_x0(x0, x_T, strength, mask)
    num_timesteps = torch.as_tensor(alphas_cumprod).numel()
    if timesteps is None:
        timesteps = vp_timesteps(
            steps, num_timesteps, timestep_spacing or default_spacing, steps_offset
        )
    ts = [int(t) for t in timesteps]
    ts = ts[img2img_start(len(ts), strength) :]
    if not ts:
        return x0.clone()
    if set_alpha_to_one is None:
        set_alpha_to_one = default_alpha_to_one
    chain = make_chain(alphas_cumprod, ts, set_alpha_to_one)
    ctx = SamplerContext(generator=generator, callback=callback, disable=disable, name=name)
    if strength < 1.0:
        a = chain.alphas[0]
        x = math.sqrt(a) * x0 + math.sqrt(1 - a) * x_T
    else:
        x = x_T
    known = KnownRegion(x0, mask, ctx) if mask is not None else None
    model = VPModel(model_fn, chain, parameterization, known, clip_denoised)
    x = solver(model, x, chain, ctx, **solver_options)
    return known.final(x) if known is not None else x


def register_vp_solver(
    name: str, default_spacing: str = "leading", default_alpha_to_one: bool = False
) -> Callable:
    """Decorator: register ``solver`` under ``name`` behind ``run_vp_solver`` with its defaults."""

    def deco(solver: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        def sampler(model_fn: ModelFn, x_T: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            return run_vp_solver(
                name,
                solver,
                model_fn,
                x_T,
                default_spacing=default_spacing,
                default_alpha_to_one=default_alpha_to_one,
                **kwargs,
            )

        sampler.__doc__ = solver.__doc__
        sampler.__name__ = f"sample_{name}"
        register_sampler(name, sampler)
        return solver

    return deco
