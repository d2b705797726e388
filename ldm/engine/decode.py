"""Decoding latents to images: one sample at a time (sliced), in exact strips (tiled), and
tensors to 8-bit PIL images.

Tiled decoding is exact: the decoder runs layer by layer with GroupNorm statistics over the whole
activation and the convolutions in strips with their halo (``ldm.modules.autoencoder_tiled``), so
the image equals the untiled decode to float tolerance while the peak memory drops (README,
"Tiled decoding"; ``benchmarks/bench_tiled_decode.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from ldm.modules.autoencoder_tiled import STRIP_BYTES, tiled_decoding

logger = logging.getLogger(__name__)

Decode = Callable[[torch.Tensor], torch.Tensor]


def decode_sliced(decode: Decode, z: torch.Tensor) -> torch.Tensor:
    """Decode a batch one sample at a time."""
    return torch.cat([decode(z[i : i + 1]) for i in range(z.shape[0])])


def decode_tiled(model: Any, z: torch.Tensor, strip_bytes: int = STRIP_BYTES) -> torch.Tensor:
    """``model.decode_latent(z)`` one sample at a time with the first stage's decoder in exact
    strips (``ldm.modules.autoencoder_tiled``); a first stage without a ``Decoder`` decodes as is."""
    decoder = getattr(getattr(model, "first_stage_model", None), "decoder", None)
    if decoder is None or not hasattr(decoder, "tiled_strip_bytes"):
        logger.info("tiled decode: the first stage has no tileable decoder; decoding whole")
        return decode_sliced(model.decode_latent, z)
    with tiled_decoding(decoder, strip_bytes):
        return decode_sliced(model.decode_latent, z)


def to_pil(x: torch.Tensor) -> Any:
    """[C, H, W] in [0, 1] -> 8-bit RGB PIL image."""
    import numpy as np
    from PIL import Image

    arr = (x.clamp(0, 1).permute(1, 2, 0).float().cpu().numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(arr)  # [H, W, C]
