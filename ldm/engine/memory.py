"""Activation recomputation switches of the engine: ``gradient_checkpointing``.

    gradient_checkpointing: {unet: true, text_encoder: true}    # or true: both; false / null: none

``unet`` sets ``use_checkpoint`` on every block of the U-Net that has it (ResBlock, AttentionBlock,
BasicTransformerBlock: the CompVis ``use_checkpoint`` U-Net parameter, after construction);
``text_encoder`` turns it on in each text encoder that trains (its own ``set_grad_checkpointing``:
transformers' activation checkpointing for CLIP, open_clip's ``grad_checkpointing`` flag). Frozen
encoders run without gradients and are left alone. Results are unchanged; memory for activations
drops and each step recomputes the forward of those blocks (about a third more time).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from torch import nn

from ldm.modules.attention import BasicTransformerBlock
from ldm.modules.unet_attention import AttentionBlock
from ldm.modules.unet_layers import ResBlock
from ldm.util import ConfigError, did_you_mean

logger = logging.getLogger(__name__)

__all__ = [
    "CHECKPOINTING_PARTS",
    "apply_gradient_checkpointing",
    "checkpointing_options",
    "set_unet_checkpointing",
    "trained_text_encoders",
]

CHECKPOINTING_PARTS = ("unet", "text_encoder")


def checkpointing_options(value: Any) -> dict[str, bool]:
    """``gradient_checkpointing`` -> {part: on}; true means every part."""
    if value is None or value is False:
        return {}
    if value is True:
        return dict.fromkeys(CHECKPOINTING_PARTS, True)
    if not isinstance(value, Mapping):
        raise ConfigError(
            f"gradient_checkpointing={value!r}: expected true / false or a mapping like "
            "{unet: true, text_encoder: true}."
        )
    out = {}
    for key, on in value.items():
        if key not in CHECKPOINTING_PARTS:
            raise ConfigError(
                f"gradient_checkpointing.{key}: unknown part{did_you_mean(str(key), CHECKPOINTING_PARTS)};"
                f" expected {list(CHECKPOINTING_PARTS)}."
            )
        if not isinstance(on, bool):
            raise ConfigError(f"gradient_checkpointing.{key}={on!r}: expected true or false.")
        out[str(key)] = on
    return out


def set_unet_checkpointing(unet: nn.Module, enable: bool = True) -> int:
    """Switch activation recomputation on (or off) in every block of ``unet``; returns how many."""
    n = 0
    for module in unet.modules():
        if isinstance(module, ResBlock | AttentionBlock):
            module.use_checkpoint = enable
            n += 1
        elif isinstance(module, BasicTransformerBlock):
            module.checkpoint = enable
            n += 1
    if hasattr(unet, "use_checkpoint"):
        unet.use_checkpoint = enable
    return n


def trained_text_encoders(engine: Any) -> list[nn.Module]:
    """The engine's text / condition encoders with at least one parameter that trains."""
    candidates: list[nn.Module] = []
    if getattr(engine, "cond_stage_model", None) is not None:
        candidates.append(engine.cond_stage_model)
    embedders = getattr(engine.conditioner, "embedders", None) if engine.conditioner else None
    if isinstance(embedders, nn.ModuleList):
        candidates.extend(embedders)
    unique = list({id(m): m for m in candidates}.values())
    first_stage = getattr(engine, "first_stage_model", None)
    return [
        m for m in unique if m is not first_stage and any(p.requires_grad for p in m.parameters())
    ]


def apply_gradient_checkpointing(engine: Any, options: Mapping[str, bool]) -> None:
    """Apply ``checkpointing_options`` to the engine's U-Net and trained text encoders."""
    if options.get("unet"):
        n = set_unet_checkpointing(engine.model.diffusion_model, True)
        logger.info("gradient_checkpointing.unet: recomputing %d U-Net blocks in backward.", n)
    if options.get("text_encoder"):
        encoders = trained_text_encoders(engine)
        if not encoders:
            logger.warning(
                "gradient_checkpointing.text_encoder: no text encoder trains here (it runs "
                "without gradients); nothing to recompute."
            )
        for encoder in encoders:
            switch = getattr(encoder, "set_grad_checkpointing", None)
            if switch is None:
                logger.warning(
                    "gradient_checkpointing.text_encoder: %s has no set_grad_checkpointing; it "
                    "keeps its activations.",
                    type(encoder).__name__,
                )
                continue
            switch(True)
            logger.info("gradient_checkpointing.text_encoder: on in %s.", type(encoder).__name__)
