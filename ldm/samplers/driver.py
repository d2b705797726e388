"""The one solver driver: ladder, start noise, img2img, inpainting, callbacks, for every solver.

A solver works in one of two views of the same denoiser (``ldm.diffusion.denoiser``):

- ``view="ve"`` (k-diffusion style): ``solver(denoise, x, sigmas, ctx, **opts)`` with
  ``denoise(x, sigma) -> x_0``, ``sigmas`` a descending list of floats, x = x_0 + sigma * eps;
- ``view="vp"`` (DDPM / DDIM / PLMS): ``solver(model, x, chain, ctx, **opts)`` with
  ``model(x, i) -> (eps, x_0)`` at level i of the chain, x = sqrt(a) x_0 + sqrt(1 - a) eps.

Every solver takes every discretization (``ldm.diffusion.discretization.make_ladder``): timestep
spacings, Karras, exponential, explicit sigmas or timesteps; a solver's registration only sets its
defaults. Noise conventions: ``noise_scaling="sigma"`` starts at sigma_max * noise (k-diffusion),
``"vp"`` at sqrt(1 + sigma_max^2) * noise (diffusers' unit-variance VP start).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ldm.diffusion.denoiser import Denoiser, DiscreteDenoiser, ModelFn
from ldm.diffusion.discretization import Ladder, Level, make_ladder
from ldm.samplers.context import SamplerContext
from ldm.samplers.options import check_x0, split_solver_options
from ldm.samplers.registry import register_sampler

COMMON_OPTIONS = (
    "karras",
    "exponential",
    "rho",
    "timestep_spacing",
    "steps_offset",
    "timesteps",
    "sigmas",
    "sigma_min",
    "sigma_max",
    "final_sigma",
    "set_alpha_to_one",
    "sigma_interpolation",
    "round_timesteps",
    "noise_scaling",
    "clip_denoised",
    "denoiser",
    "x0",
    "strength",
    "denoising_start",
    "denoising_end",
    "mask",
    "generator",
    "callback",
    "disable",
)
NOISE_SCALINGS = ("sigma", "vp")


class KnownRegion:
    """Inpainting by blending: where ``mask`` is 1 the known ``x0`` (noised to the current level) is kept.

    Mask semantics follow CompVis (1 = keep the known image, 0 = generate), shape broadcastable to x.
    """

    def __init__(self, x0: torch.Tensor, mask: torch.Tensor, ctx: SamplerContext) -> None:
        self.x0, self.ctx = x0, ctx
        self.mask = mask.to(device=x0.device, dtype=x0.dtype)
        try:
            torch.broadcast_shapes(self.mask.shape, x0.shape)
        except RuntimeError:
            raise ValueError(
                f"mask shape {tuple(mask.shape)} does not broadcast to x0 {tuple(x0.shape)}; "
                "use [B or 1, 1 or C, H, W]"
            ) from None

    def blend_ve(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        """Known region set to x_0 + sigma * eps (fresh noise)."""
        known = self.x0 + sigma * self.ctx.randn(x) if sigma > 0 else self.x0
        return self.mask * known + (1 - self.mask) * x

    def blend_vp(self, x: torch.Tensor, alpha_bar: float) -> torch.Tensor:
        """Known region set to sqrt(a) x_0 + sqrt(1 - a) eps (CompVis ``q_sample`` blend)."""
        known = math.sqrt(alpha_bar) * self.x0 + math.sqrt(1 - alpha_bar) * self.ctx.randn(x)
        return self.mask * known + (1 - self.mask) * x

    def final(self, x: torch.Tensor) -> torch.Tensor:
        return self.mask * self.x0 + (1 - self.mask) * x


class BoundDenoiser:
    """A denoiser bound to one model function for one sampling call: both views, NFE count, inpainting."""

    def __init__(
        self,
        denoiser: Denoiser,
        model_fn: ModelFn,
        known: KnownRegion | None = None,
        clip_denoised: bool = False,
    ) -> None:
        self.denoiser, self.model_fn = denoiser, model_fn
        self.known, self.clip_denoised = known, clip_denoised
        self.nfe = 0

    def __call__(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        """D(x; sigma) in VE coordinates."""
        sigma = float(sigma)
        if self.known is not None:
            x = self.known.blend_ve(x, sigma)
        x0 = self.denoiser.denoise(self.model_fn, x, sigma)
        self.nfe += 1
        return x0.clamp(-1, 1) if self.clip_denoised else x0

    def vp(self, x: torch.Tensor, level: Level) -> tuple[torch.Tensor, torch.Tensor]:
        """(eps, x_0) at the VP state of ``level``."""
        if self.known is not None:
            x = self.known.blend_vp(x, level.alpha_bar)
        eps, x0 = self.denoiser.eps_x0(self.model_fn, x, level)
        self.nfe += 1
        if self.clip_denoised:
            x0 = x0.clamp(-1, 1)
        return eps, x0


@dataclass
class VPChain:
    """Timesteps and alpha_bar of each level and of the level after it (the VP view of a ladder)."""

    timesteps: list[float | None]
    alphas: list[float]
    alphas_prev: list[float]

    @classmethod
    def of(cls, ladder: Ladder) -> VPChain:
        lv = ladder.levels
        return cls(
            [x.t for x in lv[:-1]], [x.alpha_bar for x in lv[:-1]], [x.alpha_bar for x in lv[1:]]
        )


class VPModel:
    """``model(x, i) -> (eps, x_0)`` at level i of the ladder (for solvers of ``view="vp"``)."""

    def __init__(self, bound: BoundDenoiser, ladder: Ladder) -> None:
        self.bound, self.ladder, self.chain = bound, ladder, VPChain.of(ladder)

    @property
    def nfe(self) -> int:
        return self.bound.nfe

    def __call__(self, x: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.bound.vp(x, self.ladder.levels[i])


@dataclass
class SolverSpec:
    """A registered solver: its function, its view and its default discretization."""

    name: str
    fn: Callable[..., torch.Tensor]
    view: str = "ve"
    defaults: dict[str, Any] | None = None
    defaults_of: Callable[[dict[str, Any]], dict[str, Any]] | None = None


SOLVERS: dict[str, SolverSpec] = {}


def _final_sigma(final_sigma: str | None, set_alpha_to_one: bool | None, default: str) -> str:
    if final_sigma is not None and set_alpha_to_one is not None:
        raise ValueError("give at most one of final_sigma and set_alpha_to_one")
    if set_alpha_to_one is not None:
        return "zero" if set_alpha_to_one else "sigma_min"
    return final_sigma or default


def run_solver(
    spec: SolverSpec,
    model_fn: ModelFn,
    x_T: torch.Tensor,
    *,
    steps: int,
    alphas_cumprod: torch.Tensor | None = None,
    parameterization: str = "eps",
    denoiser: Denoiser | None = None,
    karras: bool = False,
    exponential: bool = False,
    rho: float = 7.0,
    timestep_spacing: str | None = None,
    steps_offset: int | None = None,
    timesteps: list[int] | None = None,
    sigmas: torch.Tensor | list[float] | None = None,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    final_sigma: str | None = None,
    set_alpha_to_one: bool | None = None,
    sigma_interpolation: str = "log",
    round_timesteps: bool = False,
    noise_scaling: str | None = None,
    clip_denoised: bool = False,
    x0: torch.Tensor | None = None,
    strength: float = 1.0,
    denoising_start: float | None = None,
    denoising_end: float | None = None,
    mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    disable: bool | None = None,
    **solver_options: Any,
) -> torch.Tensor:
    """Build the ladder, put x_T on it (or noise x0 to it: img2img), run the solver, blend the mask.

    Hand-off between two models (SDXL base -> refiner; diffusers' semantics): ``denoising_end``
    stops after the levels with timestep >= round(T - denoising_end * T) and returns the noisy
    latent there; ``denoising_start`` continues the same ladder from that point with ``x_T`` being
    that latent. The latent handed over is in VE coordinates, x_0 + sigma * eps, whatever the
    solvers' views, so any solver can hand over to any other.
    """
    split_solver_options(spec.name, spec.fn, solver_options, COMMON_OPTIONS)
    check_x0(x0, x_T, strength, mask)
    if denoiser is None:
        if alphas_cumprod is None:
            raise ValueError(
                "sample() needs alphas_cumprod=<[T] tensor of the model's training schedule> "
                "or denoiser=<ldm.diffusion.denoiser.Denoiser>"
            )
        denoiser = DiscreteDenoiser(
            alphas_cumprod, parameterization, sigma_interpolation, round_timesteps
        )
    d = dict(spec.defaults or {})
    if spec.defaults_of is not None:
        d.update(spec.defaults_of(solver_options))
    d.update(denoiser.default_ladder)
    explicit = karras or exponential or sigmas is not None or timesteps is not None
    if explicit or timestep_spacing is not None:  # an explicit ladder beats a default one
        d.pop("karras", None), d.pop("exponential", None)
    if noise_scaling is None:
        noise_scaling = d.get("noise_scaling", "vp" if spec.view == "vp" else "sigma")
    if noise_scaling not in NOISE_SCALINGS:
        raise ValueError(f"noise_scaling must be 'sigma' or 'vp', got {noise_scaling!r}")
    ladder = make_ladder(
        steps,
        schedule=denoiser.schedule,
        sigma_min=denoiser.sigma_min if sigma_min is None else sigma_min,
        sigma_max=denoiser.sigma_max if sigma_max is None else sigma_max,
        karras=karras or d.get("karras", False),
        exponential=exponential or d.get("exponential", False),
        rho=rho,
        timestep_spacing=timestep_spacing or d.get("timestep_spacing", "linspace"),
        steps_offset=steps_offset if steps_offset is not None else d.get("steps_offset", 0),
        style=d.get("style", "k"),
        final_sigma=_final_sigma(final_sigma, set_alpha_to_one, d.get("final_sigma", "zero")),
        integer_timesteps=spec.view == "vp",
        round_timesteps=round_timesteps,
        sigmas=sigmas,
        timesteps=timesteps,
    ).from_strength(strength)
    if (denoising_start is not None or denoising_end is not None) and denoiser.schedule is None:
        raise ValueError(
            "denoising_start / denoising_end are fractions of a discrete schedule's timesteps; "
            f"this model's denoiser ({type(denoiser).__name__}) has none"
        )
    if denoising_start is not None:
        if x0 is not None and mask is None:
            raise ValueError("denoising_start continues from x_T; it does not take x0 / strength")
        ladder = ladder.after(denoising_start, denoiser.schedule.num_timesteps)
    if denoising_end is not None:
        ladder = ladder.until(denoising_end, denoiser.schedule.num_timesteps)
    if ladder.steps < 1:
        return x0.clone() if x0 is not None else x_T.clone()
    ctx = SamplerContext(
        generator=generator, callback=callback, disable=disable, name=spec.name, total=ladder.steps
    )
    known = KnownRegion(x0, mask, ctx) if mask is not None else None
    bound = BoundDenoiser(denoiser, model_fn, known, clip_denoised)
    first = ladder.levels[0]
    last = ladder.levels[-1]
    if spec.view == "vp":
        if denoising_start is not None:
            x = x_T * math.sqrt(first.alpha_bar)  # VE hand-off latent -> VP coordinates
        elif strength < 1.0:
            a = first.alpha_bar
            x = math.sqrt(a) * x0 + math.sqrt(1 - a) * x_T
        elif noise_scaling == "vp":
            x = x_T
        else:
            x = x_T * (first.sigma * math.sqrt(first.alpha_bar))
        model = VPModel(bound, ladder)
        x = spec.fn(model, x, model.chain, ctx, **solver_options)
        if denoising_end is not None and last.alpha_bar < 1.0:
            x = x / math.sqrt(last.alpha_bar)  # VP -> VE coordinates for the hand-off
    else:
        if denoising_start is not None:
            x = x_T
        elif strength < 1.0:
            x = x0 + first.sigma * x_T
        elif noise_scaling == "sigma":
            x = x_T * first.sigma
        else:
            x = x_T * math.sqrt(first.sigma**2 + 1)
        x = spec.fn(bound, x, ladder.sigmas, ctx, **solver_options)
    if known is None:
        return x
    if denoising_end is not None and last.sigma > 0:  # hand-off: known region noised to sigma
        return known.blend_ve(x, last.sigma)
    return known.final(x)


def register_solver(
    name: str,
    view: str = "ve",
    defaults_of: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    **defaults: Any,
) -> Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]]:
    """Decorator: register a solver of ``view`` ("ve" or "vp") under ``name`` with default ladder options.

    Defaults: ``timestep_spacing``, ``steps_offset``, ``style`` ("k" or "dpm"), ``final_sigma``,
    ``noise_scaling``, ``karras`` / ``exponential``; ``defaults_of(solver_options)`` adds defaults
    that depend on the solver's own options.
    """
    if view not in ("ve", "vp"):
        raise ValueError(f"view must be 've' or 'vp', got {view!r}")

    def deco(solver: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        spec = SolverSpec(name, solver, view, defaults, defaults_of)
        SOLVERS[name] = spec

        def sampler(model_fn: ModelFn, x_T: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            return run_solver(spec, model_fn, x_T, **kwargs)

        sampler.__doc__ = solver.__doc__
        sampler.__name__ = f"sample_{name}"
        register_sampler(name, sampler)
        return solver

    return deco
