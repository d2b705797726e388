"""Diagonal Gaussian posterior q(z|x) = N(mu, diag(sigma^2)) of the KL autoencoder (Kingma & Welling 2014)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["DiagonalGaussianDistribution", "normal_kl"]


class DiagonalGaussianDistribution:
    """Posterior from encoder moments [B, 2C, H, W] split into mean and log-variance along dim 1."""

    def __init__(self, parameters: torch.Tensor, deterministic: bool = False) -> None:
        self.parameters = parameters
        self.mean, self.logvar = torch.chunk(parameters, 2, dim=1)  # each [B, C, H, W]
        self.logvar = torch.clamp(self.logvar, -30.0, 20.0)
        self.deterministic = deterministic
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)
        if deterministic:
            self.var = self.std = torch.zeros_like(self.mean)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reparameterized sample z = mu + sigma * eps, eps ~ N(0, I) (Kingma & Welling 2014, Eq. 10)."""
        eps = torch.randn(
            self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype
        )
        return self.mean + self.std * eps

    def kl(self, other: DiagonalGaussianDistribution | None = None) -> torch.Tensor:
        """KL(q || other) summed over C, H, W; other = N(0, I) by default -> [B]."""
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device, dtype=self.mean.dtype)
        dims = [1, 2, 3]
        if other is None:
            return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=dims)
        return 0.5 * torch.sum(
            (self.mean - other.mean).pow(2) / other.var
            + self.var / other.var
            - 1.0
            - self.logvar
            + other.logvar,
            dim=dims,
        )

    def nll(self, sample: torch.Tensor, dims: Sequence[int] = (1, 2, 3)) -> torch.Tensor:
        """Negative log-likelihood -log q(sample) summed over `dims`."""
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device, dtype=self.mean.dtype)
        log2pi = math.log(2.0 * math.pi)
        return 0.5 * torch.sum(
            log2pi + self.logvar + (sample - self.mean).pow(2) / self.var, dim=list(dims)
        )

    def mode(self) -> torch.Tensor:
        """The posterior mode, i.e. its mean."""
        return self.mean


def normal_kl(
    mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor
) -> torch.Tensor:
    """Elementwise KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) (Ho et al. 2020, App. A)."""
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + torch.exp(logvar1 - logvar2)
        + (mean1 - mean2).pow(2) * torch.exp(-logvar2)
    )
