"""A small MLP denoiser with the U-Net's call signature, for toy data and fast tests.

eps_theta(x_t, t, context, y): x flattened, sinusoidal t-embedding (Ho et al. 2020, App. B),
optional mean-pooled cross-attention context and class embedding, residual MLP blocks.
"""

from __future__ import annotations

import torch
from torch import nn

from ldm.modules.timestep import timestep_embedding


class _Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.SiLU(), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width)
        )

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return h + self.net(h + emb)


class ToyDenoiser(nn.Module):
    """MLP eps/v/x0-predictor over [B, C, H, W] inputs with t [B] (float allowed)."""

    def __init__(
        self,
        in_channels: int,
        image_size: int = 1,
        out_channels: int | None = None,
        width: int = 64,
        depth: int = 2,
        time_dim: int = 32,
        context_dim: int | None = None,
        num_classes: int | None = None,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels or in_channels
        self.image_size = image_size
        self.time_dim = time_dim
        self.num_classes = num_classes
        n_in = in_channels * image_size * image_size
        self.inp = nn.Linear(n_in, width)
        self.time_embed = nn.Sequential(
            nn.Linear(time_dim, width), nn.SiLU(), nn.Linear(width, width)
        )
        self.context_proj = nn.Linear(context_dim, width) if context_dim else None
        self.label_emb = nn.Embedding(num_classes, width) if num_classes else None
        self.blocks = nn.ModuleList(_Block(width) for _ in range(depth))
        self.out = nn.Sequential(
            nn.SiLU(), nn.Linear(width, self.out_channels * image_size * image_size)
        )

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor:
        b = x.shape[0]
        t = torch.as_tensor(timesteps, device=x.device)
        t = t.expand(b) if t.ndim == 0 else t
        emb = self.time_embed(timestep_embedding(t, self.time_dim))  # [B, width]
        if self.context_proj is not None and context is not None:
            emb = emb + self.context_proj(context.mean(dim=1))  # [B, M, D] -> [B, width]
        if self.label_emb is not None:
            if y is None:
                raise ValueError("ToyDenoiser built with num_classes needs y (class labels).")
            emb = emb + self.label_emb(y.long())
        h = self.inp(x.reshape(b, -1))  # [B, C*H*W] -> [B, width]
        for block in self.blocks:
            h = block(h, emb)
        return self.out(h).reshape(b, self.out_channels, *x.shape[2:])
