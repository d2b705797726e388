"""KL autoencoder loss: L1 + LPIPS with learned log-variance, KL term, PatchGAN (LDM App. G).

`LPIPSWithDiscriminator` takes the parameters of CompVis `ldm.modules.losses.contperceptual` so
the original autoencoder configs train unchanged. Extras: `pixel_loss` ("l1"|"l2") and local
LPIPS weight paths (`vgg_weights`, `lpips_weights`).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ldm.modules.distributions import DiagonalGaussianDistribution
from ldm.modules.losses.discriminator import NLayerDiscriminator, weights_init
from ldm.modules.losses.gan import DISC_LOSSES, DiscriminatorLossBase, adopt_weight
from ldm.modules.losses.perceptual import build_lpips, reconstruction_loss

__all__ = ["LPIPSWithDiscriminator"]


class LPIPSWithDiscriminator(DiscriminatorLossBase):
    """L = sum(rec / e^s + s)/B + kl_weight * KL + lambda * f_disc * L_G (VQGAN Eq. 7, LDM App. G).

    s is the learned scalar log-variance (`logvar`), rec the per-pixel L1 + perceptual loss,
    lambda the adaptive weight from the decoder's last layer, f_disc = disc_factor after
    `disc_start` and 0 before. Before `disc_start` the discriminator is not evaluated at all.
    """

    def __init__(
        self,
        disc_start: int,
        logvar_init: float = 0.0,
        kl_weight: float = 1.0,
        pixelloss_weight: float = 1.0,
        disc_num_layers: int = 3,
        disc_in_channels: int = 3,
        disc_factor: float = 1.0,
        disc_weight: float = 1.0,
        perceptual_weight: float = 1.0,
        use_actnorm: bool = False,
        disc_conditional: bool = False,
        disc_loss: str = "hinge",
        pixel_loss: str = "l1",
        vgg_weights: str | os.PathLike | None = None,
        lpips_weights: str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        if disc_loss not in DISC_LOSSES:
            raise ValueError(f"disc_loss must be one of {sorted(DISC_LOSSES)}, got {disc_loss!r}.")
        self.kl_weight = kl_weight
        self.pixel_weight = pixelloss_weight
        self.perceptual_weight = perceptual_weight
        if pixel_loss not in ("l1", "l2"):
            raise ValueError(f"pixel_loss must be 'l1' or 'l2', got {pixel_loss!r}.")
        self.pixel_loss = pixel_loss
        self.perceptual_loss = build_lpips(perceptual_weight, vgg_weights, lpips_weights)
        self.logvar = nn.Parameter(torch.ones(size=()) * logvar_init)
        self.discriminator = NLayerDiscriminator(
            input_nc=disc_in_channels, n_layers=disc_num_layers, use_actnorm=use_actnorm
        ).apply(weights_init)
        self.discriminator_iter_start = disc_start
        self.disc_loss = DISC_LOSSES[disc_loss]
        self.disc_factor = disc_factor
        self.discriminator_weight = disc_weight
        self.disc_conditional = disc_conditional

    def forward(
        self,
        inputs: torch.Tensor,
        reconstructions: torch.Tensor,
        posteriors: DiagonalGaussianDistribution,
        optimizer_idx: int,
        global_step: int,
        last_layer: torch.Tensor | None = None,
        cond: torch.Tensor | None = None,
        split: str = "train",
        weights: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """optimizer_idx 0: autoencoder loss; 1: discriminator loss. Returns (loss, log dict)."""
        disc_factor = adopt_weight(self.disc_factor, global_step, self.discriminator_iter_start)
        if optimizer_idx == 0:
            rec_loss, _ = reconstruction_loss(
                inputs,
                reconstructions,
                self.perceptual_loss,
                self.perceptual_weight,
                self.pixel_loss,
                self.pixel_weight,
            )
            nll_loss = rec_loss / torch.exp(self.logvar) + self.logvar
            weighted = nll_loss if weights is None else weights * nll_loss
            weighted_nll_loss = torch.sum(weighted) / weighted.shape[0]
            nll_loss = torch.sum(nll_loss) / nll_loss.shape[0]
            kl_loss = posteriors.kl()
            kl_loss = torch.sum(kl_loss) / kl_loss.shape[0]
            zero = torch.zeros((), device=inputs.device)
            g_loss, d_weight = zero, zero
            if disc_factor > 0.0:
                logits_fake = self.discriminator(self._disc_input(reconstructions, cond))
                g_loss = -torch.mean(logits_fake)
                d_weight = self.calculate_adaptive_weight(nll_loss, g_loss, last_layer)
            loss = weighted_nll_loss + self.kl_weight * kl_loss + d_weight * disc_factor * g_loss
            log = {
                f"{split}/total_loss": loss.clone().detach().mean(),
                f"{split}/logvar": self.logvar.detach(),
                f"{split}/kl_loss": kl_loss.detach().mean(),
                f"{split}/nll_loss": nll_loss.detach().mean(),
                f"{split}/rec_loss": rec_loss.detach().mean(),
                f"{split}/d_weight": d_weight.detach(),
                f"{split}/disc_factor": torch.tensor(disc_factor),
                f"{split}/g_loss": g_loss.detach().mean(),
            }
            return loss, log
        if optimizer_idx == 1:
            logits_real = self.discriminator(self._disc_input(inputs.detach(), cond))
            logits_fake = self.discriminator(self._disc_input(reconstructions.detach(), cond))
            d_loss = disc_factor * self.disc_loss(logits_real, logits_fake)
            log = {
                f"{split}/disc_loss": d_loss.clone().detach().mean(),
                f"{split}/logits_real": logits_real.detach().mean(),
                f"{split}/logits_fake": logits_fake.detach().mean(),
            }
            return d_loss, log
        raise ValueError(
            f"optimizer_idx must be 0 (autoencoder) or 1 (discriminator), got {optimizer_idx}."
        )
