"""GAN loss pieces shared by the KL and VQ autoencoder losses (Esser et al. 2021, VQGAN Eq. 7)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "DiscriminatorLossBase",
    "adaptive_weight",
    "adopt_weight",
    "hinge_d_loss",
    "vanilla_d_loss",
    "DISC_LOSSES",
]


def adopt_weight(weight: float, global_step: int, threshold: int = 0, value: float = 0.0) -> float:
    """`weight` once global_step >= threshold, `value` before (the disc_start switch)."""
    return value if global_step < threshold else weight


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Hinge discriminator loss 1/2 (E[relu(1 - D(x))] + E[relu(1 + D(G(z)))]) (Lim & Ye 2017)."""
    return 0.5 * (torch.mean(F.relu(1.0 - logits_real)) + torch.mean(F.relu(1.0 + logits_fake)))


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating GAN discriminator loss 1/2 (E[softplus(-D(x))] + E[softplus(D(G(z)))])."""
    return 0.5 * (torch.mean(F.softplus(-logits_real)) + torch.mean(F.softplus(logits_fake)))


DISC_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}


def adaptive_weight(
    nll_loss: torch.Tensor,
    g_loss: torch.Tensor,
    last_layer: torch.Tensor,
    disc_weight: float,
) -> torch.Tensor:
    """lambda = ||grad_L nll|| / (||grad_L g|| + 1e-4), clamped to [0, 1e4], times disc_weight (VQGAN Eq. 7).

    L is the decoder's last layer. Returns 0 when no graph exists (evaluation under no_grad).
    """
    if not (torch.is_grad_enabled() and last_layer is not None and nll_loss.requires_grad):
        return torch.zeros((), device=nll_loss.device)
    nll_grads = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    d_weight = torch.norm(nll_grads) / (torch.norm(g_grads) + 1e-4)
    # CompVis clamps to [0, 1e4]; a ratio of norms is never negative, so only the cap can bind
    return torch.clamp(d_weight, max=1e4).detach() * disc_weight


class DiscriminatorLossBase(nn.Module):
    """What the KL and VQ autoencoder losses share: the `disc_start` schedule, the adaptive
    weight (VQGAN Eq. 7) and the (optionally conditional) discriminator input.

    Subclasses set `disc_factor`, `discriminator_iter_start`, `discriminator_weight` and
    `disc_conditional`; `strict_cond` rejects a `cond` given to an unconditional discriminator.
    """

    strict_cond = True
    disc_factor: float
    discriminator_iter_start: int
    discriminator_weight: float
    disc_conditional: bool

    def disc_active(self, global_step: int) -> bool:
        """Whether the adversarial terms are on at this (generator) step."""
        return adopt_weight(self.disc_factor, global_step, self.discriminator_iter_start) > 0

    def calculate_adaptive_weight(
        self, nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Adaptive discriminator weight (VQGAN Eq. 7) times `disc_weight`."""
        return adaptive_weight(nll_loss, g_loss, last_layer, self.discriminator_weight)

    def _disc_input(self, x: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        if cond is None:
            if self.disc_conditional:
                raise ValueError("disc_conditional=True needs `cond` in the loss call.")
            return x.contiguous()
        if self.strict_cond and not self.disc_conditional:
            raise ValueError("cond was given but disc_conditional=False.")
        return torch.cat((x.contiguous(), cond), dim=1)
