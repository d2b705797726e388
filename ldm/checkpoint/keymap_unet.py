"""U-Net key map: CompVis `UNetModel` (openaimodel layout) <-> diffusers `UNet2DConditionModel`.

CompVis numbers blocks linearly: `input_blocks.0` is the stem conv, then per resolution level
`num_res_blocks` (ResBlock [+ SpatialTransformer]) and one Downsample; `output_blocks` mirror it with
`num_res_blocks + 1` blocks per level, the last one carrying the Upsample. diffusers groups the
same modules per level (`down_blocks.L.resnets.j`, `.attentions.j`, `.downsamplers.0`). Transformer
internals (`norm`, `proj_in`, `transformer_blocks.*`, `proj_out`) have the same names in both.
Keys are given without the `model.diffusion_model.` prefix.
"""

from __future__ import annotations

import re

import torch

# ResBlock submodule names: CompVis -> diffusers
_RES = [
    ("in_layers.0.", "norm1."),
    ("in_layers.2.", "conv1."),
    ("emb_layers.1.", "time_emb_proj."),
    ("out_layers.0.", "norm2."),
    ("out_layers.3.", "conv2."),
    ("skip_connection.", "conv_shortcut."),
]
_TOP = [
    ("time_embed.0.", "time_embedding.linear_1."),
    ("time_embed.2.", "time_embedding.linear_2."),
    ("input_blocks.0.0.", "conv_in."),
    ("out.0.", "conv_norm_out."),
    ("out.2.", "conv_out."),
    ("label_emb.0.0.", "class_embedding.linear_1."),
    ("label_emb.0.2.", "class_embedding.linear_2."),
]
# SDXL's vector conditioning (pooled text + size/crop Fourier features): diffusers `text_time`
_ADD_EMBED = [
    ("label_emb.0.0.", "add_embedding.linear_1."),
    ("label_emb.0.2.", "add_embedding.linear_2."),
]
_ATTN_START = ("norm.", "proj_in.", "proj_out.", "transformer_blocks.")


def _sub(rest: str, table: list[tuple[str, str]], reverse: bool = False) -> str | None:
    for a, b in table:
        src, dst = (b, a) if reverse else (a, b)
        if rest.startswith(src):
            return dst + rest[len(src) :]
    return None


def num_res_blocks_ldm(keys: list[str]) -> int:
    """Resnets per level, from the index of the first Downsample (or the last input block)."""
    ops = sorted(
        int(m.group(1)) for k in keys if (m := re.match(r"input_blocks\.(\d+)\.0\.op\.", k))
    )
    if ops:
        return ops[0] - 1
    idx = [int(m.group(1)) for k in keys if (m := re.match(r"input_blocks\.(\d+)\.", k))]
    return max(idx)


def num_res_blocks_diffusers(keys: list[str]) -> int:
    """Resnets per down level in a diffusers U-Net state dict."""
    idx = [int(m.group(1)) for k in keys if (m := re.match(r"down_blocks\.0\.resnets\.(\d+)\.", k))]
    return max(idx) + 1


