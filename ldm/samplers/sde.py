"""Score-SDE samplers (Song et al. 2021, "Score-Based Generative Modeling through SDEs").

The same trained model seen as a score s(x, sigma) = grad log p_sigma(x) of either SDE:

- VE-SDE (NCSN, eq. 9): x_sigma = x_0 + sigma n, dx = sqrt(d[sigma^2]/dt) dw.
- VP-SDE (DDPM, eq. 11): x = sqrt(a) x_0 + sqrt(1 - a) n with a = alpha_bar = 1 / (1 + sigma^2),
  dx = -1/2 beta x dt + sqrt(beta) dw.

Every solver here is a function of a denoiser D(x; sigma) (VE coordinates, EDM's convention),
from which s_VE(x, sigma) = (D(x; sigma) - x) / sigma^2 and, through x_VE = x_VP sqrt(1 + sigma^2),
the VP score. The time variable is the noise level: a step sigma_i -> sigma_{i+1} integrates
g^2 exactly (VE: sigma_i^2 - sigma_{i+1}^2; VP: int beta dt = log(1 + sigma_i^2) - log(1 + sigma_{i+1}^2)),
so Euler-Maruyama is taken in that integrated time. Samplers:

- `reverse_sde`: Euler-Maruyama on the reverse SDE (eq. 6), optional Langevin corrector
  steps after each predictor step (predictor-corrector, Algorithms 2-5).
- `annealed_langevin`: annealed Langevin dynamics (Song & Ermon 2019, Algorithm 1).
- `probability_flow`: the probability-flow ODE (eq. 13), Euler or Heun (Karras et al. 2022, Alg. 1).

They register with the solver driver as `vp_sde`, `ve_sde`, `vp_pc`, `ve_pc`, `annealed_langevin`
and `probability_flow`, so they take any denoiser (discrete VP, EDM, VE) and any discretization.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ldm.samplers.context import SamplerContext
from ldm.samplers.driver import register_solver

DenoiserFn = Callable[[torch.Tensor, float], torch.Tensor]  # D(x_VE; sigma) -> x_0 estimate
SDE_KINDS = ("vp", "ve")


@dataclass(frozen=True)
class SDE:
    """VE or VP view; `to_ve` / `from_ve` map the state between coordinates at noise level sigma."""

    kind: str

    def __post_init__(self) -> None:
        if self.kind not in SDE_KINDS:
            raise ValueError(f"sde must be one of {list(SDE_KINDS)}, got {self.kind!r}")

    def to_ve(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        return x * math.sqrt(1 + sigma**2) if self.kind == "vp" else x

    def from_ve(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        return x / math.sqrt(1 + sigma**2) if self.kind == "vp" else x

    def score(self, denoiser: DenoiserFn, x: torch.Tensor, sigma: float) -> torch.Tensor:
        """grad_x log p_sigma(x) in this SDE's coordinates (Tweedie: D = x_VE + sigma^2 s_VE)."""
        x_ve = self.to_ve(x, sigma)
        s_ve = (denoiser(x_ve, sigma) - x_ve) / sigma**2
        return s_ve * math.sqrt(1 + sigma**2) if self.kind == "vp" else s_ve

    def step_coefficients(self, sigma: float, sigma_next: float) -> tuple[float, float]:
        """(a, G) of one reverse step: -f dt = a x and g^2 dt = G integrated over the step."""
        if self.kind == "ve":
            return 0.0, sigma**2 - sigma_next**2
        big_b = math.log1p(sigma**2) - math.log1p(sigma_next**2)  # int beta(t) dt
        return 0.5 * big_b, big_b

    def langevin_alpha(self, sigma: float, sigma_next: float) -> float:
        """alpha_i of the Langevin step size: 1 (VE, Alg. 4); 1 - beta_i ~ exp(-int beta) (VP, Alg. 5)."""
        return 1.0 if self.kind == "ve" else math.exp(-self.step_coefficients(sigma, sigma_next)[1])


def _norm(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).norm(dim=1).view(-1, *([1] * (x.ndim - 1)))  # [B, 1, ..., 1]


