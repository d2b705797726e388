"""First-stage models of latent diffusion (Rombach et al. 2022, Sec. 3.1): KL, VQ and identity.

`AutoencoderKL` takes the CompVis/Stability constructor parameters; `VQModel`,
`VQModelInterface` live in `ldm.models.autoencoder_vq` and are re-exported here so the original
target paths (`ldm.models.autoencoder.VQModelInterface`, ...) resolve.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from ldm.models.autoencoder_base import FirstStageTraining
from ldm.models.autoencoder_vq import VQModel, VQModelInterface
from ldm.modules.autoencoder import Decoder, Encoder
from ldm.modules.distributions import DiagonalGaussianDistribution
from ldm.util import instantiate_from_config

logger = logging.getLogger(__name__)

__all__ = ["AutoencoderKL", "IdentityFirstStage", "VQModel", "VQModelInterface"]


class AutoencoderKL(FirstStageTraining):
    """KL-regularized autoencoder: q(z|x) = N(mu, sigma^2) from E, x_rec = D(z) (LDM Sec. 3.1).

    Keys: encoder.*, decoder.*, quant_conv (2*z_channels -> 2*embed_dim), post_quant_conv
    (embed_dim -> z_channels), loss.* (training only), model_ema.* (with `ema_decay`).
    """

    def __init__(
        self,
        ddconfig: dict[str, Any],
        lossconfig: dict[str, Any],
        embed_dim: int,
        ckpt_path: str | None = None,
        ignore_keys: list[str] | tuple[str, ...] = (),
        image_key: str = "image",
        colorize_nlabels: int | None = None,
        monitor: str | None = None,
        ema_decay: float | None = None,
        learn_logvar: bool = False,
        accumulate_grad_batches: int = 1,
        learning_rate: float | None = None,
    ) -> None:
        super().__init__()
        if not ddconfig.get("double_z", True):
            raise ValueError(
                "AutoencoderKL needs ddconfig.double_z: true (the encoder outputs mean and log-variance)."
            )
        self.learn_logvar = learn_logvar
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.loss = instantiate_from_config(lossconfig)
        self.quant_conv = nn.Conv2d(2 * ddconfig["z_channels"], 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)
        self.embed_dim = embed_dim
        self._init_training(
            image_key, colorize_nlabels, monitor, accumulate_grad_batches, learning_rate
        )
        self._init_ema(ema_decay)
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys=list(ignore_keys))

    # ------------------------------------------------------------------ model
    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        """x [B, C, H, W] -> posterior over z [B, embed_dim, H/f, W/f]."""
        moments = self.quant_conv(self.encoder(x))  # [B, 2*embed_dim, h, w]
        return DiagonalGaussianDistribution(moments)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, embed_dim, h, w] -> x_rec [B, out_ch, h*f, w*f]."""
        return self.decoder(self.post_quant_conv(z))

    def forward(
        self, input: torch.Tensor, sample_posterior: bool = True
    ) -> tuple[torch.Tensor, DiagonalGaussianDistribution]:
        """-> (reconstruction, posterior); z sampled from the posterior or its mode."""
        posterior = self.encode(input)
        z = posterior.sample() if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    def get_last_layer(self) -> torch.Tensor:
        """Weight of the decoder's last conv, used by the adaptive GAN weight."""
        return self.decoder.conv_out.weight

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Deterministic reconstruction D(mode(q(z|x)))."""
        return self(x, sample_posterior=False)[0], {}

    # ------------------------------------------------------------------ training glue
    def generator_loss(
        self, x: torch.Tensor, step: int, split: str, sample_posterior: bool = True
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor, dict[str, torch.Tensor]]:
        xrec, posterior = self(x, sample_posterior=sample_posterior)
        loss, log = self.loss(
            x, xrec, posterior, 0, step, last_layer=self.get_last_layer(), split=split
        )
        return loss, log, xrec, {}

    def discriminator_loss(
        self, x: torch.Tensor, xrec: torch.Tensor, step: int, split: str
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.loss(x, xrec, None, 1, step, last_layer=self.get_last_layer(), split=split)

    def ae_parameters(self) -> list[nn.Parameter]:
        """Generator parameters: encoder, decoder, quant convs (+ loss.logvar with learn_logvar)."""
        params = [
            *self.encoder.parameters(),
            *self.decoder.parameters(),
            *self.quant_conv.parameters(),
            *self.post_quant_conv.parameters(),
        ]
        if self.learn_logvar:
            params.append(self.loss.logvar)
        return params

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        """Adam(beta=(0.5, 0.9)) for the autoencoder and for the discriminator, as CompVis."""
        return self._optimizers(self.ae_parameters(), self.lr)

    @torch.no_grad()
    def log_images(
        self, batch: dict[str, Any], only_inputs: bool = False, N: int = 8, **kwargs: Any
    ) -> dict[str, torch.Tensor]:
        """inputs, reconstructions and samples D(z), z ~ N(0, I) from the prior; [N, 3, H, W]."""
        x = self.get_input(batch, self.image_key)[:N].to(self.device)
        log: dict[str, torch.Tensor] = {}
        if not only_inputs:
            xrec, posterior = self(x)
            log["samples"] = self._rgb(self.decode(torch.randn_like(posterior.sample())))
            log["reconstructions"] = self._rgb(xrec)
        log["inputs"] = self._rgb(x)
        return log


class IdentityFirstStage(nn.Module):
    """No first stage: encode/decode are the identity (pixel-space diffusion through the LDM code)."""

    def __init__(self, *args: Any, vq_interface: bool = False, **kwargs: Any) -> None:
        super().__init__()
        self.vq_interface = vq_interface

    def encode(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return x

    def decode(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return x

    def quantize(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if self.vq_interface:
            return x, None, [None, None, None]
        return x

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return x
