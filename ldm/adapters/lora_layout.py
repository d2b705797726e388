"""Where a model's LoRA targets live, read from its state-dict keys (no model is built).

U-Net under `model.diffusion_model.`; text encoders under `cond_stage_model.transformer.` (CLIP,
transformers layout), `cond_stage_model.model.` (OpenCLIP, SD v2) or `conditioner.embedders.N.`
(SDXL: `transformer.` CLIP, `model.` OpenCLIP). The SDXL layout (an engine with several embedders
and a vector embedding `label_emb`) decides how kohya names the U-Net: by the original sgm module
paths for SDXL, by the diffusers module paths for SD v1/v2 (sd-scripts trains SD v1/v2 on a
diffusers-named U-Net and SDXL on `sdxl_original_unet.py`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from ldm.checkpoint.keymap_unet import num_res_blocks_ldm
from ldm.checkpoint.sdxl_layout import EMBEDDERS, VECTOR_KEY

UNET = "model.diffusion_model."
_SD_TEXT = re.compile(r"^cond_stage_model\.(transformer|model)\.")
_SDXL_TEXT = re.compile(r"^conditioner\.embedders\.(\d+)\.(transformer|model)\.")


@dataclass(frozen=True)
class TextSlot:
    """One text encoder: our key prefix, its kind, and its prefixes in kohya / diffusers files."""

    prefix: str  # e.g. "cond_stage_model.transformer." / "conditioner.embedders.1.model."
    kind: str  # "clip" (transformers CLIPTextModel keys) | "openclip" (open_clip text tower keys)
    kohya: str  # "lora_te" | "lora_te1" | "lora_te2"
    diffusers: str  # "text_encoder" | "text_encoder_2"
    nested: bool = True  # CLIP keys carry the `text_model.` level


@dataclass(frozen=True)
class Layout:
    """How a model's weights are named: SDXL or SD layout, U-Net block counts, text encoders."""

    sdxl: bool
    num_res_blocks: int
    up_attn: frozenset[int]  # diffusers up levels holding attentions (Upsample index in CompVis)
    texts: tuple[TextSlot, ...]


def _kind(sub: str) -> str:
    return "clip" if sub == "transformer" else "openclip"


def _nested(keys: list[str], prefix: str) -> bool:
    return any(k.startswith(prefix + "text_model.") for k in keys)


def text_slots(keys: list[str], sdxl: bool) -> tuple[TextSlot, ...]:
    """The text encoders of a key set with their file prefixes: one encoder is `lora_te` /
    `text_encoder`; several are numbered (sd-scripts), SDXL's by kind (CLIP-L 1, OpenCLIP bigG 2,
    so the refiner's bigG is `text_encoder_2` as in diffusers)."""
    found = sorted(
        {(f"cond_stage_model.{m.group(1)}.", m.group(1)) for k in keys if (m := _SD_TEXT.match(k))}
    )
    found += sorted(
        {
            (f"{EMBEDDERS}{m.group(1)}.{m.group(2)}.", m.group(2))
            for k in keys
            if (m := _SDXL_TEXT.match(k))
        },
        key=lambda p: int(p[0].split(".")[2]),
    )
    kinds = [_kind(sub) for _, sub in found]
    if len(found) == 1 and not sdxl:
        return (
            TextSlot(found[0][0], kinds[0], "lora_te", "text_encoder", _nested(keys, found[0][0])),
        )
    by_kind = kinds.count("clip") <= 1 and kinds.count("openclip") <= 1 and sdxl
    slots = []
    for n, ((prefix, _), kind) in enumerate(zip(found, kinds), start=1):
        num = (1 if kind == "clip" else 2) if by_kind else n
        diffusers = "text_encoder" if num == 1 else f"text_encoder_{num}"
        slots.append(TextSlot(prefix, kind, f"lora_te{num}", diffusers, _nested(keys, prefix)))
    return tuple(slots)


def is_sdxl_layout(keys: Iterable[str]) -> bool:
    """SDXL layout: conditioner embedders and a vector embedding (`label_emb`)."""
    keys = list(keys)
    return VECTOR_KEY in keys and any(k.startswith(EMBEDDERS) for k in keys)


def layout_of(keys: Iterable[str]) -> Layout:
    """The layout of a model from its state-dict keys."""
    keys = list(keys)
    sdxl = is_sdxl_layout(keys)
    unet = [k[len(UNET) :] for k in keys if k.startswith(UNET)]
    n = num_res_blocks_ldm(unet) if any(k.startswith("input_blocks.") for k in unet) else 1
    up_attn = set()
    for k in unet:
        m = re.match(r"output_blocks\.(\d+)\.1\.(norm|proj_in)\.", k)
        if m:
            up_attn.add(int(m.group(1)) // (n + 1))
    return Layout(sdxl, n, frozenset(up_attn), text_slots(keys, sdxl))
