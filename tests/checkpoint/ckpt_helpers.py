"""Fabricated checkpoints for the checkpoint tests: SD key layouts from the reference lists."""

from __future__ import annotations

from pathlib import Path

import torch

DATA = Path(__file__).parent / "data"

TINY_UNET = dict(
    image_size=8,
    in_channels=4,
    out_channels=4,
    model_channels=32,
    attention_resolutions=[2, 1],
    num_res_blocks=1,
    channel_mult=[1, 2],
    num_heads=2,
    use_spatial_transformer=True,
    transformer_depth=1,
    context_dim=32,
    legacy=False,
)
TINY_DDCONFIG = dict(
    double_z=True,
    z_channels=4,
    resolution=32,
    in_channels=3,
    out_ch=3,
    ch=32,
    ch_mult=[1, 2],
    num_res_blocks=1,
    attn_resolutions=[],
    dropout=0.0,
)


def tsv_state_dict(name: str, device: str = "meta") -> dict[str, torch.Tensor]:
    """State dict with the keys/shapes of a reference list (meta tensors: no memory)."""
    sd = {}
    for line in (DATA / name).read_text().splitlines()[1:]:
        key, shape = line.split("\t")
        dims = [int(x) for x in shape.split("x")] if shape else []
        sd[key] = torch.empty(dims, device=device)
    return sd


def sd_key_state_dict(version: str) -> dict[str, torch.Tensor]:
    """A full SD v1/v2 key set (U-Net, VAE, text encoder) on the meta device."""
    sd = tsv_state_dict(f"sd-{version}-unet-vae.tsv")
    sd.update(tsv_state_dict(f"sd-{version}-text-encoder.tsv"))
    return sd


def randomize(sd: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """Deterministic random values (so that permuted keys would be caught)."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) for k, v in sd.items()}