def langevin_correct(
    score_fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    n_steps: int,
    snr: float,
    alpha: float,
    ctx: SamplerContext,
) -> torch.Tensor:
    """Langevin corrector: eps = 2 alpha (r ||z|| / ||s||)^2, x <- x + eps s + sqrt(2 eps) z (Alg. 4/5)."""
    for _ in range(n_steps):
        grad = score_fn(x)
        z = ctx.randn(x)
        step = 2 * alpha * (snr * _norm(z) / _norm(grad).clamp(min=1e-12)) ** 2
        x = x + step * grad + (2 * step).sqrt() * z
    return x


def reverse_sde(
    denoiser: DenoiserFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    sde: SDE,
    ctx: SamplerContext | None = None,
    corrector_steps: int = 0,
    snr: float = 0.16,
    denoise_last: bool = True,
) -> torch.Tensor:
    """Euler-Maruyama on the reverse SDE x <- x + a x + G s + sqrt(G) z over descending `sigmas`
    (x in the SDE's coordinates at sigmas[0]); Langevin corrector steps when corrector_steps > 0.
    Returns the denoised D(x; sigmas[-1]) (Song et al.'s noise removal) or the last state."""
    ctx = ctx or SamplerContext()
    sig = [float(s) for s in sigmas]
    for i in range(len(sig) - 1):
        s, s_next = sig[i], sig[i + 1]
        a, g2 = sde.step_coefficients(s, s_next)
        score = sde.score(denoiser, x, s)
        x = x + a * x + g2 * score + math.sqrt(g2) * ctx.randn(x)
        if corrector_steps:
            x = langevin_correct(
                lambda y, s_next=s_next: sde.score(denoiser, y, s_next),
                x,
                corrector_steps,
                snr,
                sde.langevin_alpha(s, s_next),
                ctx,
            )
        ctx.report(i=i, x=x, sigma=s_next)
    return _finish(denoiser, x, sig[-1], sde, denoise_last)


def probability_flow(
    denoiser: DenoiserFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    sde: SDE,
    ctx: SamplerContext | None = None,
    heun: bool = True,
    denoise_last: bool = True,
) -> torch.Tensor:
    """Probability-flow ODE (eq. 13), Euler or Heun's 2nd order (Karras et al. 2022, Alg. 1).

    VE: dx/dsigma = -sigma s(x, sigma); VP: dx/dlambda = (x + s(x, sigma)) / 2 with
    lambda = log(1 + sigma^2) = int beta dt.
    """
    ctx = ctx or SamplerContext()
    sig = [float(s) for s in sigmas]
    for i in range(len(sig) - 1):
        s, s_next = sig[i], sig[i + 1]
        d = ode_increment(denoiser, x, s, s_next, s, sde)
        if heun:
            d_next = ode_increment(denoiser, x + d, s, s_next, s_next, sde)
            x = x + 0.5 * (d + d_next)
        else:
            x = x + d
        ctx.report(i=i, x=x, sigma=s_next)
    return _finish(denoiser, x, sig[-1], sde, denoise_last)


def ode_increment(
    denoiser: DenoiserFn, x: torch.Tensor, s: float, s_next: float, s_eval: float, sde: SDE
) -> torch.Tensor:
    """(step of the ODE's time variable) x (its rate evaluated at noise level s_eval)."""
    score = sde.score(denoiser, x, s_eval)
    if sde.kind == "ve":
        return (s - s_next) * s_eval * score
    d_lambda = math.log1p(s**2) - math.log1p(s_next**2)
    return 0.5 * d_lambda * (x + score)


def _finish(
    denoiser: DenoiserFn, x: torch.Tensor, sigma: float, sde: SDE, denoise_last: bool
) -> torch.Tensor:
    """Data-space output: D(x; sigma_last) (Tweedie) or the state mapped to data scale."""
    x_ve = sde.to_ve(x, sigma)
    return denoiser(x_ve, sigma) if denoise_last else x_ve


