"""Cross-attention and the SpatialTransformer of latent diffusion (Rombach et al. 2022, Sec. 3.3).

Key names follow CompVis/Stability `ldm.modules.attention` so SD checkpoints load unchanged.
Every attention product goes through `ldm.modules.attention_backends.attention`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules import geglu_feed_forward as geglu_ff
from ldm.modules.activation_recompute import checkpoint
from ldm.modules.attention_backends import BACKENDS, attention, math_attention, resolve_backend
from ldm.modules.gated_gelu import gated_gelu
from ldm.modules.module_hooks import hooked

__all__ = [
    "BACKENDS",
    "BasicTransformerBlock",
    "CrossAttention",
    "FeedForward",
    "GEGLU",
    "SpatialTransformer",
    "attention",
    "math_attention",
    "resolve_backend",
]


class CrossAttention(nn.Module):
    """Multi-head attention softmax(Q K^T / sqrt(d)) V with Q = W_q x, K = W_k c, V = W_v c (LDM Eq. 3)."""

    def __init__(
        self,
        query_dim: int,
        context_dim: int | None = None,
        heads: int = 8,
        dim_head: int = 64,
        dropout: float = 0.0,
        attn_backend: str | None = None,
    ) -> None:
        super().__init__()
        inner_dim = dim_head * heads
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.dim_head = dim_head
        self.scale = dim_head**-0.5
        self.attn_backend = attn_backend
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x: [B, N, query_dim], context: [B, M, context_dim] (None = self-attention) -> [B, N, query_dim]."""
        context = x if context is None else context
        b, n, _ = x.shape
        h, d = self.heads, self.dim_head
        q = self.to_q(x).view(b, n, h, d).transpose(1, 2)  # [B, H, N, d]
        k = self.to_k(context).view(b, -1, h, d).transpose(1, 2)  # [B, H, M, d]
        v = self.to_v(context).view(b, -1, h, d).transpose(1, 2)  # [B, H, M, d]
        if mask is not None:
            mask = mask.reshape(b, 1, 1, -1)  # key mask [B, M] -> [B, 1, 1, M]
        out = attention(q, k, v, backend=self.attn_backend, mask=mask, scale=self.scale)
        out = out.transpose(1, 2).reshape(b, n, h * d)  # [B, N, H*d]
        return self.to_out(out)


