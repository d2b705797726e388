"""Text encoder key maps: SD v1 CLIP (`cond_stage_model.transformer.*`) and SD v2 OpenCLIP
(`cond_stage_model.model.*`) <-> a transformers `CLIPTextModel` (`text_model.*`, hub layout).

OpenCLIP fuses q/k/v into `attn.in_proj_weight` ([3D, D]); CLIP keeps `q_proj/k_proj/v_proj`.
SD v2 conditions on the penultimate layer followed by `ln_final`, which is a CLIPTextModel with
one layer fewer; the unused last layer, `text_projection` and `logit_scale` are returned as extras.
SDXL keeps every layer of its OpenCLIP ViT-bigG tower and its `text_projection` (diffusers'
`CLIPTextModelWithProjection`); its encoders live under `conditioner.embedders.N.`, so every map
takes the key prefix.
"""

from __future__ import annotations

import re

import torch

CLIP_PREFIX = "cond_stage_model.transformer."
OPENCLIP_PREFIX = "cond_stage_model.model."
HF_PREFIX = "text_model."
PROJECTION_KEY = "text_projection.weight"  # CLIPTextModelWithProjection

_OPENCLIP_TOP = [
    ("token_embedding.weight", "embeddings.token_embedding.weight"),
    ("positional_embedding", "embeddings.position_embedding.weight"),
    ("ln_final.weight", "final_layer_norm.weight"),
    ("ln_final.bias", "final_layer_norm.bias"),
]
_OPENCLIP_LAYER = [
    ("ln_1.", "layer_norm1."),
    ("ln_2.", "layer_norm2."),
    ("attn.out_proj.", "self_attn.out_proj."),
    ("mlp.c_fc.", "mlp.fc1."),
    ("mlp.c_proj.", "mlp.fc2."),
]


def clip_to_hf(
    sd: dict[str, torch.Tensor], prefix: str = CLIP_PREFIX
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], bool]:
    """CLIP text encoder keys under `prefix` -> (hub CLIPTextModel dict, extras, had `text_model.`)."""
    out, extras = {}, {}
    nested = any(k.startswith(prefix + HF_PREFIX) and not k.endswith("position_ids") for k in sd)
    for k, v in sd.items():
        rest = k[len(prefix) :]
        if rest.startswith(HF_PREFIX):
            rest = rest[len(HF_PREFIX) :]
        if rest.endswith("position_ids"):  # a buffer recomputed by transformers
            extras[k] = v
            continue
        out[HF_PREFIX + rest] = v
    return out, extras, nested


def hf_to_clip(
    sd: dict[str, torch.Tensor], nested: bool = True, prefix: str = CLIP_PREFIX
) -> dict[str, torch.Tensor]:
    """Hub CLIPTextModel dict (`text_model.*` or flat) -> `prefix` keys (SD v1: `cond_stage_model.transformer.*`)."""
    out = {}
    for k, v in sd.items():
        rest = k[len(HF_PREFIX) :] if k.startswith(HF_PREFIX) else k
        if rest.endswith("position_ids"):
            continue
        out[prefix + (HF_PREFIX if nested else "") + rest] = v
    return out


def openclip_num_layers(sd: dict[str, torch.Tensor], prefix: str = OPENCLIP_PREFIX) -> int:
    """Number of OpenCLIP text resblocks under `prefix` (SD v2: `cond_stage_model.model.`)."""
    idx = [
        int(m.group(1))
        for k in sd
        if (m := re.match(re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.", k))
    ]
    return max(idx) + 1


def openclip_to_hf(
    sd: dict[str, torch.Tensor],
    keep_layers: int | None = None,
    prefix: str = OPENCLIP_PREFIX,
    projection: bool = False,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """OpenCLIP keys under `prefix` -> (hub CLIPTextModel dict with `keep_layers` layers, extras).

    With `projection`, `text_projection` ([D, P], applied as `x @ P`) becomes the
    `text_projection.weight` ([P, D]) of a CLIPTextModelWithProjection: the matrix transposed.
    """
    out, extras = {}, {}
    n = openclip_num_layers(sd, prefix)
    keep = n if keep_layers is None else keep_layers
    for k, v in sd.items():
        rest = k[len(prefix) :]
        if projection and rest == "text_projection":
            out[PROJECTION_KEY] = v.t().contiguous()
            continue
        top = dict(_OPENCLIP_TOP).get(rest)
        if top is not None:
            out[HF_PREFIX + top] = v
            continue
        m = re.match(r"transformer\.resblocks\.(\d+)\.(.*)", rest)
        if m is None or int(m.group(1)) >= keep:  # text_projection, logit_scale, unused layers
            extras[k] = v
            continue
        i, tail = int(m.group(1)), m.group(2)
        base = f"{HF_PREFIX}encoder.layers.{i}."
        if tail in ("attn.in_proj_weight", "attn.in_proj_bias"):
            what = tail.rsplit("_", 1)[1]  # weight | bias
            q, kk, vv = v.chunk(3, dim=0)  # [3D, ...] -> 3 x [D, ...]
            out[base + f"self_attn.q_proj.{what}"] = q
            out[base + f"self_attn.k_proj.{what}"] = kk
            out[base + f"self_attn.v_proj.{what}"] = vv
            continue
        for a, b in _OPENCLIP_LAYER:
            if tail.startswith(a):
                out[base + b + tail[len(a) :]] = v
                break
        else:
            raise KeyError(f"OpenCLIP key {k!r} has no CLIPTextModel equivalent.")
    return out, extras


def hf_to_openclip(
    sd: dict[str, torch.Tensor], prefix: str = OPENCLIP_PREFIX
) -> dict[str, torch.Tensor]:
    """Hub CLIPTextModel(WithProjection) dict -> OpenCLIP keys under `prefix` (q/k/v fused again)."""
    out: dict[str, torch.Tensor] = {}
    rev_top = {b: a for a, b in _OPENCLIP_TOP}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        if k == PROJECTION_KEY:
            out[prefix + "text_projection"] = v.t().contiguous()
            continue
        rest = k[len(HF_PREFIX) :] if k.startswith(HF_PREFIX) else k
        if rest.endswith("position_ids"):
            continue
        if rest in rev_top:
            out[prefix + rev_top[rest]] = v
            continue
        m = re.match(r"encoder\.layers\.(\d+)\.(.*)", rest)
        if m is None:
            raise KeyError(f"CLIPTextModel key {k!r} has no OpenCLIP equivalent.")
        i, tail = int(m.group(1)), m.group(2)
        base = f"{prefix}transformer.resblocks.{i}."
        mq = re.match(r"self_attn\.(q|k|v)_proj\.(weight|bias)", tail)
        if mq:
            qkv.setdefault((i, mq.group(2)), {})[mq.group(1)] = v
            continue
        for a, b in _OPENCLIP_LAYER:
            if tail.startswith(b):
                out[base + a + tail[len(b) :]] = v
                break
        else:
            raise KeyError(f"CLIPTextModel key {k!r} has no OpenCLIP equivalent.")
    for (i, what), parts in qkv.items():
        out[f"{prefix}transformer.resblocks.{i}.attn.in_proj_{what}"] = torch.cat(
            [parts["q"], parts["k"], parts["v"]], dim=0
        )
    return out
