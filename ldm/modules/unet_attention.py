"""Spatial self-attention block of guided-diffusion (non-transformer U-Nets, e.g. unconditional LDMs).

Dhariwal & Nichol 2021, Sec. 3: attention over all positions with q/k/v from one 1x1 conv. Two
channel layouts of that conv exist: legacy (heads outermost, split q/k/v per head) and the
"new order" (q/k/v outermost); both go through `ldm.modules.attention_backends.attention`.
"""

from __future__ import annotations

import torch
from torch import nn

from ldm.modules.activation_recompute import checkpoint
from ldm.modules.attention_backends import attention, resolve_backend
from ldm.modules.unet_layers import conv_nd, normalization, zero_module


class QKVAttentionLegacy(nn.Module):
    """QKV attention with the legacy channel layout [B, H * (3 * C), T] (heads outermost)."""

    def __init__(self, n_heads: int, attn_backend: str | None = None) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.attn_backend = attn_backend

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        """qkv: [B, H * 3 * C, T] -> [B, H * C, T]."""
        bs, width, length = qkv.shape
        ch = width // (3 * self.n_heads)
        qkv = qkv.reshape(bs, self.n_heads, 3 * ch, length).transpose(-1, -2)  # [B, H, T, 3C]
        q, k, v = qkv.split(ch, dim=-1)  # each [B, H, T, C]
        out = attention(q, k, v, backend=self.attn_backend)  # [B, H, T, C]
        return out.transpose(-1, -2).reshape(bs, self.n_heads * ch, length)  # [B, H*C, T]


class QKVAttention(nn.Module):
    """QKV attention with the new channel layout [B, 3 * H * C, T] (q, k, v outermost)."""

    def __init__(self, n_heads: int, attn_backend: str | None = None) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.attn_backend = attn_backend

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        """qkv: [B, 3 * H * C, T] -> [B, H * C, T]."""
        bs, width, length = qkv.shape
        ch = width // (3 * self.n_heads)
        qkv = qkv.reshape(bs, 3, self.n_heads, ch, length).transpose(-1, -2)  # [B, 3, H, T, C]
        q, k, v = qkv.unbind(1)  # each [B, H, T, C]
        out = attention(q, k, v, backend=self.attn_backend)  # [B, H, T, C]
        return out.transpose(-1, -2).reshape(bs, self.n_heads * ch, length)  # [B, H*C, T]


class AttentionBlock(nn.Module):
    """Residual multi-head self-attention over the spatial positions of a feature map."""

    def __init__(
        self,
        channels: int,
        num_heads: int = 1,
        num_head_channels: int = -1,
        use_checkpoint: bool = False,
        use_new_attention_order: bool = False,
        attn_backend: str | None = None,
    ) -> None:
        super().__init__()
        self.channels = channels
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            if channels % num_head_channels:
                raise ValueError(
                    f"AttentionBlock: channels {channels} not divisible by num_head_channels "
                    f"{num_head_channels}"
                )
            self.num_heads = channels // num_head_channels
        if attn_backend is not None:
            resolve_backend(attn_backend)
        self.use_checkpoint = use_checkpoint
        self.norm = normalization(channels)
        self.qkv = conv_nd(1, channels, channels * 3, 1)
        attn_cls = QKVAttention if use_new_attention_order else QKVAttentionLegacy
        self.attention = attn_cls(self.num_heads, attn_backend=attn_backend)
        self.proj_out = zero_module(conv_nd(1, channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, C, *spatial] -> [B, C, *spatial]."""
        return checkpoint(self._forward, x, enabled=self.use_checkpoint)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)  # [B, C, T]
        h = self.proj_out(self.attention(self.qkv(self.norm(x))))
        return (x + h).reshape(b, c, *spatial)
