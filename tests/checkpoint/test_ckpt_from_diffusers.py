"""A folder written by diffusers itself loads through ldm.load_model and computes what diffusers does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("diffusers_native")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=2,
    )
    vae = diffusers.AutoencoderKL(
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        layers_per_block=1,
        sample_size=16,
    )
    text = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(
            vocab_size=49408,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            hidden_act="quick_gelu",
        )
    )
    with (
        torch.no_grad()
    ):  # diffusers zero-initialises nothing here, but make outputs non-trivial anyway
        for p in list(unet.parameters()) + list(vae.parameters()):
            p.add_(torch.randn_like(p) * 0.02)
    sched = diffusers.DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="v_prediction",
    )
    for name, obj in (("unet", unet), ("vae", vae), ("text_encoder", text), ("scheduler", sched)):
        obj.save_pretrained(root / name)
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return root, {"unet": unet.eval(), "vae": vae.eval(), "text": text.eval(), "sched": sched}


def test_load_model_reads_a_native_diffusers_folder(folder) -> None:
    from ldm import load_model

    root, ref = folder
    model = load_model(root)
    assert model.parameterization == "v"
    g = torch.Generator().manual_seed(2)
    x, t, ctx = (
        torch.randn(2, 4, 8, 8, generator=g),
        torch.tensor([1, 999]),
        torch.randn(2, 77, 32, generator=g),
    )
    with torch.no_grad():
        torch.testing.assert_close(
            model.model.diffusion_model(x, t, context=ctx),
            ref["unet"](x, t, ctx).sample,
            rtol=1e-4,
            atol=1e-5,
        )
        torch.testing.assert_close(
            model.first_stage_model.decode(x[:1]),
            ref["vae"].decode(x[:1]).sample,
            rtol=1e-4,
            atol=1e-5,
        )
        ids = torch.randint(0, 49408, (1, 77), generator=g)
        torch.testing.assert_close(
            model.cond_stage_model.transformer(ids).last_hidden_state,
            ref["text"](ids).last_hidden_state,
        )
    torch.testing.assert_close(
        model.alphas_cumprod.float(), ref["sched"].alphas_cumprod.float(), rtol=1e-5, atol=1e-6
    )
    assert model.scale_factor == pytest.approx(ref["vae"].config.scaling_factor)
