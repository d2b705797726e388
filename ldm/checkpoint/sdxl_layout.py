"""SDXL checkpoint layout: which config is SDXL, where its text encoders live in a state dict.

An SDXL config is in the generative-models (sgm) layout: `model.params.network_config` (the U-Net),
`conditioner_config.params.emb_models` (the embedders, in order), `first_stage_config` and
`scale_factor`. Embedder N's weights are `conditioner.embedders.N.*`: a CLIP ViT-L
(`FrozenCLIPEmbedder`) under `conditioner.embedders.N.transformer.`, an OpenCLIP text tower
(`FrozenOpenCLIPEmbedder2`) under `conditioner.embedders.N.model.`. Works on config dicts and key
names only; nothing here builds a model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

EMBEDDERS = "conditioner.embedders."
VECTOR_KEY = "model.diffusion_model.label_emb.0.0.weight"


@dataclass(frozen=True)
class TextEmbedder:
    """One text encoder of an SDXL conditioner: its index, kind and state-dict prefix."""

    index: int
    kind: str  # "clip" (transformers CLIPTextModel) | "openclip" (open_clip text tower)
    params: dict[str, Any]

    @property
    def prefix(self) -> str:
        sub = "transformer." if self.kind == "clip" else "model."
        return f"{EMBEDDERS}{self.index}.{sub}"


def is_sdxl_config(config: dict[str, Any]) -> bool:
    """True for an sgm-layout engine config (network_config + conditioner_config)."""
    params = config.get("model", {}).get("params") or {}
    return "network_config" in params and "conditioner_config" in params


def is_sdxl_state_dict(sd: dict[str, torch.Tensor]) -> bool:
    """True when the keys look like an SDXL file: embedders of a conditioner or a vector embedding."""
    return VECTOR_KEY in sd or any(k.startswith(EMBEDDERS) for k in sd)


def network_params(config: dict[str, Any]) -> dict[str, Any]:
    """The U-Net params (`model.params.network_config.params`) of an SDXL config."""
    return config["model"]["params"]["network_config"].get("params") or {}


def emb_models(config: dict[str, Any]) -> list[dict[str, Any]]:
    """The conditioner's embedder configs, in order."""
    cond = config["model"]["params"]["conditioner_config"].get("params") or {}
    return list(cond.get("emb_models") or [])


def embedder_kind(target: str) -> str | None:
    """'openclip' / 'clip' for a text embedder target (sgm or ours), else None."""
    name = target.rsplit(".", 1)[-1]
    if "OpenCLIP" in name:
        return "openclip"
    if "CLIP" in name:
        return "clip"
    return None


def text_embedders(config: dict[str, Any]) -> list[TextEmbedder]:
    """The CLIP / OpenCLIP text embedders of an SDXL config, with their indices."""
    out = []
    for i, emb in enumerate(emb_models(config)):
        kind = embedder_kind(str(emb.get("target", "")))
        if kind is not None:
            out.append(TextEmbedder(i, kind, dict(emb.get("params") or {})))
    return out


def time_embed_dim(config: dict[str, Any]) -> int:
    """`outdim` of the conditioner's Fourier (ConcatTimestepEmbedderND) embedders; 256 by default."""
    for emb in emb_models(config):
        if "TimestepEmbedder" in str(emb.get("target", "")):
            return int((emb.get("params") or {}).get("outdim", 256))
    return 256
