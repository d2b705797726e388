"""Training-objective pieces of the diffusion modules (no Lightning).

- `elementwise_loss`: the L_simple distance (Ho et al. 2020 eq. 14), l2 or l1.
- `lvlb_weights`: per-timestep weights turning L_simple into the variational bound term L_{t-1}
  (Ho et al. 2020 eq. 8-12) for eps, x0 and v parameterizations.
- `min_snr_weights`: Min-SNR-gamma weighting (Hang et al. 2023, arXiv 2303.09556, eq. 7), with an
  optional floor (truncated SNR, Salimans & Ho 2022).
- `offset_noise`: noise + s * per-channel constant (Guttenberg 2023, "Diffusion with offset noise").
- `perturb_noise`: input perturbation eps' = eps + gamma * xi (Ning et al. 2023, arXiv 2301.11706).
"""

from __future__ import annotations

import torch

from ldm.diffusion.gaussian import PARAMETERIZATIONS

LOSS_TYPES = ("l2", "l1")


def elementwise_loss(
    pred: torch.Tensor, target: torch.Tensor, loss_type: str = "l2"
) -> torch.Tensor:
    """|pred - target| (l1) or (pred - target)^2 (l2), not reduced."""
    if loss_type == "l2":
        return torch.nn.functional.mse_loss(pred, target, reduction="none")
    if loss_type == "l1":
        return (pred - target).abs()
    raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {list(LOSS_TYPES)}")


def lvlb_weights(
    betas: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    posterior_variance: torch.Tensor,
    parameterization: str,
) -> torch.Tensor:
    """w_t with L_{t-1} = w_t ||target - model_out||^2 (Ho et al. 2020 eq. 12, one sigma_t^2 per t).

    eps: beta_t^2 / (2 sigma_t^2 alpha_t (1 - alpha_bar_t)) (CompVis); x0: coef1_t^2 / (2 sigma_t^2)
    with coef1 = beta_t sqrt(alpha_bar_{t-1}) / (1 - alpha_bar_t); v: the eps weight times
    alpha_bar_t, because eps - eps_hat = sqrt(alpha_bar_t) (v - v_hat). w_0 is set to w_1 (sigma_0 = 0).
    """
    betas = betas.to(torch.float64)
    ac = alphas_cumprod.to(torch.float64)
    var = posterior_variance.to(torch.float64)
    alphas = 1.0 - betas
    ac_prev = torch.cat([torch.ones_like(ac[:1]), ac[:-1]])
    if parameterization == "eps":
        w = betas**2 / (2 * var * alphas * (1 - ac))
    elif parameterization == "x0":
        coef1 = betas * ac_prev.sqrt() / (1.0 - ac)
        w = coef1**2 / (2 * var)
    elif parameterization == "v":
        w = betas**2 / (2 * var * alphas * (1 - ac)) * ac
    else:
        raise ValueError(
            f"unknown parameterization {parameterization!r}; expected one of {list(PARAMETERIZATIONS)}"
        )
    w = w.clone()
    if w.numel() > 1:
        w[0] = w[1]
    # zero terminal SNR: no VLB term at alpha_bar = 0 (eps: 1/0 = inf -> 0; v: inf * 0 = nan -> 0,
    # nan_to_num's default)
    w = torch.nan_to_num(w, posinf=0.0)
    return w.to(torch.float32)


NATIVE_X0_WEIGHT = {  # weight on ||x0 - x0_hat||^2 that plain MSE in each parameterization implies
    "eps": lambda snr: snr,
    "v": lambda snr: snr + 1,
    "x0": lambda snr: torch.ones_like(snr),
}


def min_snr_weights(
    snr: torch.Tensor, gamma: float | None, parameterization: str, floor: float | None = None
) -> torch.Tensor:
    """Per-sample loss weights that make the x0-space weight clamp(SNR, floor, gamma).

    Plain MSE weighs x0 errors by SNR (eps), SNR + 1 (v) or 1 (x0). Min-SNR-gamma (Hang et al.
    2023, eq. 7) caps that at gamma: weight min(SNR, gamma) / SNR (eps), / (SNR + 1) (v), or
    min(SNR, gamma) (x0). `floor` lifts the low-SNR end to at least `floor` (1.0: the truncated
    SNR weighting max(SNR, 1) of Salimans & Ho 2022, sec. 4), so the noisiest steps, where the
    layout of an image is decided, are not starved; either bound may be None.
    """
    if parameterization not in NATIVE_X0_WEIGHT:
        raise ValueError(
            f"unknown parameterization {parameterization!r}; expected one of {list(PARAMETERIZATIONS)}"
        )
    if gamma is None and floor is None:
        return torch.ones_like(snr)
    target = snr.clamp(min=floor, max=gamma)
    return target / NATIVE_X0_WEIGHT[parameterization](snr).clamp(min=1e-20)


def offset_noise(
    noise: torch.Tensor, strength: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """noise + strength * n, n ~ N(0, 1) constant over the spatial dims: [B, C, *1]."""
    if strength == 0:
        return noise
    shape = noise.shape[:2] + (1,) * (noise.ndim - 2)  # [B, C, 1, 1]
    n = torch.randn(shape, generator=generator, device=noise.device, dtype=noise.dtype)
    return noise + strength * n


def perturb_noise(
    noise: torch.Tensor, gamma: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """eps + gamma * xi with fresh xi ~ N(0, I): the noise used for x_t, while the target stays eps."""
    if gamma == 0:
        return noise
    xi = torch.randn(noise.shape, generator=generator, device=noise.device, dtype=noise.dtype)
    return noise + gamma * xi
