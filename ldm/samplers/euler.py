"""Euler / Heun / DPM-2 samplers and their ancestral variants (Karras et al. 2022, Alg. 1-2; k-diffusion)."""

from __future__ import annotations

import math

import torch

from ldm.samplers.context import SamplerContext
from ldm.samplers.driver import BoundDenoiser, register_solver


def ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """(sigma_down, sigma_up) splitting sigma -> sigma_next into a deterministic step plus fresh noise."""
    if not eta or sigma_next == 0:
        return sigma_next, 0.0
    up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    return math.sqrt(sigma_next**2 - up**2), up


def _churn(
    x: torch.Tensor,
    sigma: float,
    n: int,
    ctx: SamplerContext,
    s_churn: float,
    s_tmin: float,
    s_tmax: float,
    s_noise: float,
) -> tuple[torch.Tensor, float]:
    """Stochastic 'churn': raise sigma to sigma_hat = (1 + gamma) sigma by adding noise (EDM Alg. 2, l. 5-6)."""
    gamma = min(s_churn / n, math.sqrt(2) - 1) if s_tmin <= sigma <= s_tmax else 0.0
    sigma_hat = sigma * (gamma + 1)
    if gamma > 0:
        x = x + ctx.randn(x) * s_noise * math.sqrt(sigma_hat**2 - sigma**2)
    return x, sigma_hat


@register_solver("euler")
def euler(
    denoise: BoundDenoiser,
    x: torch.Tensor,
    sigmas: list[float],
    ctx: SamplerContext,
    *,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
) -> torch.Tensor:
    """Euler steps on dx/dsigma = (x - D(x; sigma)) / sigma (EDM Alg. 2 without the 2nd order correction)."""
    n = len(sigmas) - 1
    for i in ctx.steps(n):
        x, sigma_hat = _churn(x, sigmas[i], n, ctx, s_churn, s_tmin, s_tmax, s_noise)
        denoised = denoise(x, sigma_hat)
        d = (x - denoised) / sigma_hat
        ctx.report(i=i, x=x, sigma=sigmas[i], sigma_hat=sigma_hat, denoised=denoised)
        x = x + d * (sigmas[i + 1] - sigma_hat)
    return x


@register_solver("euler_a")
def euler_ancestral(
    denoise: BoundDenoiser,
    x: torch.Tensor,
    sigmas: list[float],
    ctx: SamplerContext,
    *,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> torch.Tensor:
    """Ancestral Euler: Euler to sigma_down, then add sigma_up fresh noise (k-diffusion sample_euler_ancestral)."""
    for i in ctx.steps(len(sigmas) - 1):
        denoised = denoise(x, sigmas[i])
        down, up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        ctx.report(i=i, x=x, sigma=sigmas[i], denoised=denoised)
        x = x + (x - denoised) / sigmas[i] * (down - sigmas[i])
        if sigmas[i + 1] > 0:
            x = x + ctx.randn(x) * s_noise * up
    return x


@register_solver("heun")
def heun(
    denoise: BoundDenoiser,
    x: torch.Tensor,
    sigmas: list[float],
    ctx: SamplerContext,
    *,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
) -> torch.Tensor:
    """Heun's 2nd order method, Euler on the last step to sigma = 0 (EDM Alg. 2)."""
    n = len(sigmas) - 1
    for i in ctx.steps(n):
        x, sigma_hat = _churn(x, sigmas[i], n, ctx, s_churn, s_tmin, s_tmax, s_noise)
        denoised = denoise(x, sigma_hat)
        d = (x - denoised) / sigma_hat
        ctx.report(i=i, x=x, sigma=sigmas[i], sigma_hat=sigma_hat, denoised=denoised)
        dt = sigmas[i + 1] - sigma_hat
        if sigmas[i + 1] == 0:
            x = x + d * dt
            continue
        x_2 = x + d * dt
        d_2 = (x_2 - denoise(x_2, sigmas[i + 1])) / sigmas[i + 1]
        x = x + (d + d_2) / 2 * dt
    return x


def _log_midpoint(a: float, b: float) -> float:
    return math.exp((math.log(a) + math.log(b)) / 2)


@register_solver("dpm_2")
def dpm_2(
    denoise: BoundDenoiser,
    x: torch.Tensor,
    sigmas: list[float],
    ctx: SamplerContext,
    *,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
) -> torch.Tensor:
    """DPM-Solver-2 style midpoint method in log-sigma (k-diffusion sample_dpm_2; Lu et al. 2022 Alg. 1)."""
    n = len(sigmas) - 1
    for i in ctx.steps(n):
        x, sigma_hat = _churn(x, sigmas[i], n, ctx, s_churn, s_tmin, s_tmax, s_noise)
        denoised = denoise(x, sigma_hat)
        d = (x - denoised) / sigma_hat
        ctx.report(i=i, x=x, sigma=sigmas[i], sigma_hat=sigma_hat, denoised=denoised)
        if sigmas[i + 1] == 0:
            x = x + d * (sigmas[i + 1] - sigma_hat)
            continue
        sigma_mid = _log_midpoint(sigma_hat, sigmas[i + 1])
        x_2 = x + d * (sigma_mid - sigma_hat)
        d_2 = (x_2 - denoise(x_2, sigma_mid)) / sigma_mid
        x = x + d_2 * (sigmas[i + 1] - sigma_hat)
    return x


@register_solver("dpm_2_a")
def dpm_2_ancestral(
    denoise: BoundDenoiser,
    x: torch.Tensor,
    sigmas: list[float],
    ctx: SamplerContext,
    *,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> torch.Tensor:
    """Ancestral DPM-2: midpoint step to sigma_down, then sigma_up noise (k-diffusion sample_dpm_2_ancestral)."""
    for i in ctx.steps(len(sigmas) - 1):
        sigma = sigmas[i]
        denoised = denoise(x, sigma)
        down, up = ancestral_step(sigma, sigmas[i + 1], eta)
        d = (x - denoised) / sigma
        ctx.report(i=i, x=x, sigma=sigma, denoised=denoised)
        if down == 0:
            x = x + d * (down - sigma)
        else:
            sigma_mid = _log_midpoint(sigma, down)
            x_2 = x + d * (sigma_mid - sigma)
            d_2 = (x_2 - denoise(x_2, sigma_mid)) / sigma_mid
            x = x + d_2 * (down - sigma)
        if sigmas[i + 1] > 0:
            x = x + ctx.randn(x) * s_noise * up
    return x