class GEGLU(nn.Module):
    """Gated GELU projection x W * GELU(x V) (Shazeer 2020, "GLU Variants Improve Transformer")."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gated_gelu(self.proj(x))


class FeedForward(nn.Module):
    """Transformer MLP: Linear -> (GE)GLU/GELU -> Dropout -> Linear (keys net.0.proj, net.2)."""

    def __init__(
        self,
        dim: int,
        dim_out: int | None = None,
        mult: int = 4,
        glu: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        inner_dim = int(dim * mult)
        dim_out = dim if dim_out is None else dim_out
        project_in = (
            GEGLU(dim, inner_dim) if glu else nn.Sequential(nn.Linear(dim, inner_dim), nn.GELU())
        )
        self.net = nn.Sequential(project_in, nn.Dropout(dropout), nn.Linear(inner_dim, dim_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.net) != 3:  # a user's edited net runs as it is
            return self.net(x)
        gate, dropout, out = self.net
        if (
            isinstance(gate, GEGLU)
            and not hooked(self.net)
            and not hooked(gate)
            and geglu_ff.applies(gate.proj, dropout, out, x)
        ):
            return geglu_ff.geglu_feed_forward(x, gate.proj, out)  # fp32 CPU: feature-major
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm block: self-attention, cross-attention, gated feed-forward, each residual."""

    def __init__(
        self,
        dim: int,
        n_heads: int,
        d_head: int,
        dropout: float = 0.0,
        context_dim: int | None = None,
        gated_ff: bool = True,
        checkpoint: bool = False,
        disable_self_attn: bool = False,
        attn_backend: str | None = None,
    ) -> None:
        super().__init__()
        self.disable_self_attn = disable_self_attn
        # with disable_self_attn, attn1 attends to the context too (SD 2.x "only cross attention")
        self.attn1 = CrossAttention(
            dim,
            context_dim=context_dim if disable_self_attn else None,
            heads=n_heads,
            dim_head=d_head,
            dropout=dropout,
            attn_backend=attn_backend,
        )
        self.ff = FeedForward(dim, dropout=dropout, glu=gated_ff)
        self.attn2 = CrossAttention(
            dim,
            context_dim=context_dim,
            heads=n_heads,
            dim_head=d_head,
            dropout=dropout,
            attn_backend=attn_backend,
        )
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.checkpoint = checkpoint

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, N, dim], context: [B, M, context_dim] -> [B, N, dim]."""
        if context is None:
            return checkpoint(self._forward, x, enabled=self.checkpoint)
        return checkpoint(self._forward, x, context, enabled=self.checkpoint)

    def _forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        x = self.attn1(self.norm1(x), context=context if self.disable_self_attn else None) + x
        x = self.attn2(self.norm2(x), context=context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map with cross-attention to a context (LDM Fig. 3).

    GroupNorm -> proj_in (1x1 conv, or linear with use_linear) -> depth x BasicTransformerBlock ->
    proj_out (zero-initialized) -> residual.
    """

    def __init__(
        self,
        in_channels: int,
        n_heads: int,
        d_head: int,
        depth: int = 1,
        dropout: float = 0.0,
        context_dim: int | Sequence[int] | None = None,
        disable_self_attn: bool = False,
        use_linear: bool = False,
        use_checkpoint: bool = False,
        attn_backend: str | None = None,
    ) -> None:
        super().__init__()
        if context_dim is None or isinstance(context_dim, int):
            context_dims = [context_dim] * depth
        else:
            context_dims = list(context_dim)
            if len(context_dims) == 1:
                context_dims = context_dims * depth
            if len(context_dims) != depth:
                raise ValueError(
                    f"SpatialTransformer: context_dim list has {len(context_dims)} entries but "
                    f"depth is {depth}; give one context_dim per transformer block (or a single int)."
                )
        if attn_backend is not None:
            resolve_backend(attn_backend)  # fail at construction on a misspelled backend
        self.in_channels = in_channels
        inner_dim = n_heads * d_head
        self.norm = nn.GroupNorm(num_groups=32, num_channels=in_channels, eps=1e-6, affine=True)
        if use_linear:
            self.proj_in = nn.Linear(in_channels, inner_dim)
            self.proj_out = nn.Linear(inner_dim, in_channels)
        else:
            self.proj_in = nn.Conv2d(in_channels, inner_dim, kernel_size=1)
            self.proj_out = nn.Conv2d(inner_dim, in_channels, kernel_size=1)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(
                inner_dim,
                n_heads,
                d_head,
                dropout=dropout,
                context_dim=context_dims[i],
                disable_self_attn=disable_self_attn,
                checkpoint=use_checkpoint,
                attn_backend=attn_backend,
            )
            for i in range(depth)
        )
        self.use_linear = use_linear

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | Sequence[torch.Tensor] | None = None
    ) -> torch.Tensor:
        """x: [B, C, H, W], context: [B, M, D] or one per block -> [B, C, H, W]."""
        contexts = list(context) if isinstance(context, (list, tuple)) else [context]
        if len(contexts) == 1:
            contexts = contexts * len(self.transformer_blocks)
        b, c, h, w = x.shape
        x_in = x
        x = self.norm(x)
        # [B, C, H, W] -> [B, HW, C]: a view when x is channels-last (the U-Net's layout); the
        # 1x1 proj_in / proj_out convolutions run as matmuls on the token layout (same weights)
        x = x.permute(0, 2, 3, 1).reshape(b, h * w, c)
        x = self.proj_in(x) if self.use_linear else _conv1x1_as_linear(self.proj_in, x, h, w)
        for block, ctx in zip(self.transformer_blocks, contexts):
            x = block(x, context=ctx)
        x = self.proj_out(x) if self.use_linear else _conv1x1_as_linear(self.proj_out, x, h, w)
        x = x.reshape(b, h, w, c).permute(0, 3, 1, 2)  # [B, HW, C] -> [B, C, H, W] (channels-last)
        if (
            x.dtype != x_in.dtype
            or not x_in.is_contiguous(memory_format=torch.channels_last)
            or (torch.is_grad_enabled() and (x.requires_grad or x_in.requires_grad))
        ):
            return x_in + x  # x_in first: the sum takes x_in's layout
        return x.add_(x_in)  # channels-last, no autograd graph: reuse the projection's buffer


def _conv1x1_as_linear(conv: nn.Module, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """A 1x1 Conv2d applied to tokens [B, HW, C_in] -> [B, HW, C_out] (weight [C_out, C_in, 1, 1]);
    a wrapped conv (e.g. a PEFT LoRA layer) runs its own forward on the channels-last image."""
    if type(conv) is nn.Conv2d:
        return F.linear(x, conv.weight.flatten(1), conv.bias)
    b, _, c = x.shape
    y = conv(x.reshape(b, h, w, c).permute(0, 3, 1, 2))
    return y.permute(0, 2, 3, 1).reshape(b, h * w, -1)
