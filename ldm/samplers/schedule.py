"""Discrete VP schedule viewed as noise levels sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t).

Fractional timesteps interpolate log(sigma) between neighbouring integer timesteps (k-diffusion's
``DiscreteSchedule``); ``interpolation="linear"`` interpolates sigma itself (diffusers' Euler-family
schedulers with ``interpolation_type="linear"``). ``sigma_to_t`` is the exact inverse of ``t_to_sigma``.
"""

from __future__ import annotations

import torch

# alpha_bar floor used for a zero-terminal-SNR schedule (sigma would be infinite), as diffusers does.
ZERO_SNR_ALPHA_BAR = 2.0**-24


class DiscreteSchedule:
    """sigma(t) on t in [0, T-1] from ``alphas_cumprod`` [T] (float64, CPU)."""

    def __init__(self, alphas_cumprod: torch.Tensor, interpolation: str = "log") -> None:
        if interpolation not in ("log", "linear"):
            raise ValueError(f"interpolation must be 'log' or 'linear', got {interpolation!r}")
        ac = torch.as_tensor(alphas_cumprod).detach().to("cpu", torch.float64).flatten()
        if ac.numel() < 2:
            raise ValueError(f"alphas_cumprod needs at least 2 entries, got {ac.numel()}")
        self.alphas_cumprod = ac.clamp(min=ZERO_SNR_ALPHA_BAR)
        self.sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()
        self.log_sigmas = self.sigmas.log()
        self.interpolation = interpolation
        self._table = self.log_sigmas if interpolation == "log" else self.sigmas

    @property
    def num_timesteps(self) -> int:
        return self.sigmas.numel()

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def t_to_sigma(self, t: torch.Tensor | float) -> torch.Tensor:
        """sigma at (fractional) timesteps t, interpolated in log-sigma (or sigma) space."""
        t = torch.as_tensor(t, dtype=torch.float64).clamp(0, self.num_timesteps - 1)
        lo = t.floor().long()
        hi = t.ceil().long()
        w = t - lo
        v = (1 - w) * self._table[lo] + w * self._table[hi]
        return v.exp() if self.interpolation == "log" else v

    def sigma_to_t(self, sigma: torch.Tensor | float) -> torch.Tensor:
        """(fractional) timestep of noise level sigma; inverse of ``t_to_sigma`` (clamped to [0, T-1])."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        v = sigma.clamp(min=1e-300).log() if self.interpolation == "log" else sigma
        table = self._table
        lo = (torch.searchsorted(table, v.reshape(-1), right=True) - 1).clamp(0, table.numel() - 2)
        lo = lo.reshape(v.shape)
        w = ((v - table[lo]) / (table[lo + 1] - table[lo])).clamp(0, 1)
        return lo + w
