"""What a file that is not a whole model holds (a LoRA, an embedding, a VAE, a ControlNet, a
bare diffusers U-Net), read off its keys, and what to do with it instead: for the error a
model loader gives when such a file is passed as the checkpoint; `lora_key` and `embedding_key`
tell a LoRA from a textual-inversion embedding for the loaders of those (a file given to the other
flag)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["embedding_key", "lora_key", "not_a_model_hint"]

# kohya module prefixes (always followed by `.lora_down.weight` / `.alpha`: a key with a dot)
_LORA_PREFIXES = ("lora_unet_", "lora_te")
# kohya, diffusers/peft and the older diffusers attention-processor names
_LORA_MARKS = (".lora_down.", ".lora_up.", ".lora_A.", ".lora_B.", "lora.down.", "lora.up.")
_LORA_MARKS += (".lora_linear_layer.",)
_EMBEDDING_MARKS = ("string_to_param", "emb_params", "clip_l", "clip_g")
_FEW_TOKENS = 16  # a diffusers learned_embeds file holds one or a few tokens
_MIN_WIDTH = 16  # of a text encoder's token vectors (768 and up in real models)


def lora_key(keys: Iterable[str]) -> str | None:
    """The first key only a LoRA file has (kohya `lora_unet_*` / `lora_te*`, `.lora_down.`,
    `.lora_up.`, `.alpha`; diffusers/peft `.lora_A.` / `.lora_B.`, `lora.down.` / `lora.up.`),
    or None."""
    for k in map(str, keys):
        if "." in k and (k.startswith(_LORA_PREFIXES) or k.endswith(".alpha")):
            return k
        if any(m in k for m in _LORA_MARKS):
            return k
    return None


def embedding_key(state: Mapping[str, Any] | Iterable[str]) -> str | None:
    """The key that makes a file a textual-inversion embedding, or None: A1111's
    `string_to_param` / `emb_params` / SDXL `clip_l` / `clip_g` at the top level; given a mapping
    to tensors (or shapes), also a diffusers `learned_embeds` file: a few dotless token names,
    each a [width] or [n, width] tensor (a plausible text width)."""
    keys = [str(k) for k in state]
    for k in keys:
        if k.split(".")[0] in _EMBEDDING_MARKS:
            return k
    if not isinstance(state, Mapping) or not 0 < len(keys) <= _FEW_TOKENS:
        return None
    shapes = [getattr(v, "shape", v) for v in state.values()]
    vectors = [s for s in shapes if isinstance(s, tuple) and len(s) in (1, 2)]
    if all("." not in k for k in keys) and len(vectors) == len(keys):
        if all(s[-1] >= _MIN_WIDTH for s in vectors):
            return keys[0]
    return None


def not_a_model_hint(keys: Iterable[str]) -> str | None:
    """A sentence naming what the keys are and the flag that takes such a file, or None when
    they look like no known partial file."""
    keys = list(keys)
    if not keys:
        return "The file holds no weights."
    tops = {k.split(".")[0] for k in keys}
    if lora_key(keys) is not None:
        return (
            "It is a LoRA file (keys such as lora_unet_* / *.lora_down.*), not a model: apply it "
            "to the base model it was trained on, --ckpt BASE --lora FILE[:SCALE] "
            "(generate(loras=...))."
        )
    if embedding_key(keys) is not None:
        return (
            "It is a textual-inversion embedding, not a model: load it with --embedding FILE "
            "next to --ckpt BASE (generate(embeddings=...))."
        )
    if "control_model" in tops or "controlnet_cond_embedding" in tops:
        return (
            "It is a ControlNet (control_model.* / controlnet_cond_embedding.*); ControlNet is not "
            "supported here, and it is not a Stable Diffusion model checkpoint."
        )
    if {"encoder", "decoder"} <= tops and tops <= {
        "encoder",
        "decoder",
        "quant_conv",
        "post_quant_conv",
        "loss",
    }:
        return (
            "It is an autoencoder (VAE) alone, not a whole model: use it as a model's first stage "
            "(first_stage_config.params.ckpt_path in a config), or give a whole model checkpoint."
        )
    if {"conv_in", "time_embedding", "down_blocks"} <= tops:
        return (
            "It is a diffusers U-Net alone (conv_in / down_blocks / ...), not a whole model: give "
            "the whole diffusers folder (model_index.json, unet/, vae/, text_encoder/, scheduler/)."
        )
    return None
