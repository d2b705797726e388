"""Inpainting latent diffusion (SD 2.x `LatentInpaintDiffusion`): the U-Net sees
[z_t, mask, E(masked image)] concatenated (4 + 1 + 4 = 9 input channels) plus cross-attention text.

Starting from a 4-channel text-to-image checkpoint, `finetune_keys` name the input convolution
(and its EMA copy); their extra input channels are zero-initialised (`keep_finetune_dims` kept),
so the widened model starts as the original one.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from einops import rearrange

from ldm.models.diffusion.checkpoint_io import load_into
from ldm.models.diffusion.latent import LatentDiffusion
from ldm.util import ConfigError

logger = logging.getLogger(__name__)

DEFAULT_FINETUNE_KEYS = (
    "model.diffusion_model.input_blocks.0.0.weight",
    "model_ema.diffusion_modelinput_blocks00weight",
)


class LatentInpaintDiffusion(LatentDiffusion):
    """LDM conditioned on a mask and the masked image by concatenation (conditioning_key hybrid)."""

    def __init__(
        self,
        concat_keys: Sequence[str] = ("mask", "masked_image"),
        masked_image_key: str = "masked_image",
        finetune_keys: Sequence[str] | None = DEFAULT_FINETUNE_KEYS,
        keep_finetune_dims: int = 4,
        c_concat_log_start: int | None = None,
        c_concat_log_end: int | None = None,
        **kwargs: Any,
    ) -> None:
        concat_keys = tuple(concat_keys)
        if masked_image_key not in concat_keys:
            raise ConfigError(
                f"masked_image_key '{masked_image_key}' must be one of concat_keys {concat_keys}."
            )
        if kwargs.get("cond_stage_trainable", False):
            raise ConfigError("LatentInpaintDiffusion supports frozen cond stages only.")
        # set before LatentDiffusion.__init__, which restores ckpt_path through init_from_ckpt
        self.finetune_keys = tuple(finetune_keys) if finetune_keys else None
        self.concat_keys = concat_keys
        self.keep_dims = keep_finetune_dims
        self.masked_image_key = masked_image_key
        self.c_concat_log_start = c_concat_log_start
        self.c_concat_log_end = c_concat_log_end
        super().__init__(**kwargs)

    def init_from_ckpt(
        self, path: str, ignore_keys: Sequence[str] = (), only_model: bool = False
    ) -> tuple[list[str], list[str]]:
        """Load, widening `finetune_keys` with zero-initialised extra input channels."""
        return load_into(
            self,
            path,
            ignore_keys,
            only_model,
            fit=self.make_it_fit,
            finetune_keys=self.finetune_keys,
            keep_dims=self.keep_dims,
        )

    def concat_conditioning(
        self, batch: Mapping[str, Any], z_shape: torch.Size, bs: int | None = None
    ) -> torch.Tensor:
        """c_concat [B, 1 + C_z, h, w]: mask resized to the latent grid, masked image encoded."""
        parts = []
        for key in self.concat_keys:
            cc = torch.as_tensor(batch[key])
            if cc.ndim == 3:
                cc = cc[..., None]
            cc = (
                rearrange(cc, "b h w c -> b c h w")
                .to(memory_format=torch.contiguous_format)
                .float()
            )
            if bs is not None:
                cc = cc[:bs]
            cc = cc.to(self.device)
            if key != self.masked_image_key:
                cc = torch.nn.functional.interpolate(cc, size=z_shape[-2:])
            else:
                cc = self.get_first_stage_encoding(self.encode_first_stage(cc))
            parts.append(cc)
        return torch.cat(parts, dim=1)

    def embedders(self) -> list[Any]:
        """The text embedder, then [mask, E(masked image)] as concatenated channels (kept in uncond)."""
        from ldm.engine.conditioner import Embedder

        def concat(inputs: Mapping[str, Any]) -> torch.Tensor:
            image = torch.as_tensor(inputs[self.masked_image_key])
            from ldm.engine.generate import latent_factor

            f = latent_factor(self)
            z_shape = (image.shape[1] // f, image.shape[2] // f)  # [B, H, W, C] -> latent grid
            return self.concat_conditioning(inputs, z_shape)

        return [*super().embedders(), Embedder(tuple(self.concat_keys), concat, kind="concat")]

    def assemble_condition(self, outputs: list[Any]) -> Any:
        """{c_concat: [mask, E(masked image)], c_crossattn: [tau(y)]}."""
        return {"c_concat": [outputs[1]], "c_crossattn": [outputs[0]]}

    def inpaint_inputs(self, image: torch.Tensor, mask: torch.Tensor, n: int) -> dict[str, Any]:
        """Batch entries of the concat embedder for ``n`` samples: the mask (1 = repaint) and the
        image with the masked region blanked, both [B, H, W, C] as a data set yields them."""
        masked = image * (mask < 0.5)  # keep where mask == 0
        out = {}
        for key in self.concat_keys:
            value = masked if key == self.masked_image_key else mask
            out[key] = value.permute(0, 2, 3, 1).expand(n, -1, -1, -1)  # [n, H, W, C]
        return out

    @torch.no_grad()
    def get_input(  # type: ignore[override]
        self,
        batch: Mapping[str, Any],
        k: str,
        return_first_stage_outputs: bool = False,
        force_c_encode: bool = True,
        cond_key: str | None = None,
        return_original_cond: bool = False,
        bs: int | None = None,
        return_x: bool = False,
    ) -> list[Any]:
        """[z, {c_concat: [mask, E(masked)], c_crossattn: [tau(y)]}] (+ first-stage outputs, xc)."""
        z, c, x, xrec, xc = super().get_input(
            batch,
            self.first_stage_key,
            return_first_stage_outputs=True,
            force_c_encode=True,
            cond_key=cond_key,
            return_original_cond=True,
            bs=bs,
        )
        c_cat = self.concat_conditioning(batch, z.shape, bs)
        all_conds = {"c_concat": [c_cat], "c_crossattn": [c]}
        out: list[Any] = [z, all_conds]
        if return_first_stage_outputs:
            out.extend([x, xrec])
        if return_x:
            out.append(x)
        if return_original_cond:
            out.append(xc)
        return out

    @torch.no_grad()
    def log_images(
        self, batch: Mapping[str, Any], N: int = 8, **kwargs: Any
    ) -> dict[str, torch.Tensor]:  # type: ignore[override]
        """LatentDiffusion's images plus the mask and the masked image; no blend-inpainting row."""
        kwargs["inpaint"] = False
        log = super().log_images(batch, N=N, **kwargs)
        n = log["inputs"].shape[0]
        if self.masked_image_key in batch:
            masked = torch.as_tensor(batch[self.masked_image_key])[:n]
            log["masked_image"] = rearrange(masked, "b h w c -> b c h w").float().to(self.device)
        for key in self.concat_keys:
            if key != self.masked_image_key and key in batch:
                m = torch.as_tensor(batch[key])[:n].float()
                m = m[..., None] if m.ndim == 3 else m
                log[key] = rearrange(m, "b h w c -> b c h w").to(self.device) * 2 - 1
        if self.c_concat_log_start is not None and self.c_concat_log_end is not None:
            _, c = self.get_input(batch, self.first_stage_key, bs=n)
            c_cat = c["c_concat"][0][:, self.c_concat_log_start : self.c_concat_log_end]
            log["c_concat_decoded"] = self.decode_first_stage(c_cat)
        return log
