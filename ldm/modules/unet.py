"""The LDM / Stable Diffusion U-Net eps_theta(z_t, t, tau(y)) (Rombach et al. 2022, Sec. 3.3).

Constructor parameters and state-dict keys of CompVis `ldm.modules.diffusionmodules.openaimodel`
(SD 1.x) and its Stability SD 2.x version, so official configs and checkpoints load unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ldm.modules.attention import SpatialTransformer
from ldm.modules.attention_backends import resolve_backend
from ldm.modules.position import initial_position_map
from ldm.modules.timestep import timestep_embedding
from ldm.modules.unet_attention import AttentionBlock
from ldm.modules.unet_encoder import EncoderUNetModel
from ldm.modules.unet_layers import (
    Downsample,
    ResBlock,
    TimestepEmbedSequential,
    Upsample,
    conv_nd,
    normalization,
    zero_module,
)

logger = logging.getLogger(__name__)

__all__ = ["EncoderUNetModel", "UNetModel", "timestep_embedding"]


def _as_list(value: Any) -> Any:
    """OmegaConf ListConfig / tuple -> list; other values unchanged."""
    if value is None or isinstance(value, (int, str, float)):
        return value
    try:
        return list(value)
    except TypeError:
        return value


def head_layout(
    ch: int, num_heads: int, num_head_channels: int, legacy: bool, spatial: bool
) -> tuple[int, int]:
    """(heads, head width) of an attention block at width ch, exactly as openaimodel.py computes
    them, including the `legacy` quirk (non-spatial legacy blocks get num_head_channels as is)."""
    if num_head_channels == -1:
        heads, dim_head = num_heads, ch // num_heads
    else:
        heads, dim_head = ch // num_head_channels, num_head_channels
    if legacy:
        dim_head = ch // heads if spatial else num_head_channels
    return heads, dim_head


class UNetModel(nn.Module):
    """Timestep- and context-conditioned U-Net with ResBlocks and (spatial-transformer) attention.

    Ronneberger et al. 2015 U-Net as used by DDPM (Ho et al. 2020), guided-diffusion (Dhariwal &
    Nichol 2021) and LDM (Rombach et al. 2022, Fig. 3). `attn_backend` (ours) picks the attention
    backend ("sdpa" | "xformers" | "math"); None defers to $LDM_ATTENTION_BACKEND, then "sdpa".
    """

    def __init__(
        self,
        image_size: int | None,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int | Sequence[int],
        attention_resolutions: Sequence[int],
        dropout: float = 0.0,
        channel_mult: Sequence[int] = (1, 2, 4, 8),
        conv_resample: bool = True,
        dims: int = 2,
        num_classes: int | str | None = None,
        use_checkpoint: bool = False,
        use_fp16: bool = False,
        use_bf16: bool = False,
        num_heads: int = -1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
        use_spatial_transformer: bool = False,
        transformer_depth: int | Sequence[int] = 1,
        context_dim: int | Sequence[int] | None = None,
        n_embed: int | None = None,
        legacy: bool = True,
        disable_self_attentions: Sequence[bool] | None = None,
        num_attention_blocks: Sequence[int] | None = None,
        disable_middle_self_attn: bool = False,
        use_linear_in_transformer: bool = False,
        adm_in_channels: int | None = None,
        attn_backend: str | None = None,
        position_embedding: bool | str = False,
        pooled_context: bool = False,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        channel_mult = _as_list(channel_mult)
        attention_resolutions = _as_list(attention_resolutions)
        context_dim = _as_list(context_dim)
        num_res_blocks = _as_list(num_res_blocks)
        transformer_depth = _as_list(transformer_depth)
        disable_self_attentions = _as_list(disable_self_attentions)
        num_attention_blocks = _as_list(num_attention_blocks)
        n_levels = len(channel_mult)

        if use_spatial_transformer and context_dim is None:
            raise ValueError(
                "UNetModel: use_spatial_transformer=True needs context_dim (the width of the "
                "cross-attention conditioning, e.g. 768 for SD 1.x)."
            )
        if context_dim is not None and not use_spatial_transformer:
            raise ValueError(
                f"UNetModel: context_dim={context_dim} is only used by the spatial transformer; "
                "set use_spatial_transformer=True or drop context_dim."
            )
        if num_heads == -1 and num_head_channels == -1:
            raise ValueError("UNetModel: set either num_heads or num_head_channels.")
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        if isinstance(num_res_blocks, int):
            num_res_blocks = [num_res_blocks] * n_levels
        elif len(num_res_blocks) != n_levels:
            raise ValueError(
                f"UNetModel: num_res_blocks has {len(num_res_blocks)} entries but channel_mult has "
                f"{n_levels}; give an int or one entry per level."
            )
        if isinstance(transformer_depth, int):
            transformer_depth = [transformer_depth] * n_levels
        elif len(transformer_depth) != n_levels:
            raise ValueError(
                f"UNetModel: transformer_depth has {len(transformer_depth)} entries; expected an "
                f"int or {n_levels} (one per level)."
            )
        if disable_self_attentions is not None and len(disable_self_attentions) != n_levels:
            raise ValueError(
                f"UNetModel: disable_self_attentions has {len(disable_self_attentions)} entries; "
                f"expected {n_levels} (one bool per level)."
            )
        if num_attention_blocks is not None:
            if len(num_attention_blocks) != n_levels or any(
                a > r for a, r in zip(num_attention_blocks, num_res_blocks)
            ):
                raise ValueError(
                    f"UNetModel: num_attention_blocks {num_attention_blocks} must have one entry "
                    f"per level, each at most num_res_blocks {num_res_blocks}."
                )
        if num_classes is not None and not isinstance(num_classes, int):
            if num_classes not in ("continuous", "sequential"):
                raise ValueError(
                    f"UNetModel: num_classes={num_classes!r}; expected an int, 'continuous' or "
                    "'sequential'."
                )
            if num_classes == "sequential" and adm_in_channels is None:
                raise ValueError("UNetModel: num_classes='sequential' needs adm_in_channels.")
        if attn_backend is not None:
            resolve_backend(attn_backend)

        self.image_size = image_size
        # ours, off by default (SD keys unchanged): a learned absolute position map added after the
        # input conv, so cross-attention can bind words such as "top left" to places. "sincos"
        # starts it from 2D sine-cosine features at unit RMS (MAE-style), "learned" (or true) from
        # small random values.
        self.pos_embed: nn.Parameter | None = None
        if position_embedding:
            if dims != 2 or not isinstance(image_size, int):
                raise ValueError(
                    "UNetModel: position_embedding needs dims=2 and an int image_size "
                    f"(the latent side), got dims={dims}, image_size={image_size!r}."
                )
            self.pos_embed = nn.Parameter(
                initial_position_map(position_embedding, model_channels, image_size)
            )
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = attention_resolutions
        self.dropout = dropout
        self.channel_mult = channel_mult
        self.conv_resample = conv_resample
        self.num_classes = num_classes
        self.use_checkpoint = use_checkpoint
        self.dtype = torch.bfloat16 if use_bf16 else torch.float16 if use_fp16 else torch.float32
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        self.num_heads_upsample = num_heads_upsample
        self.predict_codebook_ids = n_embed is not None
        self.attn_backend = attn_backend
        # ours, off by default: run the 2-D torso on channels-last activations (NHWC strides; the
        # weights and the state dict keep their layout). The SpatialTransformer's [B, C, H, W] <->
        # [B, HW, C] rearranges are then copy-free and oneDNN convolutions skip their activation
        # reorders, but each convolution converts its weight (a copy that costs more than it saves
        # at low resolution; see benchmarks/README.md). The output is NCHW again.
        self.channels_last = bool(channels_last) and dims == 2

        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, time_embed_dim),
            nn.SiLU(),
            nn.Linear(time_embed_dim, time_embed_dim),
        )
        if isinstance(num_classes, int):
            self.label_emb = nn.Embedding(num_classes, time_embed_dim)
        elif num_classes == "continuous":
            self.label_emb = nn.Linear(1, time_embed_dim)
        elif num_classes == "sequential":
            self.label_emb = nn.Sequential(
                nn.Sequential(
                    nn.Linear(adm_in_channels, time_embed_dim),
                    nn.SiLU(),
                    nn.Linear(time_embed_dim, time_embed_dim),
                )
            )
        # ours, off by default (SD keys unchanged): the mean of the context tokens, projected and
        # added to the timestep embedding (Imagen, Saharia et al. 2022, sec. 2.4), so every
        # ResBlock sees the whole prompt, not only the attention layers.
        self.context_emb: nn.Sequential | None = None
        if pooled_context:
            width = context_dim[0] if isinstance(context_dim, list) else context_dim
            if width is None:
                raise ValueError("UNetModel: pooled_context=True needs context_dim.")
            self.context_emb = nn.Sequential(
                nn.LayerNorm(width),
                nn.Linear(width, time_embed_dim),
                nn.SiLU(),
                nn.Linear(time_embed_dim, time_embed_dim),
            )

        def res_block(ch_in: int, ch_out: int, **kw: Any) -> ResBlock:
            return ResBlock(
                ch_in,
                time_embed_dim,
                dropout,
                out_channels=ch_out,
                dims=dims,
                use_checkpoint=use_checkpoint,
                use_scale_shift_norm=use_scale_shift_norm,
                **kw,
            )

        def attn_block(ch: int, depth: int, heads_attnblock: int, disable_sa: bool) -> nn.Module:
            heads, dim_head = head_layout(
                ch, num_heads, num_head_channels, legacy, use_spatial_transformer
            )
            if num_head_channels != -1:
                heads_attnblock = heads
            if not use_spatial_transformer:
                return AttentionBlock(
                    ch,
                    use_checkpoint=use_checkpoint,
                    num_heads=heads_attnblock,
                    num_head_channels=dim_head,
                    use_new_attention_order=use_new_attention_order,
                    attn_backend=attn_backend,
                )
            return SpatialTransformer(
                ch,
                heads,
                dim_head,
                depth=depth,
                context_dim=context_dim,
                disable_self_attn=disable_sa,
                use_linear=use_linear_in_transformer,
                use_checkpoint=use_checkpoint,
                attn_backend=attn_backend,
            )

        def level_disables_sa(level: int) -> bool:
            return bool(disable_self_attentions[level]) if disable_self_attentions else False

        def has_attention(level: int, index: int) -> bool:
            return num_attention_blocks is None or index < num_attention_blocks[level]

        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(conv_nd(dims, in_channels, model_channels, 3, padding=1))]
        )
        input_block_chans = [model_channels]
        ch = model_channels
        ds = 1
        for level, mult in enumerate(channel_mult):
            for nr in range(num_res_blocks[level]):
                layers: list[nn.Module] = [res_block(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions and has_attention(level, nr):
                    layers.append(
                        attn_block(
                            ch, transformer_depth[level], num_heads, level_disables_sa(level)
                        )
                    )
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                input_block_chans.append(ch)
            if level != n_levels - 1:
                down = (
                    res_block(ch, ch, down=True)
                    if resblock_updown
                    else Downsample(ch, conv_resample, dims=dims, out_channels=ch)
                )
                self.input_blocks.append(TimestepEmbedSequential(down))
                input_block_chans.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(
            res_block(ch, ch),
            attn_block(ch, transformer_depth[-1], num_heads, disable_middle_self_attn),
            res_block(ch, ch),
        )

        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks[level] + 1):
                ich = input_block_chans.pop()
                layers = [res_block(ch + ich, model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_resolutions and has_attention(level, i):
                    layers.append(
                        attn_block(
                            ch,
                            transformer_depth[level],
                            num_heads_upsample,
                            level_disables_sa(level),
                        )
                    )
                if level and i == num_res_blocks[level]:
                    up = (
                        res_block(ch, ch, up=True)
                        if resblock_updown
                        else Upsample(ch, conv_resample, dims=dims, out_channels=ch)
                    )
                    layers.append(up)
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch),
            nn.SiLU(),
            zero_module(conv_nd(dims, model_channels, out_channels, 3, padding=1)),
        )
        if self.predict_codebook_ids:
            self.id_predictor = nn.Sequential(
                normalization(ch),
                conv_nd(dims, model_channels, n_embed, 1),
            )

    def _torso_params(self) -> tuple[nn.Module, ...]:
        return (self.input_blocks, self.middle_block, self.output_blocks)

    def convert_to_fp16(self) -> None:
        """Cast the torso (input, middle, output blocks) to self.dtype (fp16/bf16), as guided-diffusion."""
        for module in self._torso_params():
            module.to(self.dtype)

    def convert_to_fp32(self) -> None:
        """Cast the torso back to fp32."""
        for module in self._torso_params():
            module.to(torch.float32)

    def _torso_dtype(self, device_type: str) -> torch.dtype:
        """dtype the blocks run in: self.dtype (use_fp16/use_bf16) under autocast or when the
        weights already have it; otherwise the weights' dtype (a use_fp16 config on fp32 CPU
        weights runs in fp32 instead of failing)."""
        weight_dtype = self.input_blocks[0][0].weight.dtype
        if torch.is_autocast_enabled(device_type) or weight_dtype == self.dtype:
            return self.dtype
        if self.dtype != torch.float32 and not getattr(self, "_warned_dtype", False):
            self._warned_dtype = True
            logger.info(
                "UNetModel: use_fp16/use_bf16 asks for %s but the weights are %s and autocast is "
                "off; running the blocks in %s (call convert_to_fp16() or use autocast).",
                self.dtype,
                weight_dtype,
                weight_dtype,
            )
        return weight_dtype

    def _position_embedding(self, h: torch.Tensor) -> torch.Tensor:
        """Learned absolute position [1, C, S, S], resized (bilinear) when h is another size."""
        pos = self.pos_embed.to(h.dtype)
        if pos.shape[-2:] != h.shape[-2:]:
            pos = torch.nn.functional.interpolate(
                pos, size=h.shape[-2:], mode="bilinear", align_corners=False
            )
        return pos

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor | float | None = None,
        context: torch.Tensor | Sequence[torch.Tensor] | None = None,
        y: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """x: [B, C_in, *spatial], timesteps: [B] (float allowed), context: [B, M, D], y: [B] or
        [B, adm] -> [B, C_out, *spatial] (or codebook logits [B, n_embed, *spatial])."""
        if (y is not None) != (self.num_classes is not None):
            raise ValueError(
                "UNetModel: pass y (class labels / adm vector) if and only if the model was built "
                f"with num_classes (num_classes={self.num_classes!r}, y given: {y is not None})."
            )
        if timesteps is None:
            raise ValueError("UNetModel.forward needs timesteps ([B] tensor or a number).")
        timesteps = torch.as_tensor(timesteps, device=x.device)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])  # scalar -> [B]
        autocast = torch.is_autocast_enabled(x.device.type)
        t_emb = timestep_embedding(timesteps, self.model_channels)  # [B, model_channels]
        if not autocast:
            t_emb = t_emb.to(self.time_embed[0].weight.dtype)
        emb = self.time_embed(t_emb)  # [B, 4 * model_channels]
        if self.num_classes is not None:
            if y.shape[0] != x.shape[0]:
                raise ValueError(f"UNetModel: y has batch {y.shape[0]}, x has {x.shape[0]}")
            if isinstance(self.num_classes, int):
                emb = emb + self.label_emb(y)
            else:
                emb = emb + self.label_emb(y.to(emb.dtype))
        if self.context_emb is not None:
            if not isinstance(context, torch.Tensor):
                raise ValueError(
                    "UNetModel: pooled_context=True needs context as one [B, M, D] tensor, got "
                    f"{type(context).__name__}."
                )
            pooled = context.mean(dim=1)  # [B, D]
            emb = emb + self.context_emb(pooled.to(self.context_emb[1].weight.dtype)).to(emb.dtype)

        dtype = self._torso_dtype(x.device.type)
        h = x.to(dtype)
        if self.channels_last:
            h = h.contiguous(memory_format=torch.channels_last)
        if not autocast:
            emb = emb.to(dtype)
            if isinstance(context, torch.Tensor):
                context = context.to(dtype)
            elif context is not None:
                context = [c.to(dtype) for c in context]
        hs = []
        for i, module in enumerate(self.input_blocks):
            h = module(h, emb, context)
            if i == 0 and self.pos_embed is not None:
                h = h + self._position_embedding(h)
            hs.append(h)
        h = self.middle_block(h, emb, context)
        # a side that is not a multiple of 2 ** (downsamplings) was rounded up on the way down:
        # each up block then upsamples to its next skip's size (diffusers' `upsample_size`)
        odd = any(s % 2 ** (len(self.channel_mult) - 1) for s in x.shape[-2:])
        for module in self.output_blocks:
            h = torch.cat([h, hs.pop()], dim=1)  # [B, C + C_skip, *spatial]
            if odd and hs:
                h = module(h, emb, context, output_size=hs[-1].shape[2:])
            else:
                h = module(h, emb, context)
        head = self.id_predictor if self.predict_codebook_ids else self.out
        h = h.to(x.dtype if autocast else head[0].weight.dtype)
        return head(h).contiguous()
