"""Reading and writing the parts of a diffusers folder: component weights + config, our extras.

`ldm_extras.safetensors` holds the source keys diffusers has no slot for (its metadata: layout facts
such as whether CLIP keys had the `text_model.` level), `ldm_config.json` our config; diffusers
ignores both, we read them back for a bit-exact round trip.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ldm.checkpoint.prune import to_saveable
from ldm.checkpoint.safe_load import read_checkpoint

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
EXTRAS_FILE = "ldm_extras.safetensors"
CONFIG_FILE = "ldm_config.json"
_TEXT_FILES = ("model.safetensors", "pytorch_model.bin")
_DIFFUSERS_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
WEIGHT_FILES = {
    "unet": _DIFFUSERS_FILES,
    "vae": _DIFFUSERS_FILES,
    "text_encoder": _TEXT_FILES,
    "text_encoder_2": _TEXT_FILES,
}


def save_component(
    folder: Path, name: str, sd: dict[str, torch.Tensor], config: dict[str, Any]
) -> None:
    """`<folder>/<name>/config.json` and its safetensors weights."""
    from safetensors.torch import save_file

    sub = folder / name
    sub.mkdir(parents=True, exist_ok=True)
    (sub / "config.json").write_text(json.dumps(config, indent=2))
    save_file(to_saveable(sd), str(sub / WEIGHT_FILES[name][0]), metadata={"format": "pt"})


def read_component(folder: Path, name: str) -> dict[str, torch.Tensor] | None:
    """The weights of `<folder>/<name>/` (safetensors, else .bin), or None when absent."""
    for fname in WEIGHT_FILES[name]:
        path = folder / name / fname
        if path.is_file():
            return read_checkpoint(path).state_dict
    return None


def split_unet_vae(
    sd: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(U-Net keys, autoencoder keys without its training loss), prefixes removed."""
    unet = {k[len(UNET_PREFIX) :]: v for k, v in sd.items() if k.startswith(UNET_PREFIX)}
    vae = {
        k[len(VAE_PREFIX) :]: v
        for k, v in sd.items()
        if k.startswith(VAE_PREFIX) and not k.startswith(VAE_PREFIX + "loss.")
    }
    return unet, vae


def write_extras(folder: Path, extras: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    """`ldm_extras.safetensors` with the layout facts as metadata."""
    from safetensors.torch import save_file

    save_file(to_saveable(extras), str(folder / EXTRAS_FILE), metadata={"format": "pt", **meta})


def read_extras(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(extras, metadata) of a folder we wrote; empty for a foreign folder."""
    path = folder / EXTRAS_FILE
    if not path.is_file():
        return {}, {}
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def read_json(path: Path) -> dict[str, Any]:
    """A JSON file as a dict; {} when absent."""
    return json.loads(path.read_text()) if path.is_file() else {}
