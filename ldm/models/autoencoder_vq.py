"""VQ-regularized first stage (VQGAN, Esser et al. 2021; LDM Sec. 3.1) with CompVis parameters and keys."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ldm.models.autoencoder_base import FirstStageTraining
from ldm.modules.autoencoder import Decoder, Encoder
from ldm.modules.quantize import VectorQuantizer, codebook_perplexity, codebook_usage
from ldm.util import instantiate_from_config

logger = logging.getLogger(__name__)

__all__ = ["VQModel", "VQModelInterface"]


class VQModel(FirstStageTraining):
    """x -> E -> quant_conv -> VectorQuantizer -> post_quant_conv -> D (keys as the LDM VQ checkpoints).

    Beyond CompVis: `beta`, `legacy` (quantizer loss order), `ema_codebook` (+ `codebook_decay`),
    `restart_dead_codes` (+ `dead_code_threshold`), `accumulate_grad_batches`, `learning_rate`.
    """

    def __init__(
        self,
        ddconfig: dict[str, Any],
        lossconfig: dict[str, Any],
        n_embed: int,
        embed_dim: int,
        ckpt_path: str | None = None,
        ignore_keys: list[str] | tuple[str, ...] = (),
        image_key: str = "image",
        colorize_nlabels: int | None = None,
        monitor: str | None = None,
        batch_resize_range: tuple[int, int] | None = None,
        scheduler_config: dict[str, Any] | None = None,
        lr_g_factor: float = 1.0,
        remap: str | None = None,
        sane_index_shape: bool = False,
        use_ema: bool = False,
        beta: float = 0.25,
        legacy: bool = True,
        ema_codebook: bool = False,
        codebook_decay: float = 0.99,
        restart_dead_codes: bool = False,
        dead_code_threshold: float = 1e-3,
        accumulate_grad_batches: int = 1,
        learning_rate: float | None = None,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.n_embed = n_embed
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.loss = instantiate_from_config(lossconfig)
        self.quantize = VectorQuantizer(
            n_embed,
            embed_dim,
            beta=beta,
            remap=remap,
            sane_index_shape=sane_index_shape,
            legacy=legacy,
            ema=ema_codebook,
            decay=codebook_decay,
            restart_dead_codes=restart_dead_codes,
            dead_code_threshold=dead_code_threshold,
        )
        self.quant_conv = nn.Conv2d(ddconfig["z_channels"], embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)
        self.batch_resize_range = batch_resize_range
        if batch_resize_range is not None:
            logger.info(
                "%s: using per-batch resizing in range %s.", type(self).__name__, batch_resize_range
            )
        self.scheduler_config = scheduler_config
        self.lr_g_factor = lr_g_factor
        self._init_training(
            image_key, colorize_nlabels, monitor, accumulate_grad_batches, learning_rate
        )
        self._init_ema(0.9999 if use_ema else None)
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys=list(ignore_keys))

    # ------------------------------------------------------------------ model
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple]:
        """x -> (z_q [B, embed_dim, h, w], codebook loss, (perplexity, None, indices))."""
        return self.quantize(self.quant_conv(self.encoder(x)))

    def encode_to_prequant(self, x: torch.Tensor) -> torch.Tensor:
        """x -> pre-quantization latents [B, embed_dim, h, w]."""
        return self.quant_conv(self.encoder(x))

    def decode(self, quant: torch.Tensor) -> torch.Tensor:
        """z_q [B, embed_dim, h, w] -> x_rec."""
        return self.decoder(self.post_quant_conv(quant))

    def decode_code(self, code_b: torch.Tensor) -> torch.Tensor:
        """Codebook indices [B, h, w] -> x_rec."""
        b, h, w = code_b.shape
        quant_b = self.quantize.get_codebook_entry(code_b.reshape(-1), (b, h, w, self.embed_dim))
        return self.decode(quant_b)

    def forward(
        self, input: torch.Tensor, return_pred_indices: bool = False
    ) -> tuple[torch.Tensor, ...]:
        """-> (x_rec, codebook loss) or (x_rec, codebook loss, indices)."""
        quant, diff, (_, _, ind) = self.encode(input)
        dec = self.decode(quant)
        return (dec, diff, ind) if return_pred_indices else (dec, diff)

    def get_last_layer(self) -> torch.Tensor:
        return self.decoder.conv_out.weight

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        xrec, _, ind = self(x, return_pred_indices=True)
        return xrec, self._code_stats(ind, "val")

    def _code_stats(self, ind: torch.Tensor, split: str) -> dict[str, torch.Tensor]:
        ind = ind.reshape(-1)
        if self.quantize.remap is not None:
            return {}
        return {
            f"{split}/perplexity": codebook_perplexity(ind, self.n_embed),
            f"{split}/code_usage": codebook_usage(ind, self.n_embed),
        }

    def get_input(self, batch: dict[str, Any], k: str) -> torch.Tensor:
        """As the base class, plus CompVis' random per-batch resize (`batch_resize_range`) in training."""
        x = super().get_input(batch, k)
        if self.batch_resize_range is not None and self.training:
            lower, upper = self.batch_resize_range
            size = (
                upper
                if self.generator_step <= 4
                else int(np.random.choice(np.arange(lower, upper + 16, 16)))
            )
            if size != x.shape[2]:
                x = F.interpolate(x, size=size, mode="bicubic")
            x = x.detach()
        return x

    # ------------------------------------------------------------------ training glue
    def generator_loss(
        self, x: torch.Tensor, step: int, split: str, sample_posterior: bool = True
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor, dict[str, torch.Tensor]]:
        xrec, qloss, ind = self(x, return_pred_indices=True)
        loss, log = self.loss(
            qloss,
            x,
            xrec,
            0,
            step,
            last_layer=self.get_last_layer(),
            split=split,
            predicted_indices=ind,
        )
        stats = self._code_stats(ind, split)
        if split == "train":
            log.update(stats)
            stats = {}
        return loss, log, xrec, stats

    def discriminator_loss(
        self, x: torch.Tensor, xrec: torch.Tensor, step: int, split: str
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.loss(None, x, xrec, 1, step, last_layer=self.get_last_layer(), split=split)

    def ae_parameters(self) -> list[nn.Parameter]:
        params = [
            *self.encoder.parameters(),
            *self.decoder.parameters(),
            *self.quant_conv.parameters(),
            *self.post_quant_conv.parameters(),
        ]
        return params + [p for p in self.quantize.parameters() if p.requires_grad]

    def configure_optimizers(self) -> Any:
        """Adam for autoencoder (lr * lr_g_factor) and discriminator; optional LambdaLR schedules."""
        opts = self._optimizers(self.ae_parameters(), self.lr_g_factor * self.lr)
        if self.scheduler_config is None:
            return opts
        scheduler = instantiate_from_config(self.scheduler_config)
        logger.info("Setting up LambdaLR scheduler...")
        scheds = [
            {
                "scheduler": torch.optim.lr_scheduler.LambdaLR(o, lr_lambda=scheduler.schedule),
                "interval": "step",
                "frequency": 1,
            }
            for o in opts
        ]
        return opts, scheds

    @torch.no_grad()
    def log_images(
        self,
        batch: dict[str, Any],
        only_inputs: bool = False,
        plot_ema: bool = False,
        N: int = 8,
        **kwargs: Any,
    ) -> dict[str, torch.Tensor]:
        """inputs and reconstructions (and EMA reconstructions with plot_ema); [N, 3, H, W]."""
        x = self.get_input(batch, self.image_key)[:N].to(self.device)
        log: dict[str, torch.Tensor] = {"inputs": self._rgb(x)}
        if only_inputs:
            return log
        log["reconstructions"] = self._rgb(self(x)[0])
        if plot_ema and self.use_ema:
            with self.ema_scope():
                log["reconstructions_ema"] = self._rgb(self(x)[0])
        return log


class VQModelInterface(VQModel):
    """VQModel as LatentDiffusion uses it: encode -> pre-quant h, decode(h) quantizes first."""

    def __init__(self, embed_dim: int, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, embed_dim=embed_dim, **kwargs)
        self.embed_dim = embed_dim

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x -> h = quant_conv(E(x)) [B, embed_dim, h, w] (not yet quantized)."""
        return self.quant_conv(self.encoder(x))

    def decode(self, h: torch.Tensor, force_not_quantize: bool = False) -> torch.Tensor:
        """h -> D(post_quant_conv(q(h))); `force_not_quantize` skips the codebook lookup."""
        quant = h if force_not_quantize else self.quantize(h)[0]
        return self.decoder(self.post_quant_conv(quant))

    def forward(
        self, input: torch.Tensor, return_pred_indices: bool = False
    ) -> tuple[torch.Tensor, ...]:
        quant, diff, (_, _, ind) = self.quantize(self.encode(input))
        dec = self.decoder(self.post_quant_conv(quant))
        return (dec, diff, ind) if return_pred_indices else (dec, diff)
