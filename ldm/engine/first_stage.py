"""The frozen first stage of a latent diffusion model: z = scale_factor * E(x), x = D(z / scale_factor)
(Rombach et al. 2022, Sec. 3; scale_by_std: Appendix G), mixed into ``DiffusionEngine``. Without a
first stage (pixel space) both maps are the identity."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from ldm.engine.latent_caching import MOMENTS_KEY, latents_from_cache
from ldm.util import ConfigError

logger = logging.getLogger(__name__)


class FirstStageMixin:
    """encode / decode through ``first_stage_model`` and the ``scale_factor`` estimate."""

    @contextmanager
    def _first_stage_precision(self, x: torch.Tensor) -> Iterator[torch.Tensor]:
        """With ``first_stage_fp32`` (SDXL): the autoencoder runs in float32, autocast off, x cast
        to float32; otherwise x is cast to the autoencoder's dtype. Yields the input to use."""
        fs = self.first_stage_model
        if not getattr(self, "first_stage_fp32", False):
            dtype = next((p.dtype for p in fs.parameters()), x.dtype)
            yield x.to(dtype) if x.is_floating_point() else x
            return
        if any(p.dtype != torch.float32 for p in fs.parameters()):
            logger.info("first_stage_fp32: upcasting the first stage to float32")
            fs.float()
        with torch.autocast(device_type=x.device.type, enabled=False):
            yield x.float()

    @torch.no_grad()
    def encode_first_stage(self, x: torch.Tensor) -> Any:
        """E(x): a posterior (KL), pre-quantization latents (VQ) or x itself (pixel space)."""
        if self.first_stage_model is None:
            return x
        with self._first_stage_precision(x) as x_in:
            return self.first_stage_model.encode(x_in)

    def get_first_stage_encoding(self, encoder_posterior: Any) -> torch.Tensor:
        """z = scale_factor * (posterior sample | tensor)."""
        if isinstance(encoder_posterior, torch.Tensor):
            z = encoder_posterior
        elif callable(getattr(encoder_posterior, "sample", None)):
            z = encoder_posterior.sample()
        else:
            raise TypeError(
                f"encoder_posterior of type {type(encoder_posterior).__name__} is neither a "
                "tensor nor a distribution with .sample()."
            )
        return self.scale_factor * z

    @torch.no_grad()
    def decode_first_stage(
        self, z: torch.Tensor, predict_cids: bool = False, force_not_quantize: bool = False
    ) -> torch.Tensor:
        """D(z / scale_factor)."""
        if predict_cids:
            raise NotImplementedError(
                "predict_cids (codebook-index prediction) is not supported; decode latents."
            )
        if self.first_stage_model is None:
            return z
        z = 1.0 / self.scale_factor * z
        decode = self.first_stage_model.decode
        with self._first_stage_precision(z) as z_in:
            if "force_not_quantize" in inspect.signature(decode).parameters:
                return decode(z_in, force_not_quantize=force_not_quantize)
            return decode(z_in)

    def encode_latent(
        self, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Images [B, C, H, W] in [-1, 1] -> z = scale_factor * E(x), a posterior sample drawn
        from ``generator`` (KL) or the latents (VQ); the images themselves in pixel space."""
        if self.first_stage_model is None:
            return x
        posterior = self.encode_first_stage(x)
        if isinstance(posterior, torch.Tensor) or generator is None:
            return self.get_first_stage_encoding(posterior)
        eps = torch.randn(posterior.mean.shape, generator=generator, device=generator.device)
        return self.scale_factor * (posterior.mean + posterior.std * eps.to(posterior.mean))

    def decode_latent(self, z: torch.Tensor) -> torch.Tensor:
        """The sampler's x_0 -> images in [-1, 1]."""
        return self.decode_first_stage(z)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """scale_by_std: set scale_factor = 1 / std(z) from the very first batch (LDM Sec. G)."""
        if not (
            self.scale_by_std
            and self.current_epoch == 0
            and self.global_step == 0
            and batch_idx == 0
            and not self.restarted_from_ckpt
        ):
            return
        if float(self.scale_factor) != 1.0:
            raise ConfigError(
                f"scale_by_std=True estimates scale_factor itself; set scale_factor: 1.0 "
                f"(found {float(self.scale_factor)})."
            )
        logger.info("### USING STD-RESCALING ###")
        if MOMENTS_KEY in batch:  # cache_latents
            z = latents_from_cache(self, batch[MOMENTS_KEY]).detach()
        else:
            x = self.image_input(batch, self.first_stage_key).to(self.device)
            z = self.get_first_stage_encoding(self.encode_first_stage(x)).detach()
        value = 1.0 / z.flatten().float().std()
        trainer = getattr(self, "_trainer", None)
        if trainer is not None and trainer.world_size > 1:
            value = trainer.strategy.broadcast(value, src=0)
        self.scale_factor = value.to(self.scale_factor)
        logger.info("setting self.scale_factor to %s", float(self.scale_factor))
