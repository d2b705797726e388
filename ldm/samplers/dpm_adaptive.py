"""DPM-Solver-12/23 with adaptive step size (Lu et al. 2022, arXiv 2206.00927, sec. 3.3 / Alg. 4-5; k-diffusion)."""

from __future__ import annotations

import math

import torch

from ldm.samplers.context import SamplerContext
from ldm.samplers.driver import BoundDenoiser, register_solver
from ldm.samplers.euler import ancestral_step


class PIDStepSizeController:
    """PID control of the step size h from the local error estimate (Söderlind 2003)."""

    def __init__(
        self,
        h: float,
        pcoeff: float,
        icoeff: float,
        dcoeff: float,
        order: float,
        accept_safety: float,
        eps: float = 1e-8,
    ) -> None:
        self.h, self.accept_safety, self.eps = h, accept_safety, eps
        self.b1 = (pcoeff + icoeff + dcoeff) / order
        self.b2 = -(pcoeff + 2 * dcoeff) / order
        self.b3 = dcoeff / order
        self.errs: list[float] = []

    def propose_step(self, error: float) -> bool:
        """Scale h by the limited PID factor; accept the step when the factor passes the safety bound."""
        inv = 1 / (float(error) + self.eps)
        if not self.errs:
            self.errs = [inv, inv, inv]
        self.errs[0] = inv
        factor = self.errs[0] ** self.b1 * self.errs[1] ** self.b2 * self.errs[2] ** self.b3
        factor = 1 + math.atan(factor - 1)
        accept = factor >= self.accept_safety
        if accept:
            self.errs[2], self.errs[1] = self.errs[1], self.errs[0]
        self.h *= factor
        return accept


class _DPMSolver:
    """DPM-Solver steps in t = -log(sigma) on eps(x, t) = (x - D(x; sigma)) / sigma."""

    def __init__(self, denoise: BoundDenoiser) -> None:
        self.denoise = denoise

    @staticmethod
    def sigma(t: float) -> float:
        return math.exp(-t)

    def eps(
        self, cache: dict[str, torch.Tensor], key: str, x: torch.Tensor, t: float
    ) -> torch.Tensor:
        if key not in cache:
            s = self.sigma(t)
            cache[key] = (x - self.denoise(x, s)) / s
        return cache[key]

    def step_1(self, x: torch.Tensor, t: float, t_next: float, cache: dict) -> torch.Tensor:
        """DPM-Solver-1 (DDIM): x - sigma_next (e^h - 1) eps."""
        h = t_next - t
        return x - self.sigma(t_next) * math.expm1(h) * self.eps(cache, "eps", x, t)

    def step_2(
        self, x: torch.Tensor, t: float, t_next: float, cache: dict, r1: float = 0.5
    ) -> torch.Tensor:
        """DPM-Solver-2 (Alg. 1)."""
        h = t_next - t
        eps = self.eps(cache, "eps", x, t)
        s1 = t + r1 * h
        u1 = x - self.sigma(s1) * math.expm1(r1 * h) * eps
        eps_r1 = self.eps(cache, "eps_r1", u1, s1)
        sn = self.sigma(t_next)
        return x - sn * math.expm1(h) * eps - sn / (2 * r1) * math.expm1(h) * (eps_r1 - eps)

    def step_3(
        self,
        x: torch.Tensor,
        t: float,
        t_next: float,
        cache: dict,
        r1: float = 1 / 3,
        r2: float = 2 / 3,
    ) -> torch.Tensor:
        """DPM-Solver-3 (Alg. 2)."""
        h = t_next - t
        eps = self.eps(cache, "eps", x, t)
        s1, s2 = t + r1 * h, t + r2 * h
        u1 = x - self.sigma(s1) * math.expm1(r1 * h) * eps
        eps_r1 = self.eps(cache, "eps_r1", u1, s1)
        phi = math.expm1(r2 * h) / (r2 * h) - 1
        u2 = (
            x
            - self.sigma(s2) * math.expm1(r2 * h) * eps
            - self.sigma(s2) * (r2 / r1) * phi * (eps_r1 - eps)
        )
        eps_r2 = self.eps(cache, "eps_r2", u2, s2)
        sn = self.sigma(t_next)
        return x - sn * math.expm1(h) * eps - sn / r2 * (math.expm1(h) / h - 1) * (eps_r2 - eps)


@register_solver("dpm_adaptive")
def dpm_adaptive(
    denoise: BoundDenoiser,
    x: torch.Tensor,
    sigmas: list[float],
    ctx: SamplerContext,
    *,
    order: int = 3,
    rtol: float = 0.05,
    atol: float = 0.0078,
    h_init: float = 0.05,
    pcoeff: float = 0.0,
    icoeff: float = 1.0,
    dcoeff: float = 0.0,
    accept_safety: float = 0.81,
    eta: float = 0.0,
    s_noise: float = 1.0,
    max_nfe: int = 10_000,
) -> torch.Tensor:
    """Adaptive DPM-Solver-12 / 23 from sigmas[0] to the smallest positive sigma, then one denoise to 0.

    ``steps`` only sets the ladder's end points; the step count comes from the error control.
    """
    if order not in (2, 3):
        raise ValueError(f"dpm_adaptive order must be 2 or 3, got {order}")
    positive = [s for s in sigmas if s > 0]
    solver = _DPMSolver(denoise)
    s, t_end = -math.log(positive[0]), -math.log(positive[-1])
    pid = PIDStepSizeController(
        abs(h_init), pcoeff, icoeff, dcoeff, 1.5 if eta else order, accept_safety
    )
    x_prev, i = x, 0
    start_nfe = denoise.nfe
    while s < t_end - 1e-5:
        if denoise.nfe - start_nfe > max_nfe:
            raise RuntimeError(f"dpm_adaptive exceeded max_nfe={max_nfe}; raise rtol/atol")
        cache: dict[str, torch.Tensor] = {}
        t = min(t_end, s + pid.h)
        down, up = ancestral_step(solver.sigma(s), solver.sigma(t), eta)
        t_ = min(t_end, -math.log(down))
        if order == 2:
            x_low = solver.step_1(x, s, t_, cache)
            x_high = solver.step_2(x, s, t_, cache)
        else:
            x_low = solver.step_2(x, s, t_, cache, r1=1 / 3)
            x_high = solver.step_3(x, s, t_, cache)
        delta = torch.maximum(
            torch.full_like(x_low, atol), rtol * torch.maximum(x_low.abs(), x_prev.abs())
        )
        error = torch.linalg.norm((x_low - x_high) / delta) / x.numel() ** 0.5
        if pid.propose_step(float(error)):
            x_prev = x_low
            x = x_high + (ctx.randn(x) * s_noise * up if up > 0 else 0.0)
            s = t
            ctx.report(i=i, x=x, sigma=solver.sigma(s), denoised=None)
            i += 1
    return denoise(x, positive[-1]) if sigmas[-1] == 0 else x
