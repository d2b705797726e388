"""What a file that is not a whole model holds (a LoRA, an embedding, a VAE, a ControlNet, a
bare diffusers U-Net), read off its keys, and what to do with it instead: for the error a
model loader gives when such a file is passed as the checkpoint."""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["not_a_model_hint"]

_LORA_MARKS = (".lora_down.", ".lora_up.", ".lora_A.", ".lora_B.", "lora_unet_", "lora_te")
_EMBEDDING_KEYS = {"string_to_param", "string_to_token", "emb_params", "clip_l", "clip_g"}


def not_a_model_hint(keys: Iterable[str]) -> str | None:
    """A sentence naming what the keys are and the flag that takes such a file, or None when
    they look like no known partial file."""
    keys = list(keys)
    if not keys:
        return "The file holds no weights."
    tops = {k.split(".")[0] for k in keys}
    if any(any(m in k for m in _LORA_MARKS) for k in keys):
        return (
            "It is a LoRA file (keys such as lora_unet_* / *.lora_down.*), not a model: apply it "
            "to the base model it was trained on, --ckpt BASE --lora FILE[:SCALE] "
            "(generate(loras=...))."
        )
    if tops <= _EMBEDDING_KEYS or ("string_to_param" in tops):
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