def annealed_langevin(
    denoiser: DenoiserFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    ctx: SamplerContext | None = None,
    n_steps_each: int = 100,
    step_lr: float = 2e-5,
    denoise_last: bool = True,
) -> torch.Tensor:
    """NCSN annealed Langevin dynamics: for each sigma_i, alpha_i = step_lr sigma_i^2 / sigma_L^2 and
    n_steps_each updates x <- x + alpha_i / 2 s(x, sigma_i) + sqrt(alpha_i) z (VE coordinates)."""
    ctx = ctx or SamplerContext()
    sig = [float(s) for s in sigmas]
    ve = SDE("ve")
    for i, s in enumerate(sig):
        alpha = step_lr * (s / sig[-1]) ** 2
        for _ in range(n_steps_each):
            x = x + 0.5 * alpha * ve.score(denoiser, x, s) + math.sqrt(alpha) * ctx.randn(x)
        ctx.report(i=i, x=x, sigma=s)
    return denoiser(x, sig[-1]) if denoise_last else x


# ---------------------------------------------------------------------- registration
def _positive(sigmas: list[float]) -> list[float]:
    """The ladder without its final sigma = 0 (these solvers end with a denoising step instead)."""
    return [float(s) for s in sigmas if s > 0]


def _register_sde(kind: str, pc: bool) -> None:
    name = f"{kind}_{'pc' if pc else 'sde'}"
    ladder = {"exponential": True} if kind == "ve" else {}

    def solver(
        denoise: DenoiserFn,
        x: torch.Tensor,
        sigmas: list[float],
        ctx: SamplerContext,
        *,
        corrector_steps: int = 1,
        snr: float = 0.16 if kind == "ve" else 0.01,
    ) -> torch.Tensor:
        sig = _positive(sigmas)
        sde = SDE(kind)
        x = sde.from_ve(x, sig[0])
        return reverse_sde(denoise, x, sig, sde, ctx, corrector_steps if pc else 0, snr)

    solver.__doc__ = (
        f"{kind.upper()}-SDE "
        f"{'predictor-corrector (Langevin corrector)' if pc else 'reverse Euler-Maruyama'} "
        "sampler (Song et al. 2021)."
    )
    solver.__name__ = name
    register_solver(name, noise_scaling="vp", **ladder)(solver)


for _kind in SDE_KINDS:
    for _pc in (False, True):
        _register_sde(_kind, _pc)


def _probability_flow_ladder(options: dict[str, Any]) -> dict[str, Any]:
    """VE view: geometric sigmas by default; VP view: the schedule's timesteps."""
    return {"noise_scaling": "vp", "exponential": options.get("sde", "vp") == "ve"}


@register_solver("probability_flow", defaults_of=_probability_flow_ladder)
def probability_flow_solver(
    denoise: DenoiserFn,
    x: torch.Tensor,
    sigmas: list[float],
    ctx: SamplerContext,
    *,
    sde: str = "vp",
    heun: bool = True,
) -> torch.Tensor:
    """Probability-flow ODE (Song et al. 2021, eq. 13) of the VP or VE view, Heun by default.

    In the VE view this ODE is dx/dsigma = (x - D) / sigma: the ``heun`` / ``euler`` solvers
    (EDM Alg. 1) over the same ladder; the VP view integrates in lambda = log(1 + sigma^2).
    """
    view = SDE(sde)
    if view.kind == "ve":
        from ldm.samplers.euler import euler
        from ldm.samplers.euler import heun as heun_solver

        return (heun_solver if heun else euler)(denoise, x, sigmas, ctx)
    sig = _positive(sigmas)
    return probability_flow(denoise, view.from_ve(x, sig[0]), sig, view, ctx, heun=heun)


@register_solver("annealed_langevin", noise_scaling="vp", exponential=True)
def annealed_langevin_solver(
    denoise: DenoiserFn,
    x: torch.Tensor,
    sigmas: list[float],
    ctx: SamplerContext,
    *,
    n_steps_each: int = 100,
    step_lr: float = 2e-5,
    denoise_last: bool = True,
) -> torch.Tensor:
    """NCSN annealed Langevin dynamics over the ladder's positive noise levels (geometric in
    [sigma_min, sigma_max] by default) (Song & Ermon 2019, Alg. 1)."""
    return annealed_langevin(
        denoise, x, _positive(sigmas), ctx, n_steps_each, step_lr, denoise_last
    )
