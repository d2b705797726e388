"""Fourier features of numbers, the SDXL micro-conditioning (sgm ``ConcatTimestepEmbedderND``).

SDXL (Podell et al. 2023, Sec. 2.2) conditions on the original image size, the crop's top-left
corner, the target size and (refiner) an aesthetic score: each number is embedded with the
sinusoidal timestep embedding of ``outdim`` features (``[cos, sin]`` at frequencies
10000^(-i / (outdim/2))) and the embeddings are concatenated, ``[B, N] -> [B, N * outdim]``.
No parameters: these vectors enter the U-Net through its ``label_emb`` (``adm_in_channels``).
"""

from __future__ import annotations

import torch

from ldm.modules.encoders.base import AbstractEncoder
from ldm.modules.timestep import timestep_embedding


class ConcatTimestepEmbedderND(AbstractEncoder):
    """``[B, N]`` (or ``[B]``) numbers -> ``[B, N * outdim]`` concatenated Fourier features."""

    def __init__(self, outdim: int) -> None:
        super().__init__()
        if int(outdim) <= 0 or int(outdim) % 2:
            raise ValueError(
                f"ConcatTimestepEmbedderND: outdim must be a positive even number, got {outdim}"
            )
        self.outdim = int(outdim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(x)
        if x.ndim == 1:
            x = x[:, None]
        if x.ndim != 2:
            raise ValueError(
                f"ConcatTimestepEmbedderND: expected numbers of shape [B, N] or [B], got {tuple(x.shape)}"
            )
        b, n = x.shape
        emb = timestep_embedding(x.reshape(b * n), self.outdim)  # [B*N, outdim]
        return emb.reshape(b, n * self.outdim)
