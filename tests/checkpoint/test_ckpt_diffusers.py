"""Our checkpoint -> diffusers folder -> our checkpoint is bit-exact; diffusers' models compute ours."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from tiny_models import TINY_DDCONFIG, TINY_UNET

from ldm.checkpoint.convert import diffusers_to_checkpoint, from_diffusers, to_diffusers
from ldm.checkpoint.ema import make_ema_entries
from ldm.checkpoint.safe_load import LoadedCheckpoint, read_checkpoint

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

CONFIG = {
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
            "conditioning_key": "crossattn",
            "scale_factor": 0.18215,
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
                "params": {"heads": 4},
            },
        },
    }
}


@pytest.fixture(scope="module")
def parts():
    from ldm.models.autoencoder import AutoencoderKL
    from ldm.modules.unet import UNetModel

    torch.manual_seed(0)
    unet = UNetModel(**TINY_UNET).eval()
    vae = AutoencoderKL(
        ddconfig=TINY_DDCONFIG, lossconfig={"target": "torch.nn.Identity"}, embed_dim=4
    ).eval()
    with torch.no_grad():  # zero-initialised output convs would hide mapping mistakes
        for p in list(unet.parameters()) + list(vae.parameters()):
            p.add_(torch.randn_like(p) * 0.02)
    clip_cfg = transformers.CLIPTextConfig(
        vocab_size=49408,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
    )
    text = transformers.CLIPTextModel(clip_cfg).eval()
    sd = {f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()}
    sd.update({f"first_stage_model.{k}": v for k, v in vae.state_dict().items()})
    # SD v1 layout: `text_model.` level and a position_ids buffer, as in the release files
    sd.update(
        {f"cond_stage_model.transformer.text_model.{k}": v for k, v in text.state_dict().items()}
    )
    sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    sd["betas"] = torch.linspace(1e-4, 2e-2, 1000, dtype=torch.float64).float()
    sd["first_stage_model.loss.logvar"] = torch.zeros(())
    sd.update(make_ema_entries(sd))
    return unet, vae, text, sd


def test_round_trip_is_bit_exact(parts, tmp_path: Path) -> None:
    *_, sd = parts
    folder = to_diffusers(
        LoadedCheckpoint(tmp_path / "x.ckpt", sd, {"ldm_config": CONFIG}), tmp_path / "pipe"
    )
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (folder / sub).is_dir()
    back, cfg = from_diffusers(folder)
    assert cfg == CONFIG
    assert set(back) == set(sd)
    for k, v in sd.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    out = diffusers_to_checkpoint(folder, tmp_path / "back.safetensors")
    ck = read_checkpoint(out)
    assert ck.embedded_config == CONFIG and all(
        torch.equal(ck.state_dict[k], v) for k, v in sd.items()
    )


def test_diffusers_models_match_ours(parts, tmp_path: Path) -> None:
    unet, vae, text, sd = parts
    folder = to_diffusers(
        LoadedCheckpoint(tmp_path / "x.ckpt", sd, {"ldm_config": CONFIG}), tmp_path / "pipe"
    )
    g = torch.Generator().manual_seed(1)
    x, t, ctx = (
        torch.randn(2, 4, 8, 8, generator=g),
        torch.tensor([10, 900]),
        torch.randn(2, 77, 32, generator=g),
    )
    d_unet = diffusers.UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    with torch.no_grad():
        ours, theirs = unet(x, t, context=ctx), d_unet(x, t, encoder_hidden_states=ctx).sample
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)
    d_vae = diffusers.AutoencoderKL.from_pretrained(folder / "vae").eval()
    img = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(
            d_vae.decode(x[:1]).sample, vae.decode(x[:1]), rtol=1e-4, atol=1e-5
        )
        torch.testing.assert_close(
            d_vae.encode(img).latent_dist.mean, vae.encode(img).mean, rtol=1e-4, atol=1e-5
        )
    d_text = transformers.CLIPTextModel.from_pretrained(folder / "text_encoder").eval()
    ids = torch.randint(0, 49408, (1, 77), generator=g)
    with torch.no_grad():
        torch.testing.assert_close(d_text(ids).last_hidden_state, text(ids).last_hidden_state)
    assert d_vae.config.scaling_factor == pytest.approx(0.18215)


def test_diffusers_pipeline_loads_folder(parts, tmp_path: Path) -> None:
    *_, sd = parts
    folder = to_diffusers(
        LoadedCheckpoint(tmp_path / "x.ckpt", sd, {"ldm_config": copy.deepcopy(CONFIG)}),
        tmp_path / "pipe",
    )
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    assert pipe.tokenizer("a photo").input_ids[:1] == [49406]
    assert pipe.tokenizer.pad_token_id == 49407
    assert pipe.scheduler.config.prediction_type == "epsilon"