def _unet_key_to_diffusers(key: str, n: int, text_time: bool) -> str:
    top = _sub(key, _ADD_EMBED) if text_time else None
    if top is not None:
        return top
    top = _sub(key, _TOP)
    if top is not None:
        return top
    if key.startswith("label_emb.weight"):
        return "class_embedding.weight"
    m = re.match(r"input_blocks\.(\d+)\.(\d+)\.(.*)", key)
    if m:
        i, sub, rest = int(m.group(1)), int(m.group(2)), m.group(3)
        level, j = (i - 1) // (n + 1), (i - 1) % (n + 1)
        if j == n:  # Downsample
            if rest.startswith("op."):
                return f"down_blocks.{level}.downsamplers.0.conv.{rest[3:]}"
        elif sub == 0:
            res = _sub(rest, _RES)
            if res is not None:
                return f"down_blocks.{level}.resnets.{j}.{res}"
        elif sub == 1 and rest.startswith(_ATTN_START):
            return f"down_blocks.{level}.attentions.{j}.{rest}"
    m = re.match(r"middle_block\.(\d)\.(.*)", key)
    if m:
        sub, rest = int(m.group(1)), m.group(2)
        if sub in (0, 2):
            res = _sub(rest, _RES)
            if res is not None:
                return f"mid_block.resnets.{sub // 2}.{res}"
        elif rest.startswith(_ATTN_START):
            return f"mid_block.attentions.0.{rest}"
    m = re.match(r"output_blocks\.(\d+)\.(\d+)\.(.*)", key)
    if m:
        i, sub, rest = int(m.group(1)), int(m.group(2)), m.group(3)
        level, j = i // (n + 1), i % (n + 1)
        if sub == 0:
            res = _sub(rest, _RES)
            if res is not None:
                return f"up_blocks.{level}.resnets.{j}.{res}"
        elif rest.startswith("conv."):  # Upsample, after the optional transformer
            return f"up_blocks.{level}.upsamplers.0.{rest}"
        elif sub == 1 and rest.startswith(_ATTN_START):
            return f"up_blocks.{level}.attentions.{j}.{rest}"
    raise KeyError(f"U-Net key {key!r} has no diffusers equivalent.")


def _unet_key_to_ldm(key: str, n: int, up_has_attn: set[int]) -> str:
    top = _sub(key, _TOP + _ADD_EMBED, reverse=True)
    if top is not None:
        return top
    if key == "class_embedding.weight":
        return "label_emb.weight"
    m = re.match(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.*)", key)
    if m:
        level, kind, j, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
        if kind == "downsamplers" and rest.startswith("conv."):
            return f"input_blocks.{level * (n + 1) + n + 1}.0.op.{rest[5:]}"
        i = level * (n + 1) + j + 1
        if kind == "resnets":
            res = _sub(rest, _RES, reverse=True)
            if res is not None:
                return f"input_blocks.{i}.0.{res}"
        elif kind == "attentions":
            return f"input_blocks.{i}.1.{rest}"
    m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key)
    if m:
        kind, j, rest = m.group(1), int(m.group(2)), m.group(3)
        if kind == "resnets":
            res = _sub(rest, _RES, reverse=True)
            if res is not None:
                return f"middle_block.{2 * j}.{res}"
        else:
            return f"middle_block.1.{rest}"
    m = re.match(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.(.*)", key)
    if m:
        level, kind, j, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
        if kind == "upsamplers":
            sub = 2 if level in up_has_attn else 1
            return f"output_blocks.{level * (n + 1) + n}.{sub}.{rest}"
        i = level * (n + 1) + j
        if kind == "resnets":
            res = _sub(rest, _RES, reverse=True)
            if res is not None:
                return f"output_blocks.{i}.0.{res}"
        else:
            return f"output_blocks.{i}.1.{rest}"
    raise KeyError(f"diffusers U-Net key {key!r} has no CompVis equivalent.")


def unet_to_diffusers(
    sd: dict[str, torch.Tensor], text_time: bool = False
) -> dict[str, torch.Tensor]:
    """CompVis U-Net state dict (no prefix) -> diffusers UNet2DConditionModel state dict.

    `text_time` (SDXL): the vector embedding `label_emb.0.*` becomes `add_embedding.*`
    (diffusers' `addition_embed_type="text_time"`) instead of `class_embedding.*`.
    """
    n = num_res_blocks_ldm(list(sd))
    return {_unet_key_to_diffusers(k, n, text_time): v for k, v in sd.items()}


def unet_to_ldm(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers UNet2DConditionModel state dict -> CompVis U-Net state dict (no prefix)."""
    n = num_res_blocks_diffusers(list(sd))
    up_attn = {int(m.group(1)) for k in sd if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}
    return {_unet_key_to_ldm(k, n, up_attn): v for k, v in sd.items()}
