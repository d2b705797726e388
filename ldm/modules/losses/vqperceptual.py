"""VQGAN loss: L1 + LPIPS, codebook/commitment term, PatchGAN with adaptive weight (Esser et al. 2021, Eq. 4-7).

`VQLPIPSWithDiscriminator` takes the parameters of taming's / CompVis' `vqperceptual` module so the
LDM VQ configs train unchanged.
"""

from __future__ import annotations

import os

import torch

from ldm.modules.losses.discriminator import NLayerDiscriminator, weights_init
from ldm.modules.losses.gan import DISC_LOSSES, DiscriminatorLossBase, adopt_weight
from ldm.modules.losses.perceptual import build_lpips, reconstruction_loss
from ldm.modules.quantize import codebook_perplexity

__all__ = ["VQLPIPSWithDiscriminator"]


class VQLPIPSWithDiscriminator(DiscriminatorLossBase):
    """L = mean(rec) + codebook_weight * L_VQ + lambda * f_disc * L_G (VQGAN Eq. 4 and 7)."""

    strict_cond = False  # taming's VQ loss concatenates any given cond

    def __init__(
        self,
        disc_start: int,
        codebook_weight: float = 1.0,
        pixelloss_weight: float = 1.0,
        disc_num_layers: int = 3,
        disc_in_channels: int = 3,
        disc_factor: float = 1.0,
        disc_weight: float = 1.0,
        perceptual_weight: float = 1.0,
        use_actnorm: bool = False,
        disc_conditional: bool = False,
        disc_ndf: int = 64,
        disc_loss: str = "hinge",
        n_classes: int | None = None,
        perceptual_loss: str = "lpips",
        pixel_loss: str = "l1",
        vgg_weights: str | os.PathLike | None = None,
        lpips_weights: str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        if disc_loss not in DISC_LOSSES:
            raise ValueError(f"disc_loss must be one of {sorted(DISC_LOSSES)}, got {disc_loss!r}.")
        if perceptual_loss != "lpips":
            raise ValueError(
                f"perceptual_loss: only 'lpips' is implemented, got {perceptual_loss!r}."
            )
        if pixel_loss not in ("l1", "l2"):
            raise ValueError(f"pixel_loss must be 'l1' or 'l2', got {pixel_loss!r}.")
        self.codebook_weight = codebook_weight
        self.pixel_weight = pixelloss_weight
        self.pixel_loss = pixel_loss
        self.perceptual_weight = perceptual_weight
        self.perceptual_loss = build_lpips(perceptual_weight, vgg_weights, lpips_weights)
        self.discriminator = NLayerDiscriminator(
            input_nc=disc_in_channels,
            n_layers=disc_num_layers,
            use_actnorm=use_actnorm,
            ndf=disc_ndf,
        ).apply(weights_init)
        self.discriminator_iter_start = disc_start
        self.disc_loss = DISC_LOSSES[disc_loss]
        self.disc_factor = disc_factor
        self.discriminator_weight = disc_weight
        self.disc_conditional = disc_conditional
        self.n_classes = n_classes

    def forward(
        self,
        codebook_loss: torch.Tensor | None,
        inputs: torch.Tensor,
        reconstructions: torch.Tensor,
        optimizer_idx: int,
        global_step: int,
        last_layer: torch.Tensor | None = None,
        cond: torch.Tensor | None = None,
        split: str = "train",
        predicted_indices: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """optimizer_idx 0: autoencoder loss; 1: discriminator loss. Returns (loss, log dict)."""
        disc_factor = adopt_weight(self.disc_factor, global_step, self.discriminator_iter_start)
        if optimizer_idx == 0:
            if codebook_loss is None:
                codebook_loss = torch.zeros((), device=inputs.device)
            rec_loss, p_loss = reconstruction_loss(
                inputs,
                reconstructions,
                self.perceptual_loss,
                self.perceptual_weight,
                self.pixel_loss,
                self.pixel_weight,
            )
            nll_loss = torch.mean(rec_loss)
            zero = torch.zeros((), device=inputs.device)
            g_loss, d_weight = zero, zero
            if disc_factor > 0.0:
                logits_fake = self.discriminator(self._disc_input(reconstructions, cond))
                g_loss = -torch.mean(logits_fake)
                d_weight = self.calculate_adaptive_weight(nll_loss, g_loss, last_layer)
            loss = (
                nll_loss
                + d_weight * disc_factor * g_loss
                + self.codebook_weight * codebook_loss.mean()
            )
            log = {
                f"{split}/total_loss": loss.clone().detach().mean(),
                f"{split}/quant_loss": codebook_loss.detach().mean(),
                f"{split}/nll_loss": nll_loss.detach().mean(),
                f"{split}/rec_loss": rec_loss.detach().mean(),
                f"{split}/p_loss": p_loss.detach().mean(),
                f"{split}/d_weight": d_weight.detach(),
                f"{split}/disc_factor": torch.tensor(disc_factor),
                f"{split}/g_loss": g_loss.detach().mean(),
            }
            if predicted_indices is not None and self.n_classes is not None:
                idx = predicted_indices.reshape(-1)
                log[f"{split}/perplexity"] = codebook_perplexity(idx, self.n_classes)
                log[f"{split}/cluster_usage"] = torch.tensor(float(torch.unique(idx).numel()))
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
