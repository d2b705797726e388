"""Decoding latents to images: one sample at a time (sliced), overlapping latent tiles (tiled),
and tensors to 8-bit PIL images.

Tiles of the latent are decoded separately and blended with linear ramps over the overlap, so the
decoder's activations scale with the tile, not the image (peak memory of SD's decoder at 512x512
is dominated by [1, 128, 512, 512] feature maps). Seams vanish as the overlap grows; the output
differs from a full decode only where the decoder's receptive field crosses tile borders.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

Decode = Callable[[torch.Tensor], torch.Tensor]


def decode_sliced(decode: Decode, z: torch.Tensor) -> torch.Tensor:
    """Decode a batch one sample at a time."""
    return torch.cat([decode(z[i : i + 1]) for i in range(z.shape[0])])


def _ramp(n: int, overlap: int, start: bool, end: bool) -> torch.Tensor:
    """1-D blend weights: linear ramps of `overlap` pixels at inner borders."""
    w = torch.ones(n)
    if overlap > 0:
        r = torch.linspace(0, 1, overlap + 2)[1:-1]
        if not start:
            w[:overlap] = r
        if not end:
            w[-overlap:] = r.flip(0)
    return w


def _starts(size: int, tile: int, stride: int) -> list[int]:
    if size <= tile:
        return [0]
    s = list(range(0, size - tile, stride))
    return s + [size - tile]


def decode_tiled(
    decode: Decode, z: torch.Tensor, tile: int = 64, overlap: int = 16
) -> torch.Tensor:
    """Decode latent tiles of `tile` with `overlap` latent pixels of linear blending."""
    b, _, h, w = z.shape
    if h <= tile and w <= tile:
        return decode(z)
    stride = tile - overlap
    out = weight = None
    for y in _starts(h, tile, stride):
        for x in _starts(w, tile, stride):
            piece = decode(z[:, :, y : y + tile, x : x + tile])  # [B, C, th*f, tw*f]
            f = piece.shape[-1] // min(tile, w - x)
            if out is None:
                out = torch.zeros(
                    b, piece.shape[1], h * f, w * f, dtype=piece.dtype, device=piece.device
                )
                weight = torch.zeros(1, 1, h * f, w * f, dtype=piece.dtype, device=piece.device)
            th, tw = piece.shape[-2], piece.shape[-1]
            wy = _ramp(th, overlap * f, y == 0, y + tile >= h).to(piece)
            wx = _ramp(tw, overlap * f, x == 0, x + tile >= w).to(piece)
            m = wy[:, None] * wx[None, :]  # [th, tw]
            out[:, :, y * f : y * f + th, x * f : x * f + tw] += piece * m
            weight[:, :, y * f : y * f + th, x * f : x * f + tw] += m
    return out / weight


def to_pil(x: torch.Tensor) -> Any:
    """[C, H, W] in [0, 1] -> 8-bit RGB PIL image."""
    import numpy as np
    from PIL import Image

    arr = (x.clamp(0, 1).permute(1, 2, 0).float().cpu().numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(arr)  # [H, W, C]
