"""What a model is and what a LoRA file was made for: SD v1, SD v2, SDXL (base / refiner) or other.

Facts (shared/reference/README.md, sd-scripts `library/sai_model_spec.py`): the U-Net's
cross-attention `attn2.to_k` takes the text width: 768 (SD v1, CLIP ViT-L), 1024 (SD v2, OpenCLIP
ViT-H), 2048 (SDXL base: CLIP-L + OpenCLIP bigG), 1280 (SDXL refiner: bigG). kohya files name SDXL's
two text encoders `lora_te1_` / `lora_te2_` (diffusers: `text_encoder_2`), and sd-scripts writes
`ss_base_model_version` (`sd_v1`, `sd_v2`, `sdxl_base_v1-0`) and `modelspec.architecture`
(`stable-diffusion-v1/lora`, `stable-diffusion-v2-512/lora`, `stable-diffusion-xl-v1-base/lora`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ldm.adapters.lora_layout import UNET, is_sdxl_layout
from ldm.adapters.lora_weights import LoraModule
from ldm.checkpoint.detect import context_dims

SD_V1, SD_V2, SDXL, SDXL_REFINER = "SD v1", "SD v2", "SDXL", "SDXL refiner"
WIDTHS = {768: SD_V1, 1024: SD_V2, 2048: SDXL, 1280: SDXL_REFINER}
DETAILS = {
    SD_V1: "one CLIP text encoder, cross-attention width 768",
    SD_V2: "one OpenCLIP text encoder, cross-attention width 1024",
    SDXL: "two text encoders, cross-attention width 2048",
    SDXL_REFINER: "one OpenCLIP text encoder, cross-attention width 1280",
}
# what sd-scripts writes for each family (ss_base_model_version, modelspec.architecture)
SS_VERSION = {SD_V1: "sd_v1", SD_V2: "sd_v2", SDXL: "sdxl_base_v1-0"}
MODELSPEC = {
    SD_V1: "stable-diffusion-v1/lora",
    SD_V2: "stable-diffusion-v2-512/lora",
    SDXL: "stable-diffusion-xl-v1-base/lora",
    SDXL_REFINER: "stable-diffusion-xl-v1-refiner/lora",
}


@dataclass(frozen=True)
class Family:
    """A model family (None: not one of SD v1 / v2 / SDXL) and what tells it."""

    name: str | None
    detail: str

    def __str__(self) -> str:
        return f"{self.name or 'a custom model'} ({self.detail})"


def _known(name: str) -> Family:
    return Family(name, DETAILS[name])


def model_family(shapes: Mapping[str, torch.Size]) -> Family:
    """The family of a model from its state-dict shapes (layout and cross-attention width)."""
    sdxl = is_sdxl_layout(shapes)
    attn = {k: torch.empty(tuple(v), device="meta") for k, v in shapes.items() if "attn2.to_k" in k}
    widths = context_dims(attn)
    name = WIDTHS.get(widths[0]) if len(widths) == 1 else None
    if name is not None and (name in (SDXL, SDXL_REFINER)) == sdxl:
        return _known(name)
    layout = "SDXL layout" if sdxl else "SD layout"
    width = ", ".join(map(str, widths)) or "none"
    if not any(k.startswith(UNET) for k in shapes):
        return Family(None, "no U-Net under model.diffusion_model.")
    return Family(None, f"{layout}, cross-attention width {width}")


def _from_metadata(metadata: Mapping[str, str]) -> str | None:
    version = metadata.get("ss_base_model_version", "").lower()
    arch = metadata.get("modelspec.architecture", "").lower()
    if version.startswith("sdxl") or arch.startswith("stable-diffusion-xl"):
        return SDXL_REFINER if "refiner" in version + arch else SDXL
    if version.startswith("sd_v2") or arch.startswith("stable-diffusion-v2"):
        return SD_V2
    if version.startswith("sd_v1") or arch.startswith("stable-diffusion-v1"):
        return SD_V1
    if metadata.get("ss_v2", "").lower() == "true":
        return SD_V2
    return None


def _attn2_width(named: Mapping[str, LoraModule]) -> int | None:
    for name, m in named.items():
        flat = name.replace(".", "_")
        if flat.endswith("attn2_to_k"):
            return int(m.down.shape[1])
    return None


def file_family(named: Mapping[str, LoraModule], metadata: Mapping[str, str]) -> Family:
    """What a LoRA file (names as in the file) was made for: its cross-attention width, else its
    text encoder names (two = SDXL), else its metadata."""
    width = _attn2_width(named)
    if width is not None:
        name = WIDTHS.get(width)
        return _known(name) if name else Family(None, f"cross-attention width {width}")
    name = _from_metadata(metadata)
    if any(n.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.")) for n in named):
        return _known(name if name in (SDXL, SDXL_REFINER) else SDXL)  # metadata: base or refiner
    if name is not None:
        return _known(name)
    return Family(None, "no cross-attention key or base-model metadata")
