"""Names of a model's LoRA targets in files: kohya (`lora_unet_...`, `lora_te_...`) and diffusers
(`unet.<module path>`, `text_encoder.<module path>`), as a function of the model's key set.

U-Net module paths come from the checkpoint key map (`keymap_unet`), text encoder paths from the
transformers CLIP names (`keymap_text`; OpenCLIP q/k/v are row thirds of `attn.in_proj_weight`).
kohya names are the module path with dots turned into underscores (sd-scripts `networks/lora.py`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ldm.adapters.lora_layout import UNET, Layout, TextSlot
from ldm.checkpoint.keymap_text import HF_PREFIX, openclip_to_hf
from ldm.checkpoint.keymap_unet import _unet_key_to_diffusers

KOHYA_UNET = "lora_unet"
DIFFUSERS_UNET = "unet"
_QKV_ROWS = {"q_proj": 0, "k_proj": 1, "v_proj": 2}


@dataclass(frozen=True)
class Target:
    """A weight a LoRA module updates: its engine key and, for packed weights, its row range."""

    key: str
    rows: tuple[int, int] | None = None


@dataclass(frozen=True)
class Names:
    """A target's names: kohya (primary first, then accepted aliases) and diffusers."""

    kohya: tuple[str, ...]
    diffusers: str


def kohya_name(prefix: str, module_path: str) -> str:
    """`lora_unet` + `down_blocks.0.attentions.0.proj_in` -> `lora_unet_down_blocks_0_attentions_0_proj_in`."""
    return f"{prefix}_{module_path.replace('.', '_')}"


def _is_target(key: str, shape: torch.Size) -> bool:
    return len(shape) >= 2 and key.endswith("weight")


def _unet_names(rest: str, layout: Layout) -> Names | None:
    module = rest[: -len(".weight")] if rest.endswith(".weight") else None
    if module is None:
        return None
    try:
        diff = _unet_key_to_diffusers(rest, layout.num_res_blocks, layout.sdxl)[: -len(".weight")]
    except KeyError:
        return None
    sgm, dif = kohya_name(KOHYA_UNET, module), kohya_name(KOHYA_UNET, diff)
    kohya = (sgm, dif) if layout.sdxl else (dif, sgm)
    return Names(tuple(dict.fromkeys(kohya)), f"{DIFFUSERS_UNET}.{diff}")


def _hf_module(hf_key: str) -> str:
    rest = hf_key[len(HF_PREFIX) :] if hf_key.startswith(HF_PREFIX) else hf_key
    return HF_PREFIX + rest.rsplit(".", 1)[0]


def _text_names(key: str, shape: torch.Size, slot: TextSlot) -> dict[Target, Names]:
    if slot.kind == "clip":
        rest = key[len(slot.prefix) :]
        hf = {(rest if rest.startswith(HF_PREFIX) else HF_PREFIX + rest): None}
    elif ".transformer.resblocks." in key:
        hf, _ = openclip_to_hf({key: torch.empty(shape, device="meta")}, prefix=slot.prefix)
    else:
        return {}
    out = {}
    for hf_key in hf:
        module = _hf_module(hf_key)
        rows = None
        third = _QKV_ROWS.get(module.rsplit(".", 1)[-1]) if slot.kind == "openclip" else None
        if third is not None:
            d = shape[0] // 3
            rows = (third * d, (third + 1) * d)
        names = Names((kohya_name(slot.kohya, module),), f"{slot.diffusers}.{module}")
        out[Target(key, rows)] = names
    return out


def target_names(layout: Layout, shapes: Mapping[str, torch.Size]) -> dict[Target, Names]:
    """Every weight of the model a LoRA may update (2-D or conv, U-Net and text encoders), named."""
    out: dict[Target, Names] = {}
    for key, shape in shapes.items():
        if not _is_target(key, torch.Size(shape)):
            continue
        if key.startswith(UNET):
            names = _unet_names(key[len(UNET) :], layout)
            if names is not None:
                out[Target(key)] = names
            continue
        for slot in layout.texts:
            if key.startswith(slot.prefix):
                out.update(_text_names(key, torch.Size(shape), slot))
                break
    return out


def by_kohya(names: dict[Target, Names]) -> dict[str, Target]:
    """kohya name (and alias) -> target."""
    return {n: t for t, ns in names.items() for n in ns.kohya}


def by_diffusers(names: dict[Target, Names]) -> dict[str, Target]:
    """diffusers module name (`unet.down_blocks...`) -> target."""
    return {ns.diffusers: t for t, ns in names.items()}
