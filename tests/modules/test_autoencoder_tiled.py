"""Exact tiled decoding: the strip-wise decoder walk equals ``Decoder.forward`` to float tolerance."""

from __future__ import annotations

import pytest
import torch
from tiny_models import build_tiny, tiny_ldm_config

from ldm.models.autoencoder import VQModelInterface
from ldm.modules.autoencoder import Decoder
from ldm.modules.autoencoder_tiled import decoder_forward_tiled, tiled_decoding

TINY = dict(
    ch=32,
    out_ch=3,
    ch_mult=(1, 2, 2),
    num_res_blocks=1,
    attn_resolutions=(8, 16),  # attention at the latent level and one level up, plus the mid block
    in_channels=3,
    resolution=32,
    z_channels=4,
    norm_num_groups=8,
)
SD_CHANNELS = dict(  # SD v1's decoder (ch 128, ch_mult 1 2 4 4, 32 groups), small spatial size
    ch=128,
    out_ch=3,
    ch_mult=(1, 2, 4, 4),
    num_res_blocks=2,
    attn_resolutions=(),
    in_channels=3,
    resolution=256,
    z_channels=4,
)


def _decoder(seed: int = 0, **cfg) -> Decoder:
    torch.manual_seed(seed)
    d = Decoder(**cfg).eval()
    with torch.no_grad():  # non-trivial GroupNorm affines and biases
        for name, p in d.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.3)
    return d


def _max_diff(d: Decoder, z: torch.Tensor, strip_bytes: int) -> float:
    with torch.no_grad():
        ref = d(z)
        with tiled_decoding(d, strip_bytes):
            out = d(z)
    assert out.shape == ref.shape
    return (out - ref).abs().max().item()


@pytest.mark.parametrize(
    ("extra", "shape"),
    [
        ({}, (2, 4, 7, 5)),  # odd sizes, batch 2
        ({"tanh_out": True, "resamp_with_conv": False}, (1, 4, 9, 5)),
        ({"give_pre_end": True}, (2, 4, 6, 13)),
        ({"attn_type": "none"}, (1, 4, 7, 7)),
    ],
)
def test_tiled_equals_untiled_tiny(extra: dict, shape: tuple) -> None:
    d = _decoder(**{**TINY, **extra})
    z = torch.randn(*shape) * 2 + 0.5  # a mean away from 0: GroupNorm statistics matter
    # 12 KiB strips: a few rows per strip at every level
    assert _max_diff(d, z, 12 * 2**10) < 1e-4
    assert _max_diff(d, z, 2**30) < 1e-4  # one strip per layer


def test_tiled_equals_untiled_sd_channels() -> None:
    d = _decoder(**SD_CHANNELS)
    z = torch.randn(1, 4, 5, 7)  # 40 x 56 image; 4 MiB strips: ~10-30 rows at the top levels
    assert _max_diff(d, z, 4 * 2**20) < 1e-4


def test_per_tile_statistics_would_be_caught() -> None:
    """The bound above is tight enough: GroupNorm over the first half of an activation only
    (what per-tile decoding does) changes the image by far more."""
    from ldm.modules import autoencoder_tiled as at

    d = _decoder(**TINY)
    z = torch.randn(1, 4, 8, 8) * 2 + 0.5
    real = at.group_stats

    def half_stats(x, norm, strip_bytes):
        return real(x[:, :, : max(1, x.shape[2] // 2)], norm, strip_bytes)

    with torch.no_grad():
        ref = d(z)
        at.group_stats = half_stats
        try:
            out = decoder_forward_tiled(d, z, 2**30)
        finally:
            at.group_stats = real
    assert (out - ref).abs().max().item() > 1e-2


def test_tiled_context_restores_untiled_forward() -> None:
    d = _decoder(**TINY)
    with tiled_decoding(d, 1024):
        assert d.tiled_strip_bytes == 1024
    assert d.tiled_strip_bytes is None
    assert "tiled_strip_bytes" not in str(d.state_dict().keys())


def test_vq_decoder_tiled() -> None:
    torch.manual_seed(0)
    vq = VQModelInterface(
        embed_dim=4,
        n_embed=16,
        ddconfig={**TINY, "double_z": False},
        lossconfig={"target": "torch.nn.Identity"},
    ).eval()
    h = torch.randn(2, 4, 5, 3)
    with torch.no_grad():
        ref = vq.decode(h)
        with tiled_decoding(vq.decoder, 12 * 2**10):
            out = vq.decode(h)
    assert (out - ref).abs().max().item() < 1e-4


def test_generate_tiled_decode_equals_full() -> None:
    model = build_tiny(tiny_ldm_config())
    z = torch.randn(2, 4, 5, 7)
    from ldm.engine.generate import decode_latents

    full = decode_latents(model, z, "full")
    tiled = decode_latents(model, z, "tiled")
    assert (tiled - full).abs().max().item() < 1e-4
