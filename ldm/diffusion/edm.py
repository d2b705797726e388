"""Sigma-conditioned denoiser training: EDM and VE preconditioning (Karras et al. 2022, Table 1).

D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma)) for x = y + sigma n,
trained with E_sigma,y,n[ lambda(sigma) ||D(y + sigma n; sigma) - y||^2 ] (eq. 2, 8).

- "edm": c_skip = s_d^2 / (sigma^2 + s_d^2), c_out = sigma s_d / sqrt(sigma^2 + s_d^2),
  c_in = 1 / sqrt(sigma^2 + s_d^2), c_noise = ln(sigma) / 4, lambda = 1 / c_out^2,
  ln sigma ~ N(P_mean, P_std^2) (log-normal sigma sampling).
- "ve" (NCSN++ / Song et al. 2021): c_skip = 1, c_out = sigma, c_in = 1, c_noise = ln(sigma / 2),
  lambda = 1 / sigma^2, sigma log-uniform in [sigma_min, sigma_max].
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

NetFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # F(c_in x, c_noise [B]) -> [B, ...]
KINDS = ("edm", "ve")
SIGMA_SAMPLINGS = ("lognormal", "loguniform")


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.ndim - 1))).to(like)  # [B] -> [B, 1, ..., 1]


@dataclass
class SigmaTraining:
    """Preconditioning, sigma distribution and loss weight of a sigma-conditioned denoiser."""

    kind: str = "edm"
    sigma_data: float = 0.5
    p_mean: float = -1.2
    p_std: float = 1.2
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    sigma_sampling: str | None = None  # default: lognormal for edm, loguniform for ve
    c_noise_scale: float = 1.0  # multiplies c_noise before the network's time embedding

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"sigma_training.kind must be one of {list(KINDS)}, got {self.kind!r}")
        if self.sigma_sampling is None:
            self.sigma_sampling = "lognormal" if self.kind == "edm" else "loguniform"
        if self.sigma_sampling not in SIGMA_SAMPLINGS:
            raise ValueError(
                f"sigma_training.sigma_sampling must be one of {list(SIGMA_SAMPLINGS)}, "
                f"got {self.sigma_sampling!r}"
            )

    def precondition(
        self, sigma: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(c_skip, c_out, c_in, c_noise) at sigma [B] (Table 1)."""
        sigma = torch.as_tensor(sigma, dtype=torch.float32)
        if self.kind == "ve":
            one = torch.ones_like(sigma)
            return one, sigma, one, torch.log(0.5 * sigma) * self.c_noise_scale
        sd2 = self.sigma_data**2
        c_skip = sd2 / (sigma**2 + sd2)
        c_out = sigma * self.sigma_data / (sigma**2 + sd2).sqrt()
        c_in = 1 / (sigma**2 + sd2).sqrt()
        c_noise = sigma.log() / 4 * self.c_noise_scale
        return c_skip, c_out, c_in, c_noise

    def loss_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """lambda(sigma) = 1 / c_out^2: (sigma^2 + s_d^2) / (sigma s_d)^2 (EDM) or 1 / sigma^2 (VE)."""
        if self.kind == "ve":
            return 1 / sigma**2
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2

    def sample_sigma(
        self,
        n: int,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """sigma [n]: exp(N(P_mean, P_std^2)) or log-uniform in [sigma_min, sigma_max]."""
        gen_device = generator.device if generator is not None else device
        if self.sigma_sampling == "lognormal":
            z = torch.randn(n, generator=generator, device=gen_device)
            sigma = (self.p_mean + self.p_std * z).exp()
        else:
            u = torch.rand(n, generator=generator, device=gen_device)
            lo, hi = math.log(self.sigma_min), math.log(self.sigma_max)
            sigma = (lo + u * (hi - lo)).exp()
        return sigma.to(device)

    def denoise(self, net: NetFn, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """D(x; sigma) = c_skip x + c_out F(c_in x, c_noise) (eq. 7)."""
        sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        c_skip, c_out, c_in, c_noise = self.precondition(sigma)
        f = net(_bcast(c_in, x) * x, c_noise.to(x.device))
        return _bcast(c_skip, x) * x + _bcast(c_out, x) * f

    def loss(
        self,
        net: NetFn,
        y: torch.Tensor,
        loss_type: str = "l2",
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Per-sample lambda(sigma) ||D(y + sigma n; sigma) - y||^2 averaged over pixels [B] (eq. 2)."""
        sigma = self.sample_sigma(y.shape[0], y.device, generator)
        noise = torch.randn(
            y.shape, generator=generator, device=generator.device if generator else y.device
        )
        x = y + _bcast(sigma, y) * noise.to(y)
        d = self.denoise(net, x, sigma)
        if loss_type == "l2":
            err = (d - y) ** 2
        elif loss_type == "l1":
            err = (d - y).abs()
        else:
            raise ValueError(f"loss_type must be 'l2' or 'l1', got {loss_type!r}")
        return self.loss_weight(sigma).to(y) * err.flatten(1).mean(dim=1)
