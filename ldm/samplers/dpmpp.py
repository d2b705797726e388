"""DPM-Solver++ samplers in lambda = -log(sigma) (Lu et al. 2022, arXiv 2211.01095; k-diffusion forms).

Multistep ones (``dpmpp_2m``, ``dpmpp_2m_sde``, ``dpmpp_3m_sde``) default to the timestep spacing of
diffusers' DPMSolverMultistepScheduler (style "dpm"); ``dpmpp_2s_a`` / ``dpmpp_sde`` are single-step.
"""

from __future__ import annotations

import math

import torch

from ldm.samplers.context import SamplerContext
from ldm.samplers.driver import BoundDenoiser, register_solver
from ldm.samplers.euler import ancestral_step


def _lam(sigma: float) -> float:
    return -math.log(sigma)


@register_solver("dpmpp_2m", style="dpm")
def dpmpp_2m(
    denoise: BoundDenoiser, x: torch.Tensor, sigmas: list[float], ctx: SamplerContext
) -> torch.Tensor:
    """DPM-Solver++(2M), multistep 2nd order data-prediction solver (Lu et al. 2022, Alg. 2)."""
    old_denoised, h_last = None, None
    for i in ctx.steps(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(x, sigma)
        ctx.report(i=i, x=x, sigma=sigma, denoised=denoised)
        if sigma_next == 0:
            x = denoised
            break
        h = _lam(sigma_next) - _lam(sigma)
        d = denoised
        if old_denoised is not None:
            r = h_last / h
            d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
        x = (sigma_next / sigma) * x - math.expm1(-h) * d
        old_denoised, h_last = denoised, h
    return x


@register_solver("dpmpp_2m_sde", style="dpm")
def dpmpp_2m_sde(
    denoise: BoundDenoiser,
    x: torch.Tensor,
    sigmas: list[float],
    ctx: SamplerContext,
    *,
    eta: float = 1.0,
    s_noise: float = 1.0,
    solver_type: str = "midpoint",
) -> torch.Tensor:
    """SDE-DPM-Solver++(2M) (Lu et al. 2022, sec. 5 / app. B; k-diffusion sample_dpmpp_2m_sde)."""
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    old_denoised, h_last = None, None
    for i in ctx.steps(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(x, sigma)
        ctx.report(i=i, x=x, sigma=sigma, denoised=denoised)
        if sigma_next == 0:
            x = denoised
            break
        h = _lam(sigma_next) - _lam(sigma)
        eta_h = eta * h
        phi = -math.expm1(-h - eta_h)
        x = (sigma_next / sigma) * math.exp(-eta_h) * x + phi * denoised
        if old_denoised is not None:
            r = h_last / h
            if solver_type == "heun":
                x = x + (phi / (-h - eta_h) + 1) * (1 / r) * (denoised - old_denoised)
            else:
                x = x + 0.5 * phi * (1 / r) * (denoised - old_denoised)
        if eta:
            x = x + ctx.randn(x) * sigma_next * math.sqrt(-math.expm1(-2 * eta_h)) * s_noise
        old_denoised, h_last = denoised, h
    return x


@register_solver("dpmpp_3m_sde", style="dpm")
def dpmpp_3m_sde(
    denoise: BoundDenoiser,
    x: torch.Tensor,
    sigmas: list[float],
    ctx: SamplerContext,
    *,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> torch.Tensor:
    """SDE-DPM-Solver++(3M): 3rd order multistep with eta-scaled noise (k-diffusion sample_dpmpp_3m_sde)."""
    d_1 = d_2 = None
    h_1 = h_2 = None
    for i in ctx.steps(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(x, sigma)
        ctx.report(i=i, x=x, sigma=sigma, denoised=denoised)
        if sigma_next == 0:
            x = denoised
            break
        h = _lam(sigma_next) - _lam(sigma)
        h_eta = h * (eta + 1)
        x = math.exp(-h_eta) * x - math.expm1(-h_eta) * denoised
        phi_2 = math.expm1(-h_eta) / h_eta + 1
        if h_2 is not None:
            r0, r1 = h_1 / h, h_2 / h
            d1_0 = (denoised - d_1) / r0
            d1_1 = (d_1 - d_2) / r1
            d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            phi_3 = phi_2 / h_eta - 0.5
            x = x + phi_2 * d1 - phi_3 * d2
        elif h_1 is not None:
            x = x + phi_2 * (denoised - d_1) / (h_1 / h)
        if eta:
            x = x + ctx.randn(x) * sigma_next * math.sqrt(-math.expm1(-2 * h * eta)) * s_noise
        d_1, d_2 = denoised, d_1
        h_1, h_2 = h, h_1
    return x


@register_solver("dpmpp_2s_a")
def dpmpp_2s_ancestral(
    denoise: BoundDenoiser,
    x: torch.Tensor,
    sigmas: list[float],
    ctx: SamplerContext,
    *,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> torch.Tensor:
    """Ancestral DPM-Solver++(2S): single-step 2nd order to sigma_down, then noise (k-diffusion)."""
    for i in ctx.steps(len(sigmas) - 1):
        sigma = sigmas[i]
        denoised = denoise(x, sigma)
        ctx.report(i=i, x=x, sigma=sigma, denoised=denoised)
        down, up = ancestral_step(sigma, sigmas[i + 1], eta)
        if down == 0:
            x = denoised
        else:
            h = _lam(down) - _lam(sigma)
            s = math.exp(-(_lam(sigma) + h / 2))
            x_2 = (s / sigma) * x - math.expm1(-h / 2) * denoised
            x = (down / sigma) * x - math.expm1(-h) * denoise(x_2, s)
        if sigmas[i + 1] > 0:
            x = x + ctx.randn(x) * s_noise * up
    return x


def _bridge(z_full: torch.Tensor, frac: float, ctx: SamplerContext) -> torch.Tensor:
    """Normalised Brownian increment over the first ``frac`` of an interval, given the full one's."""
    return math.sqrt(frac) * z_full + math.sqrt(1 - frac) * ctx.randn(z_full)


@register_solver("dpmpp_sde")
def dpmpp_sde(
    denoise: BoundDenoiser,
    x: torch.Tensor,
    sigmas: list[float],
    ctx: SamplerContext,
    *,
    eta: float = 1.0,
    s_noise: float = 1.0,
    r: float = 0.5,
) -> torch.Tensor:
    """DPM-Solver++ (stochastic, 2 stages per step; k-diffusion sample_dpmpp_sde).

    The two noise draws of a step are consistent Brownian increments (a Brownian bridge in sigma),
    which is what k-diffusion's BrownianTreeNoiseSampler provides, without torchsde.
    """
    for i in ctx.steps(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoise(x, sigma)
        ctx.report(i=i, x=x, sigma=sigma, denoised=denoised)
        if sigma_next == 0:
            x = denoised
            break
        lam, lam_next = _lam(sigma), _lam(sigma_next)
        h = lam_next - lam
        s = math.exp(-(lam + h * r))
        fac = 1 / (2 * r)
        z_full = ctx.randn(x)
        z_part = _bridge(z_full, (sigma - s) / (sigma - sigma_next), ctx)
        down, up = ancestral_step(sigma, s, eta)
        x_2 = (down / sigma) * x - math.expm1(lam - _lam(down)) * denoised
        x_2 = x_2 + z_part * s_noise * up
        denoised_2 = denoise(x_2, s)
        down, up = ancestral_step(sigma, sigma_next, eta)
        denoised_d = (1 - fac) * denoised + fac * denoised_2
        x = (down / sigma) * x - math.expm1(lam - _lam(down)) * denoised_d
        x = x + z_full * s_noise * up
    return x
