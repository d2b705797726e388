"""KL autoencoder key map: CompVis `AutoencoderKL` <-> diffusers `AutoencoderKL`.

CompVis `encoder.down.i.block.j` / `decoder.up.i.block.j` become `down_blocks.i.resnets.j` /
`up_blocks.(L-1-i).resnets.j` (diffusers orders decoder levels from low to high resolution);
mid-block attention uses 1x1 convs in CompVis ([C, C, 1, 1]) and linears in diffusers ([C, C]).
Keys are given without the `first_stage_model.` prefix.
"""

from __future__ import annotations

import re

import torch

_TOP = [
    ("encoder.norm_out.", "encoder.conv_norm_out."),
    ("decoder.norm_out.", "decoder.conv_norm_out."),
    ("encoder.conv_in.", "encoder.conv_in."),
    ("encoder.conv_out.", "encoder.conv_out."),
    ("decoder.conv_in.", "decoder.conv_in."),
    ("decoder.conv_out.", "decoder.conv_out."),
    ("quant_conv.", "quant_conv."),
    ("post_quant_conv.", "post_quant_conv."),
]
_RES = [
    ("norm1.", "norm1."),
    ("conv1.", "conv1."),
    ("norm2.", "norm2."),
    ("conv2.", "conv2."),
    ("nin_shortcut.", "conv_shortcut."),
]
_ATTN = [
    ("norm.", "group_norm."),
    ("q.", "to_q."),
    ("k.", "to_k."),
    ("v.", "to_v."),
    ("proj_out.", "to_out.0."),
]
_ATTN_LINEAR = ("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight")
# diffusers < 0.14 named the mid-block attention projections differently
_OLD_ATTN = {"query.": "to_q.", "key.": "to_k.", "value.": "to_v.", "proj_attn.": "to_out.0."}


def _modern_attention_name(key: str) -> str:
    head, sep, tail = key.partition("mid_block.attentions.0.")
    if sep:
        for old, new in _OLD_ATTN.items():
            if tail.startswith(old):
                return head + sep + new + tail[len(old) :]
    return key


def _sub(rest: str, table: list[tuple[str, str]], reverse: bool = False) -> str | None:
    for a, b in table:
        src, dst = (b, a) if reverse else (a, b)
        if rest.startswith(src):
            return dst + rest[len(src) :]
    return None


def num_levels_ldm(keys: list[str]) -> int:
    """Resolution levels of the decoder (`decoder.up.i`)."""
    return 1 + max(int(m.group(1)) for k in keys if (m := re.match(r"decoder\.up\.(\d+)\.", k)))


def _to_diffusers(key: str, levels: int) -> str:
    top = _sub(key, _TOP)
    if top is not None:
        return top
    m = re.match(
        r"(encoder|decoder)\.(down|up)\.(\d+)\.(block\.(\d+)|downsample|upsample)\.(.*)", key
    )
    if m:
        part, _, i, what, j, rest = m.groups()
        i = int(i)
        level = i if part == "encoder" else levels - 1 - i
        blocks = "down_blocks" if part == "encoder" else "up_blocks"
        if what in ("downsample", "upsample"):
            samplers = "downsamplers" if part == "encoder" else "upsamplers"
            return f"{part}.{blocks}.{level}.{samplers}.0.{rest}"
        res = _sub(rest, _RES)
        if res is not None:
            return f"{part}.{blocks}.{level}.resnets.{j}.{res}"
    m = re.match(r"(encoder|decoder)\.mid\.(block_(\d)|attn_1)\.(.*)", key)
    if m:
        part, what, j, rest = m.groups()
        if j is not None:
            res = _sub(rest, _RES)
            if res is not None:
                return f"{part}.mid_block.resnets.{int(j) - 1}.{res}"
        else:
            att = _sub(rest, _ATTN)
            if att is not None:
                return f"{part}.mid_block.attentions.0.{att}"
    raise KeyError(
        f"Autoencoder key {key!r} has no diffusers equivalent (diffusers' AutoencoderKL has no "
        "attention outside the mid block)."
    )


def _to_ldm(key: str, levels: int) -> str:
    top = _sub(key, _TOP, reverse=True)
    if top is not None:
        return top
    m = re.match(
        r"(encoder|decoder)\.(down_blocks|up_blocks)\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.*)",
        key,
    )
    if m:
        part, _, level, kind, j, rest = m.groups()
        level = int(level)
        i = level if part == "encoder" else levels - 1 - level
        blocks = "down" if part == "encoder" else "up"
        if kind in ("downsamplers", "upsamplers"):
            what = "downsample" if part == "encoder" else "upsample"
            return f"{part}.{blocks}.{i}.{what}.{rest}"
        res = _sub(rest, _RES, reverse=True)
        if res is not None:
            return f"{part}.{blocks}.{i}.block.{j}.{res}"
    m = re.match(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key)
    if m:
        part, kind, j, rest = m.groups()
        if kind == "resnets":
            res = _sub(rest, _RES, reverse=True)
            if res is not None:
                return f"{part}.mid.block_{int(j) + 1}.{res}"
        else:
            att = _sub(rest, _ATTN, reverse=True)
            if att is not None:
                return f"{part}.mid.attn_1.{att}"
    raise KeyError(f"diffusers autoencoder key {key!r} has no CompVis equivalent.")


def vae_to_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CompVis AutoencoderKL state dict (no prefix, no loss) -> diffusers AutoencoderKL."""
    levels = num_levels_ldm(list(sd))
    out = {}
    for k, v in sd.items():
        new = _to_diffusers(k, levels)
        if new.endswith(_ATTN_LINEAR) and v.ndim == 4:
            v = v[:, :, 0, 0]  # 1x1 conv [C, C, 1, 1] -> linear [C, C]
        out[new] = v
    return out


def vae_to_ldm(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL state dict -> CompVis AutoencoderKL (no prefix)."""
    levels = 1 + max(
        int(m.group(1)) for k in sd if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k))
    )
    out = {}
    for k, v in sd.items():
        k = _modern_attention_name(k)
        if k.endswith(_ATTN_LINEAR) and v.ndim == 2:
            v = v[:, :, None, None]  # linear [C, C] -> 1x1 conv [C, C, 1, 1]
        out[_to_ldm(k, levels)] = v
    return out
