"""A folder written by diffusers itself loads through ldm.load_model and computes what diffusers does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_diffusers import tiny_sd_components

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("diffusers_native")
    unet, vae, text = tiny_sd_components()
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
