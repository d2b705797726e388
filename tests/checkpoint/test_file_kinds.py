"""A partial file passed as the model (LoRA, embedding, VAE, ControlNet, a bare diffusers U-Net)
is named with the flag that takes it, through the loader's error."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import ldm
from ldm.checkpoint.detect import DetectionError
from ldm.checkpoint.file_kinds import not_a_model_hint

W = torch.zeros(2, 2)
KINDS = {
    "kohya LoRA": (
        {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": W},
        "LoRA file",
    ),
    "peft LoRA": ({"unet.conv_in.lora_A.weight": W}, "--lora FILE"),
    "A1111 embedding": ({"string_to_param.*": W}, "--embedding FILE"),
    "SDXL embedding": ({"clip_l": W, "clip_g": W}, "textual-inversion"),
    "VAE": (
        {"encoder.conv_in.weight": W, "decoder.conv_out.weight": W, "quant_conv.weight": W},
        "autoencoder (VAE) alone",
    ),
    "ControlNet": ({"control_model.input_blocks.0.0.weight": W}, "ControlNet is not supported"),
    "diffusers U-Net": (
        {"conv_in.weight": W, "time_embedding.linear_1.weight": W, "down_blocks.0.x": W},
        "whole diffusers folder",
    ),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_partial_files_are_named(kind: str, tmp_path: Path) -> None:
    keys, expected = KINDS[kind]
    assert expected in (not_a_model_hint(keys) or "")
    path = tmp_path / "file.safetensors"
    save_file({k: v.clone() for k, v in keys.items()}, str(path))
    with pytest.raises(DetectionError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        ldm.load_model(path)


def test_unknown_keys_keep_the_config_advice() -> None:
    assert not_a_model_hint({"some.weight": W}) is None
