"""Gaussian forward process q(x_t | x_0), its posterior, and eps / x0 / v conversions (DDPM; Salimans & Ho 2022).

Convention: ``t`` is a LongTensor of training-timestep indices [B] into ``alphas_cumprod`` [T]
(float64 recommended); coefficients are gathered in the schedule's dtype and cast to the data's.
"""

from __future__ import annotations

import math

import torch

#: Network outputs of a discrete VP model: noise, data, or velocity (Salimans & Ho 2022).
PARAMETERIZATIONS = ("eps", "x0", "v")


def _extract(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """values[t] reshaped to [B, 1, ..., 1] to broadcast against ``like`` [B, ...]."""
    t = torch.as_tensor(t, device=values.device).long().reshape(-1)
    out = values.gather(0, t).to(device=like.device, dtype=like.dtype)
    return out.reshape(t.shape[0], *([1] * (like.ndim - 1)))  # [B, 1, ..., 1]


def _schedule(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(alphas_cumprod, dtype=torch.float64)


def q_sample(
    x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor
) -> torch.Tensor:
    """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps (DDPM eq. 4)."""
    ac = _schedule(alphas_cumprod)
    return _extract(ac.sqrt(), t, x0) * x0 + _extract((1 - ac).sqrt(), t, x0) * noise


def posterior_coefficients(
    alphas_cumprod: torch.Tensor, v_posterior: float = 0.0
) -> dict[str, torch.Tensor]:
    """Buffers of q(x_{t-1} | x_t, x_0) (DDPM eqs. 6-7): mean coefs, variance, clipped log-variance.

    ``v_posterior`` blends the variance towards beta_t as in CompVis:
    sigma^2 = (1 - v) * beta_tilde_t + v * beta_t. The log-variance is clamped at 1e-20 (CompVis).
    """
    ac = _schedule(alphas_cumprod)
    ac_prev = torch.cat([ac.new_ones(1), ac[:-1]])
    alphas = ac / ac_prev
    betas = 1 - alphas
    variance = (1 - v_posterior) * betas * (1 - ac_prev) / (1 - ac) + v_posterior * betas
    return {
        "posterior_mean_coef1": betas * ac_prev.sqrt() / (1 - ac),
        "posterior_mean_coef2": (1 - ac_prev) * alphas.sqrt() / (1 - ac),
        "posterior_variance": variance,
        "posterior_log_variance_clipped": variance.clamp(min=1e-20).log(),
    }


def posterior(
    x0: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    v_posterior: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0) (DDPM eq. 7)."""
    c = posterior_coefficients(alphas_cumprod, v_posterior)
    mean = (
        _extract(c["posterior_mean_coef1"], t, x_t) * x0
        + _extract(c["posterior_mean_coef2"], t, x_t) * x_t
    )
    return (
        mean,
        _extract(c["posterior_variance"], t, x_t),
        _extract(c["posterior_log_variance_clipped"], t, x_t),
    )


def predict_x0_from_eps(
    x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, alphas_cumprod: torch.Tensor
) -> torch.Tensor:
    """x_0 = (x_t - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar) (DDPM eq. 15)."""
    ac = _schedule(alphas_cumprod)
    return _extract((1 / ac).sqrt(), t, x_t) * x_t - _extract((1 / ac - 1).sqrt(), t, x_t) * eps


def predict_eps_from_x0(
    x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor, alphas_cumprod: torch.Tensor
) -> torch.Tensor:
    """eps = (x_t / sqrt(alpha_bar) - x_0) / sqrt(1/alpha_bar - 1), inverse of DDPM eq. 15."""
    ac = _schedule(alphas_cumprod)
    return (_extract((1 / ac).sqrt(), t, x_t) * x_t - x0) / _extract((1 / ac - 1).sqrt(), t, x_t)


def v_from_eps_x0(
    eps: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor
) -> torch.Tensor:
    """v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x_0 (Salimans & Ho 2022, sec. 4)."""
    ac = _schedule(alphas_cumprod)
    return _extract(ac.sqrt(), t, x0) * eps - _extract((1 - ac).sqrt(), t, x0) * x0


def x0_from_v(
    x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor, alphas_cumprod: torch.Tensor
) -> torch.Tensor:
    """x_0 = sqrt(alpha_bar) x_t - sqrt(1 - alpha_bar) v (Salimans & Ho 2022, appendix D)."""
    ac = _schedule(alphas_cumprod)
    return _extract(ac.sqrt(), t, x_t) * x_t - _extract((1 - ac).sqrt(), t, x_t) * v


def eps_from_v(
    x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor, alphas_cumprod: torch.Tensor
) -> torch.Tensor:
    """eps = sqrt(alpha_bar) v + sqrt(1 - alpha_bar) x_t (Salimans & Ho 2022, appendix D)."""
    ac = _schedule(alphas_cumprod)
    return _extract(ac.sqrt(), t, x_t) * v + _extract((1 - ac).sqrt(), t, x_t) * x_t


def to_eps_x0(
    model_out: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    parameterization: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(eps, x_0) implied by a model output in the given parameterization ("eps", "x0" or "v")."""
    if parameterization == "eps":
        return model_out, predict_x0_from_eps(x_t, t, model_out, alphas_cumprod)
    if parameterization == "x0":
        return predict_eps_from_x0(x_t, t, model_out, alphas_cumprod), model_out
    if parameterization == "v":
        return eps_from_v(x_t, t, model_out, alphas_cumprod), x0_from_v(
            x_t, t, model_out, alphas_cumprod
        )
    raise ValueError(
        f"parameterization must be one of {list(PARAMETERIZATIONS)}, got {parameterization!r}"
    )


def snr(t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar_t / (1 - alpha_bar_t) at integer timesteps t [B] (float64)."""
    ac = _schedule(alphas_cumprod)
    a = ac.gather(0, torch.as_tensor(t, device=ac.device).long().reshape(-1))
    return a / (1 - a)


def eps_x0_at(
    model_out: torch.Tensor, x_t: torch.Tensor, alpha_bar: float, parameterization: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(eps, x_0) from a model output at x_t = sqrt(a) x_0 + sqrt(1 - a) eps for one scalar a
    (DDPM eq. 15; v: Salimans & Ho 2022, appendix D)."""
    sa, sb = math.sqrt(alpha_bar), math.sqrt(1 - alpha_bar)
    if parameterization == "eps":
        return model_out, (x_t - sb * model_out) / sa
    if parameterization == "v":
        return sa * model_out + sb * x_t, sa * x_t - sb * model_out
    if parameterization == "x0":
        return (x_t - sa * model_out) / sb, model_out
    raise ValueError(
        f"parameterization must be one of {list(PARAMETERIZATIONS)}, got {parameterization!r}"
    )
