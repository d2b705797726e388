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

`register()` adds them to `ldm.samplers` as `vp_sde`, `ve_sde`, `vp_pc`, `ve_pc`,
`annealed_langevin` and `probability_flow`, driven by a discrete-time model function.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ldm.samplers.context import SamplerContext

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


# ---------------------------------------------------------------------- registry adapters
def _setup(
    model_fn: Callable[..., torch.Tensor],
    alphas_cumprod: torch.Tensor,
    parameterization: str,
    steps: int,
    default_ladder: str,
    karras: bool,
    exponential: bool,
    generator: torch.Generator | None,
    callback: Callable[[dict[str, Any]], None] | None,
    disable: bool | None,
) -> tuple[Any, torch.Tensor, SamplerContext]:
    from ldm.samplers.denoiser import Denoiser
    from ldm.samplers.schedule import DiscreteSchedule
    from ldm.samplers.sigmas import build_sigmas

    schedule = DiscreteSchedule(alphas_cumprod)
    denoiser = Denoiser(model_fn, schedule, parameterization)
    if not (karras or exponential):
        exponential = default_ladder == "geometric"
    sigmas = build_sigmas(schedule, steps, karras=karras, exponential=exponential)[:-1]  # [steps]
    ctx = SamplerContext(generator=generator, callback=callback, disable=disable)
    return denoiser, sigmas, ctx


def _make_sde_sampler(kind: str, pc: bool) -> Callable[..., torch.Tensor]:
    ladder = "time" if kind == "vp" else "geometric"

    def sampler(
        model_fn: Callable[..., torch.Tensor],
        x_T: torch.Tensor,
        *,
        steps: int,
        alphas_cumprod: torch.Tensor,
        parameterization: str = "eps",
        generator: torch.Generator | None = None,
        callback: Callable[[dict[str, Any]], None] | None = None,
        disable: bool | None = None,
        karras: bool = False,
        exponential: bool = False,
        corrector_steps: int = 1,
        snr: float = 0.16 if kind == "ve" else 0.01,
        **unused: Any,
    ) -> torch.Tensor:
        _reject(unused, f"{kind}_{'pc' if pc else 'sde'}")
        den, sigmas, ctx = _setup(
            model_fn,
            alphas_cumprod,
            parameterization,
            steps,
            ladder,
            karras,
            exponential,
            generator,
            callback,
            disable,
        )
        sde = SDE(kind)
        x = sde.from_ve(x_T * math.sqrt(1 + float(sigmas[0]) ** 2), float(sigmas[0]))
        return reverse_sde(den, x, sigmas, sde, ctx, corrector_steps if pc else 0, snr)

    sampler.__doc__ = (
        f"{kind.upper()}-SDE {'predictor-corrector (Langevin corrector)' if pc else 'reverse Euler-Maruyama'} "
        "sampler (Song et al. 2021) over a discrete-time model function."
    )
    return sampler


def probability_flow_sampler(
    model_fn: Callable[..., torch.Tensor],
    x_T: torch.Tensor,
    *,
    steps: int,
    alphas_cumprod: torch.Tensor,
    parameterization: str = "eps",
    generator: torch.Generator | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    disable: bool | None = None,
    sde: str = "vp",
    heun: bool = True,
    karras: bool = False,
    exponential: bool = False,
    **unused: Any,
) -> torch.Tensor:
    """Probability-flow ODE (Song et al. 2021, eq. 13) of the VP or VE view, Heun by default."""
    _reject(unused, "probability_flow")
    den, sigmas, ctx = _setup(
        model_fn,
        alphas_cumprod,
        parameterization,
        steps,
        "time" if sde == "vp" else "geometric",
        karras,
        exponential,
        generator,
        callback,
        disable,
    )
    view = SDE(sde)
    x = view.from_ve(x_T * math.sqrt(1 + float(sigmas[0]) ** 2), float(sigmas[0]))
    return probability_flow(den, x, sigmas, view, ctx, heun=heun)


def annealed_langevin_sampler(
    model_fn: Callable[..., torch.Tensor],
    x_T: torch.Tensor,
    *,
    steps: int,
    alphas_cumprod: torch.Tensor,
    parameterization: str = "eps",
    generator: torch.Generator | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    disable: bool | None = None,
    n_steps_each: int = 100,
    step_lr: float = 2e-5,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    denoise_last: bool = True,
    **unused: Any,
) -> torch.Tensor:
    """NCSN annealed Langevin dynamics over `steps` geometric noise levels in [sigma_min, sigma_max]
    (default: the schedule's range) (Song & Ermon 2019, Alg. 1)."""
    _reject(unused, "annealed_langevin")
    from ldm.samplers.sigmas import exponential_sigmas

    den, sigmas, ctx = _setup(
        model_fn,
        alphas_cumprod,
        parameterization,
        steps,
        "geometric",
        False,
        True,
        generator,
        callback,
        disable,
    )
    lo = float(sigmas[-1]) if sigma_min is None else float(sigma_min)
    hi = float(sigmas[0]) if sigma_max is None else float(sigma_max)
    sigmas = exponential_sigmas(steps, lo, hi)
    x = x_T * math.sqrt(1 + hi**2)
    return annealed_langevin(den, x, sigmas, ctx, n_steps_each, step_lr, denoise_last)


def _reject(unused: dict[str, Any], name: str) -> None:
    if unused:
        raise ValueError(
            f"sampler {name!r} got unknown option(s) {sorted(unused)}; see "
            f"ldm.samplers.sde for its options."
        )


SDE_SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "vp_sde": _make_sde_sampler("vp", pc=False),
    "ve_sde": _make_sde_sampler("ve", pc=False),
    "vp_pc": _make_sde_sampler("vp", pc=True),
    "ve_pc": _make_sde_sampler("ve", pc=True),
    "probability_flow": probability_flow_sampler,
    "annealed_langevin": annealed_langevin_sampler,
}


def register() -> None:
    """Add the score-SDE samplers to ldm.samplers' registry (idempotent)."""
    from ldm.samplers.registry import register_sampler

    for name, fn in SDE_SAMPLERS.items():
        register_sampler(name, fn, overwrite=True)


register()
