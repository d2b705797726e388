"""Training with long captions: the engine's conditioner encodes a batch of captions of different
lengths in chunks (padded to the batch's longest) and the loss reaches every chunk's tokens."""

from __future__ import annotations

import pytest
import torch

from ldm.util import instantiate_from_config

pytestmark = pytest.mark.usefixtures("one_thread")

CAPTIONS = ["a cube", "a small red cube " * 4 + "next to a large blue sphere on a wooden table"]


def engine_config() -> dict:
    """Pixel-space toy engine with the trainable CLIPTextEncoder (16 positions: windows of 14)."""
    return {
        "target": "ldm.engine.engine.DiffusionEngine",
        "params": {
            "network_config": {
                "target": "toy_denoiser.ToyDenoiser",
                "params": {"in_channels": 3, "image_size": 4, "width": 32, "context_dim": 16},
            },
            "denoiser_config": {"parameterization": "v", "timesteps": 100},
            "conditioner_config": {
                "embedders": [
                    {
                        "target": "ldm.modules.encoders.text_transformer.CLIPTextEncoder",
                        "params": {"width": 16, "layers": 1, "heads": 2, "max_length": 16},
                        "input_key": "caption",
                        "is_trainable": True,
                    }
                ]
            },
            "conditioning_key": "crossattn",
            "image_size": 4,
            "channels": 3,
            "use_ema": False,
        },
    }


def test_training_batch_of_captions_of_different_lengths():
    torch.manual_seed(0)
    model = instantiate_from_config(engine_config())
    encoder = model.cond_stage_model
    ids = encoder.tokenizer.encode(CAPTIONS[1])
    assert 14 < len(ids) <= 28  # two windows
    with torch.no_grad():
        c = model.conditioner.encode_raw(list(CAPTIONS))
        long, short, empty = encoder([CAPTIONS[1]]), encoder([CAPTIONS[0]]), encoder([""])
    assert c.shape == (2, 32, 16)
    assert torch.equal(c[1:], long)
    assert torch.equal(c[0, :16], short[0]) and torch.equal(c[0, 16:], empty[0])

    model.train()
    batch = {"image": torch.rand(2, 4, 4, 3) * 2 - 1, "caption": list(CAPTIONS)}
    model.training_step(batch, 0).backward()
    grad = encoder.transformer.get_input_embeddings().weight.grad
    only_second_window = set(ids[14:]) - set(ids[:14]) - set(encoder.tokenizer.encode(CAPTIONS[0]))
    assert only_second_window and all(grad[i].abs().sum() > 0 for i in only_second_window)
