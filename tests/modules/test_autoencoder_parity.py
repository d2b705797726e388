"""Numeric parity of our KL autoencoder with diffusers' AutoencoderKL via diffusers' own converter."""

from __future__ import annotations

import pytest
import torch

from ldm.models.autoencoder import AutoencoderKL

diffusers = pytest.importorskip("diffusers")
from diffusers.loaders.single_file_utils import (  # noqa: E402
    convert_ldm_vae_checkpoint,
    create_vae_diffusers_config_from_ldm,
)

DDCONFIG = {
    "double_z": True,
    "z_channels": 4,
    "resolution": 32,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 32,
    "ch_mult": [1, 2],
    "num_res_blocks": 1,
    "attn_resolutions": [],
    "dropout": 0.0,
}


def _randomize(model: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for (
            name,
            p,
        ) in model.named_parameters():  # non-trivial norms and biases: every tensor counts
            base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize(
    "attn_type,groups", [("vanilla", 32), ("vanilla-xformers", 32), ("vanilla", 8)]
)
def test_kl_autoencoder_matches_diffusers(attn_type: str, groups: int) -> None:
    extra = {} if groups == 32 else {"norm_num_groups": groups}  # our extension = diffusers' knob
    ours = AutoencoderKL(
        ddconfig={**DDCONFIG, "attn_type": attn_type, **extra},
        lossconfig={"target": "torch.nn.Identity"},
        embed_dim=4,
    ).eval()
    _randomize(ours)
    ldm_sd = {f"first_stage_model.{k}": v for k, v in ours.state_dict().items()}
    original_config = {
        "model": {
            "params": {"first_stage_config": {"params": {"ddconfig": DDCONFIG, "embed_dim": 4}}}
        }
    }
    cfg = create_vae_diffusers_config_from_ldm(original_config, ldm_sd)
    cfg["norm_num_groups"] = groups
    theirs = diffusers.AutoencoderKL(**cfg).eval()
    converted = convert_ldm_vae_checkpoint(ldm_sd, theirs.config)
    theirs.load_state_dict(converted, strict=True)

    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        post = ours.encode(x)
        ref_post = theirs.encode(x).latent_dist
        z = post.mean
        dec, ref_dec = ours.decode(z), theirs.decode(z).sample
    print(
        "max abs diff mean/logvar/decoded:",
        (post.mean - ref_post.mean).abs().max().item(),
        (post.logvar - ref_post.logvar).abs().max().item(),
        (dec - ref_dec).abs().max().item(),
    )
    assert (post.mean - ref_post.mean).abs().max() <= 1e-4
    assert (post.logvar - ref_post.logvar).abs().max() <= 1e-4
    assert (dec - ref_dec).abs().max() <= 1e-4
    assert dec.abs().max() > 1e-2  # a real signal, not two zero outputs
