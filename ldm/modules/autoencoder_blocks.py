"""Building blocks of the LDM autoencoder (Esser et al. 2021 VQGAN / Rombach et al. 2022 LDM, App. G).

Module and parameter names follow CompVis `ldm.modules.diffusionmodules.model` so that the
`first_stage_model.*` keys of Stable Diffusion checkpoints load unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.attention_backends import attention
from ldm.modules.conv2d import WinogradConv2d
from ldm.modules.norm_act import add_skip, norm_silu
from ldm.modules.upsample_conv import upsample_conv2d, worth_fusing

ATTN_TYPES = ("vanilla", "vanilla-xformers", "memory-efficient-cross-attn", "linear", "none")


def Normalize(in_channels: int, num_groups: int = 32) -> nn.GroupNorm:
    """GroupNorm with 32 groups and eps 1e-6, as in the CompVis autoencoder (Wu & He 2018)."""
    if in_channels % num_groups:
        raise ValueError(
            f"GroupNorm: {in_channels} channels are not divisible into {num_groups} groups; "
            "choose ch (times every ch_mult) as a multiple of norm_num_groups."
        )
    return nn.GroupNorm(num_groups=num_groups, num_channels=in_channels, eps=1e-6, affine=True)


def nonlinearity(x: torch.Tensor) -> torch.Tensor:
    """Swish / SiLU x * sigmoid(x) (Ramachandran et al. 2017)."""
    return F.silu(x)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, optionally followed by a 3x3 conv."""

    def __init__(self, in_channels: int, with_conv: bool) -> None:
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, C, 2H, 2W]."""
        if self.with_conv and worth_fusing(self.conv, x):
            return upsample_conv2d(x, self.conv.weight, self.conv.bias)
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.with_conv else x


class Downsample(nn.Module):
    """2x downsampling: asymmetric (0, 1, 0, 1) padding + stride-2 3x3 conv, or 2x2 average pooling."""

    def __init__(self, in_channels: int, with_conv: bool) -> None:
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, C, H/2, W/2]."""
        if self.with_conv:
            x = F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0)
            return self.conv(x)
        return F.avg_pool2d(x, kernel_size=2, stride=2)


class ResnetBlock(nn.Module):
    """Pre-activation residual block GN-swish-conv twice (He et al. 2016; DDPM's ResNet block)."""

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int | None = None,
        conv_shortcut: bool = False,
        dropout: float = 0.0,
        temb_channels: int = 0,
        norm_num_groups: int = 32,
    ) -> None:
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.use_conv_shortcut = conv_shortcut
        self.norm1 = Normalize(in_channels, norm_num_groups)
        self.conv1 = WinogradConv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if temb_channels > 0:
            self.temb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = Normalize(out_channels, norm_num_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = WinogradConv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            if conv_shortcut:
                self.conv_shortcut = WinogradConv2d(
                    in_channels, out_channels, 3, stride=1, padding=1
                )
            else:
                self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=1, padding=0)

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        """[B, C_in, H, W] -> [B, C_out, H, W]. With no graph recorded, SiLU and the skip run in
        place (the same bits, two activation-sized temporaries fewer per block)."""
        h = self.conv1(norm_silu(self.norm1, x))
        if temb is not None:
            h = h + self.temb_proj(nonlinearity(temb))[:, :, None, None]
        h = self.conv2(self.dropout(norm_silu(self.norm2, h)))
        if self.in_channels != self.out_channels:
            x = self.conv_shortcut(x) if self.use_conv_shortcut else self.nin_shortcut(x)
        return add_skip(h, x)


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with a residual, q/k/v/proj_out as 1x1 convs (VQGAN)."""

    def __init__(
        self, in_channels: int, backend: str | None = None, norm_num_groups: int = 32
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.backend = backend
        self.norm = Normalize(in_channels, norm_num_groups)
        self.q = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.k = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.v = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.proj_out = nn.Conv2d(in_channels, in_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x + proj_out(softmax(q k^T / sqrt(C)) v); [B, C, H, W] -> [B, C, H, W]."""
        h = self.norm(x)
        b, c, hh, ww = h.shape
        q = self.q(h).reshape(b, 1, c, hh * ww).transpose(2, 3)  # [B, 1, HW, C]
        k = self.k(h).reshape(b, 1, c, hh * ww).transpose(2, 3)  # [B, 1, HW, C]
        v = self.v(h).reshape(b, 1, c, hh * ww).transpose(2, 3)  # [B, 1, HW, C]
        out = attention(q, k, v, backend=self.backend)  # [B, 1, HW, C]
        out = out.transpose(2, 3).reshape(b, c, hh, ww)  # [B, C, H, W]
        return x + self.proj_out(out)


class LinAttnBlock(nn.Module):
    """Linear attention (Katharopoulos et al. 2020 style, key softmax) of CompVis `LinAttnBlock`.

    As in the original it has one head of width C, no norm and no residual connection.
    """

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.heads = 1
        self.to_qkv = nn.Conv2d(in_channels, in_channels * 3, 1, bias=False)
        self.to_out = nn.Conv2d(in_channels, in_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """out = (softmax_n(k) v^T)^T q; [B, C, H, W] -> [B, C, H, W]."""
        b, c, hh, ww = x.shape
        qkv = self.to_qkv(x).reshape(b, 3, self.heads, c // self.heads, hh * ww)  # [B, 3, h, d, N]
        q, k, v = qkv.unbind(dim=1)  # each [B, h, d, N]
        k = k.softmax(dim=-1)
        context = torch.einsum("bhdn,bhen->bhde", k, v)  # [B, h, d, d]
        out = torch.einsum("bhde,bhdn->bhen", context, q)  # [B, h, d, N]
        return self.to_out(out.reshape(b, c, hh, ww))


def make_attn(in_channels: int, attn_type: str = "vanilla", norm_num_groups: int = 32) -> nn.Module:
    """Attention block by CompVis name: vanilla | vanilla-xformers (same math, sdpa) | linear | none."""
    if attn_type in ("vanilla", "vanilla-xformers", "memory-efficient-cross-attn"):
        return AttnBlock(in_channels, norm_num_groups=norm_num_groups)
    if attn_type == "linear":
        return LinAttnBlock(in_channels)
    if attn_type == "none":
        return nn.Identity()
    raise ValueError(f"attn_type must be one of {ATTN_TYPES}, got {attn_type!r}.")
