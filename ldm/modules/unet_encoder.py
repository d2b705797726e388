"""Half U-Net with a pooled head: the noisy-image classifier of guided diffusion.

Dhariwal & Nichol 2021, Sec. 4 (classifier guidance); CompVis `openaimodel.EncoderUNetModel` keys.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ldm.modules.timestep import timestep_embedding
from ldm.modules.unet_attention import AttentionBlock, QKVAttention
from ldm.modules.unet_layers import (
    Downsample,
    ResBlock,
    TimestepEmbedSequential,
    conv_nd,
    normalization,
    zero_module,
)

POOLS = ("adaptive", "attention", "spatial", "spatial_v2")


class AttentionPool2d(nn.Module):
    """CLIP-style attention pooling: the mean token attends over all positions (Radford et al. 2021)."""

    def __init__(
        self,
        spacial_dim: int,
        embed_dim: int,
        num_heads_channels: int,
        output_dim: int | None = None,
    ) -> None:
        super().__init__()
        self.positional_embedding = nn.Parameter(
            torch.randn(embed_dim, spacial_dim**2 + 1) / embed_dim**0.5
        )
        self.qkv_proj = conv_nd(1, embed_dim, 3 * embed_dim, 1)
        self.c_proj = conv_nd(1, embed_dim, output_dim or embed_dim, 1)
        self.num_heads = embed_dim // num_heads_channels
        self.attention = QKVAttention(self.num_heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, C, H, W] -> [B, output_dim]."""
        b, c, *_ = x.shape
        x = x.reshape(b, c, -1)  # [B, C, HW]
        x = torch.cat([x.mean(dim=-1, keepdim=True), x], dim=-1)  # [B, C, HW+1]
        x = x + self.positional_embedding[None].to(x.dtype)
        x = self.c_proj(self.attention(self.qkv_proj(x)))
        return x[:, :, 0]


class EncoderUNetModel(nn.Module):
    """The U-Net's input and middle blocks followed by a pooling head (for classifiers)."""

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        dropout: float = 0.0,
        channel_mult: Sequence[int] = (1, 2, 4, 8),
        conv_resample: bool = True,
        dims: int = 2,
        use_checkpoint: bool = False,
        use_fp16: bool = False,
        num_heads: int = 1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
        pool: str = "adaptive",
        attn_backend: str | None = None,
    ) -> None:
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"EncoderUNetModel: pool={pool!r}; expected one of {POOLS}")
        if pool == "attention" and num_head_channels == -1:
            raise ValueError("EncoderUNetModel: pool='attention' needs num_head_channels.")
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.pool = pool
        self.dtype = torch.float16 if use_fp16 else torch.float32
        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, time_embed_dim),
            nn.SiLU(),
            nn.Linear(time_embed_dim, time_embed_dim),
        )

        def res_block(ch_in: int, ch_out: int, **kw) -> ResBlock:
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

        def attn_block(ch: int) -> AttentionBlock:
            return AttentionBlock(
                ch,
                use_checkpoint=use_checkpoint,
                num_heads=num_heads,
                num_head_channels=num_head_channels,
                use_new_attention_order=use_new_attention_order,
                attn_backend=attn_backend,
            )

        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(conv_nd(dims, in_channels, model_channels, 3, padding=1))]
        )
        feature_size = ch = model_channels
        ds = 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res_block(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(attn_block(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                feature_size += ch
            if level != len(channel_mult) - 1:
                down = (
                    res_block(ch, ch, down=True)
                    if resblock_updown
                    else Downsample(ch, conv_resample, dims=dims, out_channels=ch)
                )
                self.input_blocks.append(TimestepEmbedSequential(down))
                ds *= 2
                feature_size += ch
        self.middle_block = TimestepEmbedSequential(
            res_block(ch, ch), attn_block(ch), res_block(ch, ch)
        )
        feature_size += ch
        if pool == "adaptive":
            self.out = nn.Sequential(
                normalization(ch),
                nn.SiLU(),
                nn.AdaptiveAvgPool2d((1, 1)),
                zero_module(conv_nd(dims, ch, out_channels, 1)),
                nn.Flatten(),
            )
        elif pool == "attention":
            self.out = nn.Sequential(
                normalization(ch),
                nn.SiLU(),
                AttentionPool2d(image_size // ds, ch, num_head_channels, out_channels),
            )
        elif pool == "spatial":
            self.out = nn.Sequential(
                nn.Linear(feature_size, 2048), nn.ReLU(), nn.Linear(2048, out_channels)
            )
        else:  # spatial_v2
            self.out = nn.Sequential(
                nn.Linear(feature_size, 2048),
                normalization(2048),
                nn.SiLU(),
                nn.Linear(2048, out_channels),
            )

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x: [B, C, H, W], timesteps: [B] -> logits [B, out_channels]."""
        timesteps = torch.as_tensor(timesteps, device=x.device)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])  # scalar -> [B]
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        weight_dtype = self.input_blocks[0][0].weight.dtype
        h = x.to(self.dtype if torch.is_autocast_enabled(x.device.type) else weight_dtype)
        emb = emb.to(h.dtype)
        spatial = self.pool.startswith("spatial")
        pooled = []
        for module in self.input_blocks:
            h = module(h, emb)
            if spatial:
                pooled.append(h.to(x.dtype).mean(dim=(2, 3)))
        h = self.middle_block(h, emb)
        if spatial:
            pooled.append(h.to(x.dtype).mean(dim=(2, 3)))
            return self.out(torch.cat(pooled, dim=-1))  # [B, feature_size] -> [B, out]
        return self.out(h.to(x.dtype))
