"""Reading and writing the parts of a diffusers folder: component weights + config, our extras.

`ldm_extras.safetensors` holds the source keys diffusers has no slot for (its metadata: layout facts
such as whether CLIP keys had the `text_model.` level), `ldm_config.json` our config; diffusers
ignores both, we read them back for a bit-exact round trip.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import torch

from ldm.checkpoint.integrity import CorruptCheckpointError
from ldm.checkpoint.prune import to_saveable
from ldm.checkpoint.safe_load import read_checkpoint

logger = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
EXTRAS_FILE = "ldm_extras.safetensors"
CONFIG_FILE = "ldm_config.json"
#: the weight file's stem per component (diffusers: `diffusion_pytorch_model`, transformers: `model`)
STEMS = {
    "unet": "diffusion_pytorch_model",
    "vae": "diffusion_pytorch_model",
    "text_encoder": "model",
    "text_encoder_2": "model",
}
_EXTS = (".safetensors", ".bin")
#: how many of a weightless component folder's files an error names
_LISTED = 8


def save_component(
    folder: Path, name: str, sd: dict[str, torch.Tensor], config: dict[str, Any]
) -> None:
    """`<folder>/<name>/config.json` and its safetensors weights."""
    from safetensors.torch import save_file

    sub = folder / name
    sub.mkdir(parents=True, exist_ok=True)
    (sub / "config.json").write_text(json.dumps(config, indent=2))
    save_file(to_saveable(sd), str(sub / f"{STEMS[name]}.safetensors"), metadata={"format": "pt"})


def _variants(sub: Path, stem: str) -> list[str]:
    """Variant names present (`<stem>.fp16.safetensors`, `<stem>.safetensors.index.fp16.json`),
    fp16 first, then by name."""
    single = re.compile(rf"^{re.escape(stem)}\.(\w+)\.(?:safetensors|bin)$")
    index = re.compile(rf"^{re.escape(stem)}\.(?:safetensors|bin)\.index\.(\w+)\.json$")
    found = set()
    for f in sub.iterdir():
        match = single.match(f.name) or index.match(f.name)
        if match:
            found.add(match.group(1))
    return sorted(found, key=lambda v: (v != "fp16", v))


def weight_files(sub: Path, stem: str) -> tuple[list[Path], str]:
    """(files, what they are) holding a component's weights, in diffusers' order when no variant
    is asked for: `<stem>.safetensors`, its shards (`<stem>.safetensors.index.json`), the same as
    `.bin`; then variants (`<stem>.fp16.safetensors`, sharded `<stem>.safetensors.index.fp16.json`),
    fp16 first. ([], "") when there are none."""
    for variant in [None, *_variants(sub, stem)]:
        for ext in _EXTS:
            name = f"{stem}{ext}" if variant is None else f"{stem}.{variant}{ext}"
            if (sub / name).is_file():
                return [sub / name], name
            index = sub / (
                f"{stem}{ext}.index.json"
                if variant is None
                else f"{stem}{ext}.index.{variant}.json"
            )
            if index.is_file():
                return _shards(index), f"{index.name} (sharded)"
    return [], ""


def _shards(index: Path) -> list[Path]:
    """The shard files an `*.index.json` maps weights to, each checked to exist."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise CorruptCheckpointError(
            f"{index}: not a shard index (a JSON object with a `weight_map` of key -> file "
            f"expected): {err}"
        ) from err
    missing = [n for n in names if not (index.parent / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{index} maps weights to {len(names)} shard file(s), but {len(missing)} are missing "
            f"from {index.parent}: {', '.join(missing[:_LISTED])}. Download the whole folder again."
        )
    return [index.parent / n for n in names]


def read_component(
    folder: Path, name: str, *, unsafe: bool = False
) -> dict[str, torch.Tensor] | None:
    """The weights of `<folder>/<name>/` (see ``weight_files``: safetensors, .bin, shards,
    variants), or None when the folder has no such subfolder. A subfolder without weights raises
    FileNotFoundError naming the files it does hold."""
    sub = folder / name
    if not sub.is_dir():
        return None
    files, what = weight_files(sub, STEMS[name])
    if not files:
        held = sorted(f.name for f in sub.iterdir())
        stem = STEMS[name]
        raise FileNotFoundError(
            f"{sub}: no weights: expected {stem}.safetensors (or .bin, a variant such as "
            f"{stem}.fp16.safetensors, or shards with {stem}.safetensors.index.json); the folder "
            f"holds {', '.join(held[:_LISTED]) or 'nothing'}"
            f"{' ...' if len(held) > _LISTED else ''}. Download the component's weights again."
        )
    if what != f"{STEMS[name]}.safetensors":
        logger.info("%s: reading %s", sub, what)
    state: dict[str, torch.Tensor] = {}
    for path in files:
        state.update(read_checkpoint(path, unsafe=unsafe).state_dict)
    return state


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
