"""Model-output conversions for the two solver views: D(x; sigma) for sigma solvers, (eps, x_0) for VP solvers."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ldm.samplers.context import SamplerContext
from ldm.samplers.schedule import DiscreteSchedule

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
PARAMETERIZATIONS = ("eps", "v", "x0")


def check_parameterization(parameterization: str) -> None:
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(
            f"parameterization must be one of {list(PARAMETERIZATIONS)}, got {parameterization!r}"
        )


def call_model(model_fn: ModelFn, x: torch.Tensor, t: float) -> torch.Tensor:
    """model_fn(x, t) with t broadcast to a float32 tensor [B]; checks the output shape."""
    t_b = torch.full((x.shape[0],), float(t), device=x.device, dtype=torch.float32)
    out = model_fn(x, t_b)
    if out.shape != x.shape:
        raise ValueError(
            f"model_fn returned shape {tuple(out.shape)} for input {tuple(x.shape)}; "
            "it must return a prediction shaped like x (eps, v or x0)"
        )
    return out


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


class Denoiser:
    """D(x; sigma) = x_0 estimate from a VP ``model_fn`` at x = x_0 + sigma eps (EDM tab. 1, VP column).

    The model sees c_in x with c_in = 1 / sqrt(sigma^2 + 1) at t = sigma_to_t(sigma) (fractional unless
    ``round_timesteps``, which mimics diffusers' multistep schedulers with Karras sigmas).
    """

    def __init__(
        self,
        model_fn: ModelFn,
        schedule: DiscreteSchedule,
        parameterization: str = "eps",
        round_timesteps: bool = False,
        known: KnownRegion | None = None,
    ) -> None:
        check_parameterization(parameterization)
        self.model_fn, self.schedule = model_fn, schedule
        self.parameterization, self.round_timesteps, self.known = (
            parameterization,
            round_timesteps,
            known,
        )
        self.nfe = 0

    def t_of(self, sigma: float) -> float:
        t = self.schedule.sigma_to_t(sigma)
        return float(t.round() if self.round_timesteps else t)

    def __call__(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        sigma = float(sigma)
        if self.known is not None:
            x = self.known.blend_ve(x, sigma)
        c_in = 1.0 / math.sqrt(sigma**2 + 1)
        out = call_model(self.model_fn, x * c_in, self.t_of(sigma))
        self.nfe += 1
        if self.parameterization == "eps":
            return x - sigma * out
        if self.parameterization == "v":
            return x * (1.0 / (sigma**2 + 1)) - out * (sigma * c_in)
        return out


def vp_eps_x0(
    model_out: torch.Tensor, x_t: torch.Tensor, alpha_bar: float, parameterization: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(eps, x_0) from a model output at x_t = sqrt(a) x_0 + sqrt(1 - a) eps (DDPM eq. 15; v: Salimans & Ho)."""
    sa, sb = math.sqrt(alpha_bar), math.sqrt(1 - alpha_bar)
    if parameterization == "eps":
        return model_out, (x_t - sb * model_out) / sa
    if parameterization == "v":
        return sa * model_out + sb * x_t, sa * x_t - sb * model_out
    return (x_t - sa * model_out) / sb, model_out
