"""Linear multistep (Adams-Bashforth in sigma) sampler (k-diffusion sample_lms; diffusers LMSDiscreteScheduler)."""

from __future__ import annotations

import numpy as np
import torch

from ldm.samplers.context import SamplerContext
from ldm.samplers.driver import BoundDenoiser, register_solver


def lms_coefficient(sigmas: list[float], i: int, j: int, order: int) -> float:
    """Integral over [sigma_i, sigma_{i+1}] of the Lagrange basis polynomial of node sigma_{i-j}."""
    poly = np.poly1d([1.0])
    for k in range(order):
        if k != j:
            poly *= np.poly1d([1.0, -sigmas[i - k]]) / (sigmas[i - j] - sigmas[i - k])
    antiderivative = np.polyint(poly)
    return float(antiderivative(sigmas[i + 1]) - antiderivative(sigmas[i]))


@register_solver("lms")
def lms(
    denoise: BoundDenoiser,
    x: torch.Tensor,
    sigmas: list[float],
    ctx: SamplerContext,
    *,
    order: int = 4,
) -> torch.Tensor:
    """x_{i+1} = x_i + sum_j c_ij d_{i-j}, exact integrals of the interpolating polynomial of past d's."""
    ds: list[torch.Tensor] = []
    for i in ctx.steps(len(sigmas) - 1):
        denoised = denoise(x, sigmas[i])
        ds.append((x - denoised) / sigmas[i])
        ds = ds[-order:]
        ctx.report(i=i, x=x, sigma=sigmas[i], denoised=denoised)
        cur = min(i + 1, order)
        coeffs = [lms_coefficient(sigmas, i, j, cur) for j in range(cur)]
        x = x + sum(c * d for c, d in zip(coeffs, reversed(ds)))
    return x
