"""Lightning glue shared by the KL and VQ first stages: GAN training with manual optimization.

Each batch: one generator (autoencoder) update, then, once the loss's `disc_start` is reached, one
discriminator update (Esser et al. 2021, Sec. 3.2). Lightning 2.x manual optimization:
`self.optimizers()`, `toggle_optimizer`, `manual_backward`; gradient accumulation over
`accumulate_grad_batches` batches is done here because Lightning refuses it for manual
optimization. Note that `trainer.global_step` counts every optimizer step (generator and
discriminator); the losses see `generator_step`, the number of generator updates so far.
Under DDP use `strategy: ddp_find_unused_parameters_true` (the discriminator gets no gradient
in the generator pass and vice versa).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from ldm.metrics import psnr, ssim

logger = logging.getLogger(__name__)

__all__ = ["FirstStageTraining"]

DEFAULT_LEARNING_RATE = 4.5e-6  # CompVis base_learning_rate of every first-stage config
_STEP_KEY = "first_stage_generator_steps"


class FirstStageTraining(pl.LightningModule):
    """Base class: checkpoint init, inputs, GAN step with accumulation, metrics, EMA, image logs.

    Subclasses implement `ae_parameters()`, `generator_loss(x, step, split, sample_posterior)`
    returning (loss, log, xrec, extras) and `discriminator_loss(x, xrec, step, split)`.
    """

    def _init_training(
        self,
        image_key: str,
        colorize_nlabels: int | None,
        monitor: str | None,
        accumulate_grad_batches: int,
        learning_rate: float | None,
    ) -> None:
        self.automatic_optimization = False
        self.image_key = image_key
        if colorize_nlabels is not None:
            if not isinstance(colorize_nlabels, int):
                raise TypeError(f"colorize_nlabels must be an int, got {colorize_nlabels!r}.")
            self.register_buffer("colorize", torch.randn(3, colorize_nlabels, 1, 1))
        if monitor is not None:
            self.monitor = monitor
        if accumulate_grad_batches < 1:
            raise ValueError(
                f"accumulate_grad_batches must be >= 1, got {accumulate_grad_batches}."
            )
        self.accumulate_grad_batches = int(accumulate_grad_batches)
        if learning_rate is not None:
            self.learning_rate = float(learning_rate)
        self._generator_steps = 0
        self.use_ema = False

    # ------------------------------------------------------------------ checkpoints
    def init_from_ckpt(self, path: str, ignore_keys: list[str] | tuple[str, ...] = ()) -> None:
        """Load weights from a .ckpt/.safetensors file (safely), dropping keys with the given prefixes."""
        from ldm.checkpoint.safe_load import load_state_dict

        sd = load_state_dict(path)
        for k in list(sd.keys()):
            if any(k.startswith(ik) for ik in ignore_keys):
                logger.info("Deleting key %s from state_dict.", k)
                del sd[k]
        missing, unexpected = self.load_state_dict(sd, strict=False)
        logger.info(
            "Restored from %s with %d missing and %d unexpected keys",
            path,
            len(missing),
            len(unexpected),
        )
        if missing:
            logger.info("Missing keys: %s", missing[:20])
        if unexpected:
            logger.info("Unexpected keys: %s", unexpected[:20])

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[_STEP_KEY] = self._generator_steps

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._generator_steps = int(
            checkpoint.get(_STEP_KEY, checkpoint.get("global_step", 0) // 2)
        )

    @property
    def generator_step(self) -> int:
        """Number of autoencoder (generator) optimizer steps taken so far."""
        return self._generator_steps

    # ------------------------------------------------------------------ inputs
    def get_input(self, batch: dict[str, Any], k: str) -> torch.Tensor:
        """batch[k] as [B, C, H, W] float (CompVis items are H x W x C in [-1, 1])."""
        x = batch[k]
        if not torch.is_tensor(x):
            x = torch.as_tensor(x)
        if x.ndim == 3:
            x = x[..., None]
        if x.ndim != 4:
            raise ValueError(
                f"batch['{k}'] must be [B, H, W, C] images, got shape {tuple(x.shape)}."
            )
        x = x.permute(0, 3, 1, 2).to(memory_format=torch.contiguous_format)  # [B, C, H, W]
        return x.float()

    # ------------------------------------------------------------------ EMA
    def _init_ema(self, decay: float | None) -> None:
        self.use_ema = decay is not None
        if self.use_ema:
            from ldm.ema import LitEma

            self.model_ema = LitEma(self, decay=decay)
            logger.info("Keeping EMAs of %d tensors.", len(list(self.model_ema.buffers())))

    @contextmanager
    def ema_scope(self, context: str | None = None) -> Iterator[None]:
        """Temporarily swap in the EMA weights (no-op without EMA)."""
        if self.use_ema:
            self.model_ema.store(self.parameters())
            self.model_ema.copy_to(self)
            if context is not None:
                logger.info("%s: switched to EMA weights", context)
        try:
            yield None
        finally:
            if self.use_ema:
                self.model_ema.restore(self.parameters())

    # ------------------------------------------------------------------ training
    def _check_trainable(self) -> None:
        if not hasattr(self.loss, "discriminator"):
            raise RuntimeError(
                f"{type(self).__name__} was built with lossconfig target "
                f"{type(self.loss).__name__} (an inference config); training needs a loss such as "
                "ldm.modules.losses.LPIPSWithDiscriminator / VQLPIPSWithDiscriminator."
            )

    def on_fit_start(self) -> None:
        """Fail before the first step when the perceptual loss has no weights (never at step N)."""
        self._check_trainable()
        lpips = getattr(self.loss, "perceptual_loss", None)
        if lpips is not None and not lpips.weights_loaded:
            missing = getattr(lpips, "_missing", None)
            if missing is not None:
                raise missing
            lpips.load_pretrained(lpips.vgg_weights, lpips.lpips_weights)

    def _boundary(self, batch_idx: int) -> bool:
        last = bool(getattr(self.trainer, "is_last_batch", False)) if self._trainer else False
        return (batch_idx + 1) % self.accumulate_grad_batches == 0 or last

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        """Generator update, then (after disc_start) discriminator update; both accumulate."""
        self._check_trainable()
        x = self.get_input(batch, self.image_key)
        opt_g, opt_d = self.optimizers()
        accum = self.accumulate_grad_batches
        boundary = self._boundary(batch_idx)
        step = self.generator_step

        self.toggle_optimizer(opt_g)
        aeloss, log_g, xrec, _ = self.generator_loss(x, step, "train", sample_posterior=True)
        self.manual_backward(aeloss / accum)
        if boundary:
            opt_g.step()
            opt_g.zero_grad(set_to_none=True)
            self._generator_steps += 1
            if self.use_ema:
                self.model_ema(self)
        self.untoggle_optimizer(opt_g)

        log = dict(log_g)
        if self.loss.disc_active(step):
            self.toggle_optimizer(opt_d)
            discloss, log_d = self.discriminator_loss(x, xrec.detach(), step, "train")
            self.manual_backward(discloss / accum)
            if boundary:
                opt_d.step()
                opt_d.zero_grad(set_to_none=True)
            self.untoggle_optimizer(opt_d)
            log.update(log_d)
        if boundary:
            self._step_schedulers()
        bs = x.shape[0]
        self.log(
            "aeloss", aeloss.detach(), prog_bar=True, on_step=True, on_epoch=True, batch_size=bs
        )
        self.log_dict(log, prog_bar=False, logger=True, on_step=True, on_epoch=False, batch_size=bs)
        return aeloss.detach()

    def _step_schedulers(self) -> None:
        schedulers = self.lr_schedulers()
        if schedulers is None:
            return
        for s in schedulers if isinstance(schedulers, list) else [schedulers]:
            s.step()

    @property
    def lr(self) -> float:
        lr = getattr(self, "learning_rate", None)
        if lr is None:
            logger.warning(
                "%s.learning_rate is not set (main.py sets it from model.base_learning_rate); "
                "using %g.",
                type(self).__name__,
                DEFAULT_LEARNING_RATE,
            )
            lr = DEFAULT_LEARNING_RATE
        return float(lr)

    def _optimizers(self, g_params: list[nn.Parameter], g_lr: float) -> list[torch.optim.Optimizer]:
        self._check_trainable()
        opt_ae = torch.optim.Adam(g_params, lr=g_lr, betas=(0.5, 0.9))
        opt_disc = torch.optim.Adam(
            self.loss.discriminator.parameters(), lr=self.lr, betas=(0.5, 0.9)
        )
        return [opt_ae, opt_disc]

    # ------------------------------------------------------------------ validation
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        """Losses + rec L1, PSNR, SSIM (and VQ code statistics); with EMA also the EMA weights."""
        log = self._validation_step(batch, suffix="")
        if self.use_ema:
            with self.ema_scope():
                self._validation_step(batch, suffix="_ema")
        return log

    def _validation_step(self, batch: dict[str, Any], suffix: str) -> dict[str, torch.Tensor]:
        x = self.get_input(batch, self.image_key)
        step = self.generator_step
        split = "val" + suffix
        if hasattr(self.loss, "discriminator"):
            _, log, xrec, extras = self.generator_loss(x, step, split, sample_posterior=False)
            if self.loss.disc_active(step):
                _, log_d = self.discriminator_loss(x, xrec, step, split)
                log.update(log_d)
        else:
            xrec, extras = self.reconstruct(x)
            log = {f"{split}/rec_loss": (x - xrec).abs().mean()}
        log.update(self.reconstruction_metrics(x, xrec, split))
        log.update(extras)
        bs = x.shape[0]
        rec_key = f"{split}/rec_loss"
        self.log(
            rec_key, log.pop(rec_key), prog_bar=True, on_epoch=True, sync_dist=True, batch_size=bs
        )
        self.log_dict(log, on_epoch=True, sync_dist=True, batch_size=bs)
        return log

    @torch.no_grad()
    def reconstruction_metrics(
        self, x: torch.Tensor, xrec: torch.Tensor, split: str = "val"
    ) -> dict[str, torch.Tensor]:
        """L1, PSNR and SSIM of the clamped reconstruction against x (images in [-1, 1])."""
        xrec = xrec.detach().float().clamp(-1.0, 1.0)
        x = x.detach().float()
        out = {
            f"{split}/rec_l1": (x - xrec).abs().mean(),
            f"{split}/psnr": psnr(x, xrec).mean(),
        }
        if min(x.shape[-2:]) >= 7:
            out[f"{split}/ssim"] = ssim(x, xrec).mean()
        return out

    # ------------------------------------------------------------------ images
    def to_rgb(self, x: torch.Tensor) -> torch.Tensor:
        """Map segmentation-like inputs with >3 channels to RGB in [-1, 1] by a random projection."""
        if not hasattr(self, "colorize"):
            self.register_buffer("colorize", torch.randn(3, x.shape[1], 1, 1).to(x))
        x = F.conv2d(x, weight=self.colorize)
        return 2.0 * (x - x.min()) / (x.max() - x.min()) - 1.0

    def _rgb(self, x: torch.Tensor) -> torch.Tensor:
        return self.to_rgb(x) if x.shape[1] > 3 else x
