"""A text-encoder LoRA written by diffusers' `save_lora_weights` from a peft-injected
transformers `CLIPTextModel` (transformers 5 names it `text_encoder.encoder.layers...`, without
the `text_model.` level) merges into our text encoder to what peft computes."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from tiny_models import build_tiny, tiny_ldm_config

from ldm.adapters.sampling import adapters_applied

peft = pytest.importorskip("peft")
diffusers = pytest.importorskip("diffusers")


def test_peft_text_encoder_lora_matches_peft(tmp_path: Path) -> None:
    model = build_tiny(tiny_ldm_config())
    text = copy.deepcopy(model.cond_stage_model.transformer).eval()
    config = peft.LoraConfig(
        r=2,
        lora_alpha=4,
        init_lora_weights="gaussian",
        target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1"],
    )
    peft.inject_adapter_in_model(config, text)
    torch.manual_seed(1)
    layers = peft.get_peft_model_state_dict(text)
    for key, value in layers.items():
        if "lora_B" in key:
            value.normal_(0, 0.1)
    peft.set_peft_model_state_dict(text, layers)
    diffusers.StableDiffusionPipeline.save_lora_weights(
        tmp_path,
        weight_name="lora.safetensors",
        text_encoder_lora_layers=layers,
        text_encoder_lora_adapter_metadata=config.to_dict(),
    )
    ids = torch.tensor([[49406, 320, 1125, 539, 49407] + [49407] * 72])
    with torch.no_grad():
        expected = text(input_ids=ids).last_hidden_state
        plain = model.cond_stage_model.transformer(input_ids=ids).last_hidden_state
        with adapters_applied(model, loras=[str(tmp_path / "lora.safetensors")]):
            merged = model.cond_stage_model.transformer(input_ids=ids).last_hidden_state
        after = model.cond_stage_model.transformer(input_ids=ids).last_hidden_state
    assert (expected - plain).abs().max() > 1e-2  # the LoRA changes the output
    torch.testing.assert_close(merged, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(after, plain)
