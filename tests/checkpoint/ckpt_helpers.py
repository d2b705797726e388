"""Fabricated checkpoints for the checkpoint tests: SD key layouts from the reference lists."""

from __future__ import annotations

from pathlib import Path

import torch

DATA = Path(__file__).parents[1] / "data"  # the shared reference key lists

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


def tiny_ldm_config(text_model_level: bool = True) -> dict:
    """A tiny SD-v1-shaped LatentDiffusion config (CLIP text encoder built from a small config)."""
    return {
        "model": {
            "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
            "params": {
                "linear_start": 0.00085,
                "linear_end": 0.012,
                "timesteps": 1000,
                "first_stage_key": "jpg",
                "cond_stage_key": "txt",
                "image_size": 8,
                "channels": 4,
                "cond_stage_trainable": False,
                "conditioning_key": "crossattn",
                "scale_factor": 0.18215,
                "use_ema": False,
                "unet_config": {"target": "ldm.modules.unet.UNetModel", "params": TINY_UNET},
                "first_stage_config": {
                    "target": "ldm.models.autoencoder.AutoencoderKL",
                    "params": {
                        "embed_dim": 4,
                        "ddconfig": TINY_DDCONFIG,
                        "lossconfig": {"target": "torch.nn.Identity"},
                    },
                },
                "cond_stage_config": {
                    "target": "ldm.modules.encoders.clip.FrozenCLIPEmbedder",
                    "params": {
                        "config": {
                            "vocab_size": 49408,
                            "hidden_size": 32,
                            "intermediate_size": 64,
                            "num_hidden_layers": 2,
                            "num_attention_heads": 4,
                            "max_position_embeddings": 77,
                        }
                    },
                },
            },
        }
    }


def build_tiny(config: dict, seed: int = 0) -> torch.nn.Module:
    """Instantiate a config with random (non-zero) weights."""
    from ldm.util import instantiate_from_config

    torch.manual_seed(seed)
    model = instantiate_from_config(config["model"]).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    if hasattr(
        model.cond_stage_model, "mark_weights_loaded"
    ):  # the source model: its weights are final
        model.cond_stage_model.mark_weights_loaded()
    return model


def tiny_inpaint_config() -> dict:
    """tiny_ldm_config as an inpainting model: 9 U-Net input channels, hybrid conditioning."""
    cfg = tiny_ldm_config()
    params = cfg["model"]["params"]
    cfg["model"]["target"] = "ldm.models.diffusion.ddpm.LatentInpaintDiffusion"
    params["conditioning_key"] = "hybrid"
    params["unet_config"] = {
        **params["unet_config"],
        "params": {**params["unet_config"]["params"], "in_channels": 9},
    }
    return cfg
