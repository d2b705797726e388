"""Denoisers: a network seen as D(x; sigma), the x_0 estimate at x = x_0 + sigma n (VE coordinates).

One object per parameterization, used by the training loss and by every solver, so training and
sampling cannot disagree (k-diffusion ``external.py``; sgm ``denoiser.py`` / ``denoiser_scaling.py``):

- ``DiscreteDenoiser``: a network trained on the integer timesteps of a VP schedule alpha_bar_t,
  predicting eps, v or x0. Its noise levels are the quantized ladder sigma_t =
  sqrt((1 - alpha_bar_t) / alpha_bar_t); the network sees c_in x = x / sqrt(1 + sigma^2) (the VP
  state) at t = sigma_to_t(sigma), fractional unless rounded. EDM Table 1, VP column:
  eps: D = x - sigma F; v: D = x / (sigma^2 + 1) - sigma F / sqrt(sigma^2 + 1); x0: D = F.
- ``SigmaDenoiser``: a sigma-conditioned network with EDM or VE preconditioning
  (c_skip, c_out, c_in, c_noise; ``ldm.diffusion.edm.SigmaTraining``).

Both also give the VP view (eps, x_0) at a ``Level`` of a ladder, for solvers written on the VP
chain (DDPM, DDIM, PLMS); a discrete denoiser evaluates the network there exactly as trained.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from ldm.diffusion.discretization import DiscreteSchedule, Level
from ldm.diffusion.edm import SigmaTraining
from ldm.diffusion.gaussian import PARAMETERIZATIONS, eps_x0_at, v_from_eps_x0

#: The network with its conditioning bound: F(x_in [B, ...], t or c_noise [B]) -> output [B, ...].
ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


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


class Denoiser:
    """D(x; sigma) of a network; ``schedule`` is the discrete VP schedule (None: sigma-continuous)."""

    schedule: DiscreteSchedule | None = None
    sigma_min: float
    sigma_max: float
    #: default ladder when a sampler asks for none: a timestep spacing (discrete) or Karras (EDM)
    default_ladder: dict[str, Any] = {}

    def denoise(self, model_fn: ModelFn, x: torch.Tensor, sigma: float) -> torch.Tensor:
        """x_0 estimate at x = x_0 + sigma n."""
        raise NotImplementedError

    def eps_x0(
        self, model_fn: ModelFn, x_vp: torch.Tensor, level: Level
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(eps, x_0) at the VP state x_vp = sqrt(a) x_0 + sqrt(1 - a) eps of ``level``."""
        s = level.sigma
        x = x_vp * math.sqrt(1 + s**2)
        x0 = self.denoise(model_fn, x, s)
        return (x - x0) / s, x0


class DiscreteDenoiser(Denoiser):
    """eps / v / x0 network on the timesteps of ``alphas_cumprod`` [T]."""

    def __init__(
        self,
        alphas_cumprod: torch.Tensor,
        parameterization: str = "eps",
        interpolation: str = "log",
        round_timesteps: bool = False,
    ) -> None:
        check_parameterization(parameterization)
        self.schedule = DiscreteSchedule(alphas_cumprod, interpolation)
        self.parameterization = parameterization
        self.round_timesteps = round_timesteps
        self.sigma_min, self.sigma_max = self.schedule.sigma_min, self.schedule.sigma_max

    def t_of(self, sigma: float) -> float:
        t = self.schedule.sigma_to_t(sigma)
        return float(t.round() if self.round_timesteps else t)

    def denoise(self, model_fn: ModelFn, x: torch.Tensor, sigma: float) -> torch.Tensor:
        """D = c_skip x + c_out F(c_in x, t(sigma)) with the VP scalings of EDM Table 1."""
        c_in = 1.0 / math.sqrt(sigma**2 + 1)
        out = call_model(model_fn, x * c_in, self.t_of(sigma))
        if self.parameterization == "eps":
            return x - sigma * out
        if self.parameterization == "v":
            return x * (1.0 / (sigma**2 + 1)) - out * (sigma * c_in)
        return out

    def eps_x0(
        self, model_fn: ModelFn, x_vp: torch.Tensor, level: Level
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The network at the level's own timestep (integer on a timestep ladder), as trained."""
        t = level.t if level.t is not None else self.t_of(level.sigma)
        out = call_model(model_fn, x_vp, t)
        return eps_x0_at(out, x_vp, level.alpha_bar, self.parameterization)

    def target(
        self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor
    ) -> torch.Tensor:
        """The training target of the network at x_t = q_sample(x0, t, noise): eps, x0 or v."""
        if self.parameterization == "eps":
            return noise
        if self.parameterization == "x0":
            return x0
        return v_from_eps_x0(noise, x0, t, alphas_cumprod)


class SigmaDenoiser(Denoiser):
    """EDM / VE preconditioned network: D = c_skip x + c_out F(c_in x, c_noise) (Karras et al. 2022)."""

    def __init__(self, training: SigmaTraining) -> None:
        self.training = training
        self.sigma_min, self.sigma_max = float(training.sigma_min), float(training.sigma_max)
        self.parameterization = training.kind
        self.default_ladder = {"karras": True}

    def denoise(self, model_fn: ModelFn, x: torch.Tensor, sigma: float) -> torch.Tensor:
        sigma_b = torch.full((x.shape[0],), float(sigma), device=x.device)
        return self.training.denoise(model_fn, x, sigma_b)
