"""UniPC: unified predictor-corrector, B(h) = e^h - 1 ("bh2"), data prediction (Zhao et al. 2023, arXiv 2302.04867).

Written in the variance-exploding view x = x_0 + sigma eps with lambda = -log(sigma); algebraically the
update of diffusers' UniPCMultistepScheduler (predict_x0=True, lower_order_final=True).
"""

from __future__ import annotations

import math

import torch

from ldm.samplers.context import SamplerContext
from ldm.samplers.driver import BoundDenoiser, register_solver


def _coefficients(
    hh: float, order: int, rks: list[float], variant: str
) -> tuple[float, float, torch.Tensor, torch.Tensor]:
    """(h*phi_1, B(h), R [order, order], b [order]) of UniPC's linear system (paper eq. 9 / Alg. 3)."""
    h_phi_1 = math.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    b_h = hh if variant == "bh1" else math.expm1(hh)
    rk = torch.tensor(rks, dtype=torch.float64)
    rows, b = [], []
    factorial = 1
    for k in range(1, order + 1):
        rows.append(rk ** (k - 1))
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return h_phi_1, b_h, torch.stack(rows), torch.tensor(b, dtype=torch.float64)


def _update(
    x: torch.Tensor,
    sigma: float,
    sigma_next: float,
    hist: list[tuple[float, torch.Tensor]],
    order: int,
    variant: str,
    model_next: torch.Tensor | None = None,
) -> torch.Tensor:
    """UniP (model_next None) or UniC step from the newest history point (lam, x_0 estimate)."""
    lam0, m0 = hist[-1]
    h = -math.log(sigma_next) - lam0
    rks, d1s = [], []
    for k in range(1, order):
        lam_k, m_k = hist[-(k + 1)]
        rks.append((lam_k - lam0) / h)
        d1s.append((m_k - m0) / rks[-1])
    rks.append(1.0)
    h_phi_1, b_h, R, b = _coefficients(-h, order, rks, variant)
    x_next = (sigma_next / sigma) * x - h_phi_1 * m0
    if model_next is None:
        if d1s:
            rhos = [0.5] if order == 2 else torch.linalg.solve(R[:-1, :-1], b[:-1]).tolist()
            x_next = x_next - b_h * sum(r * d for r, d in zip(rhos, d1s))
        return x_next
    rhos = [0.5] if order == 1 else torch.linalg.solve(R, b).tolist()
    corr = sum(r * d for r, d in zip(rhos[:-1], d1s)) if d1s else 0.0
    return x_next - b_h * (corr + rhos[-1] * (model_next - m0))


@register_solver("unipc", style="dpm")
def unipc(
    denoise: BoundDenoiser,
    x: torch.Tensor,
    sigmas: list[float],
    ctx: SamplerContext,
    *,
    order: int = 2,
    variant: str = "bh2",
    lower_order_final: bool = True,
    disable_corrector: tuple[int, ...] = (),
) -> torch.Tensor:
    """UniPC-p multistep: UniC corrects x_i with the model output at x_i, then UniP predicts x_{i+1}."""
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"variant must be 'bh1' or 'bh2', got {variant!r}")
    n = len(sigmas) - 1
    hist: list[tuple[float, torch.Tensor]] = []
    last_x, this_order = None, 1
    for i in ctx.steps(n):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        m = denoise(x, sigma)
        ctx.report(i=i, x=x, sigma=sigma, denoised=m)
        if last_x is not None and (i - 1) not in disable_corrector:
            x = _update(last_x, sigmas[i - 1], sigma, hist, this_order, variant, model_next=m)
        hist = (hist + [(-math.log(sigma), m)])[-order:]
        this_order = min(order, n - i) if lower_order_final else order
        this_order = min(this_order, i + 1)
        last_x = x
        if sigma_next == 0:
            x = m
            break
        x = _update(x, sigma, sigma_next, hist, this_order, variant)
    return x
