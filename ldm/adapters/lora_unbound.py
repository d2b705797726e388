"""A LoRA file read without a model (`ldm-lora convert` without `--like`): its own names give the
engine keys and its tensors the shapes, under a layout read off the names.

kohya names lose the dots of their module paths; they come back by a vocabulary of the module
names that hold underscores (`down_blocks`, `to_q`, `self_attn`, ...). SDXL-layout files (`lora_te1_`,
`lora_te2_`, `text_encoder_2`, original `input_blocks` U-Net names) convert between the original and
the diffusers U-Net names with SDXL's block counts (2 ResBlocks a level, attention on the two lower
levels) when the file is for SDXL; otherwise the counts come from the diffusers names in the file.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from ldm.adapters.lora_family import SD_V1, SD_V2, SDXL, Family, file_family
from ldm.adapters.lora_format import KOHYA
from ldm.adapters.lora_layout import UNET, Layout, TextSlot
from ldm.adapters.lora_names import DIFFUSERS_UNET, KOHYA_UNET, Names, Target, target_names
from ldm.adapters.lora_weights import LoraError, LoraModule
from ldm.checkpoint.keymap_unet import _unet_key_to_ldm

# module names with underscores, longest first (U-Net diffusers and sgm, CLIP text model)
_WORDS = sorted(
    """down_blocks up_blocks mid_block transformer_blocks proj_in proj_out to_q to_k to_v to_out
    conv_shortcut time_emb_proj conv_in conv_out conv_norm_out time_embedding linear_1 linear_2
    class_embedding add_embedding input_blocks middle_block output_blocks in_layers out_layers
    emb_layers skip_connection time_embed label_emb text_model self_attn q_proj k_proj v_proj
    out_proj layer_norm1 layer_norm2 final_layer_norm token_embedding position_embedding
    text_projection""".split(),
    key=lambda w: -w.count("_"),
)
_SGM_ROOTS = (
    "input_blocks.",
    "middle_block.",
    "output_blocks.",
    "time_embed.",
    "label_emb.",
    "out.",
)
_TEXT = {"lora_te": 0, "lora_te1": 0, "lora_te2": 1, "text_encoder": 0, "text_encoder_2": 1}
# block counts of the released families: (ResBlocks per level, diffusers up levels with attention)
_BLOCKS = {SD_V1: (2, {1, 2, 3}), SD_V2: (2, {1, 2, 3}), SDXL: (2, {0, 1})}


def repunctuate(name: str) -> str:
    """`down_blocks_0_attentions_0_to_out_0` -> `down_blocks.0.attentions.0.to_out.0`."""
    tokens, out, i = name.split("_"), [], 0
    while i < len(tokens):
        for word in _WORDS:
            n = word.count("_") + 1
            if "_".join(tokens[i : i + n]) == word:
                out.append(word)
                i += n
                break
        else:
            out.append(tokens[i])
            i += 1
    return ".".join(out)


def _split(name: str, fmt: str) -> tuple[str, str]:
    """(component: `unet` | a text prefix, dotted module path) of a file name."""
    if fmt == KOHYA:
        m = re.match(r"(lora_unet|lora_te\d?)_(.*)", name)
        if m is None:
            raise LoraError(f"kohya module `{name}` starts with neither lora_unet_ nor lora_te*_.")
        comp = DIFFUSERS_UNET if m.group(1) == KOHYA_UNET else m.group(1)
        return comp, repunctuate(m.group(2))
    comp, _, path = name.partition(".")
    return comp, path


def _blocks(paths: list[str], family: Family) -> tuple[int, set[int]] | None:
    """(ResBlocks per level, up levels with attention) from diffusers U-Net paths or the family."""
    if family.name in _BLOCKS:
        n, up = _BLOCKS[family.name]
        return n, set(up)
    down = [int(m.group(1)) for p in paths if (m := re.match(r"down_blocks\.\d+\.\w+\.(\d+)\.", p))]
    up = [int(m.group(1)) for p in paths if (m := re.match(r"up_blocks\.\d+\.\w+\.(\d+)\.", p))]
    if not down and not up:
        return None
    n = max(down) + 1 if down else max(up)
    levels = {int(m.group(1)) for p in paths if (m := re.match(r"up_blocks\.(\d+)\.attentions", p))}
    return n, levels


def unbound_names(
    named: Mapping[str, LoraModule], metadata: Mapping[str, str], fmt: str, source: str
) -> tuple[dict[Target, Names], dict[str, torch.Size], Family]:
    """(target names, engine-key shapes, family) for a file's modules under a layout from its names."""
    family = file_family(named, metadata)
    split = {name: _split(name, fmt) for name, _ in named.items()}
    unet_paths = [p for c, p in split.values() if c == DIFFUSERS_UNET]
    sgm = [p for p in unet_paths if p.startswith(_SGM_ROOTS)]
    texts = sorted({c for c, _ in split.values() if c != DIFFUSERS_UNET})
    sdxl = bool(sgm) or any(c in ("lora_te1", "lora_te2", "text_encoder_2") for c in texts)
    sdxl = sdxl or family.name == SDXL
    blocks = _blocks([p for p in unet_paths if p not in sgm], family)
    if blocks is None and sgm:  # original names -> diffusers names needs the block counts
        raise LoraError(
            f"{source}: the U-Net block counts cannot be read off the file's names ({family}); "
            "pass the model's checkpoint (--like CKPT) to convert it."
        )
    n, up_attn = blocks or (2, set())
    slots = {}
    for comp in texts:
        i = _TEXT.get(comp)
        if i is None:
            raise LoraError(f"{source}: unknown text encoder prefix `{comp}`.")
        prefix = (
            f"conditioner.embedders.{i}.transformer." if sdxl else "cond_stage_model.transformer."
        )
        kohya, diff = ("lora_te1", "text_encoder") if i == 0 else ("lora_te2", "text_encoder_2")
        slots[comp] = TextSlot(prefix, "clip", kohya if sdxl else "lora_te", diff, nested=True)
    layout = Layout(sdxl, n, frozenset(up_attn), tuple(dict.fromkeys(slots.values())))
    shapes: dict[str, torch.Size] = {}
    for name, m in named.items():
        comp, path = split[name]
        if comp == DIFFUSERS_UNET:
            rest = path if path.startswith(_SGM_ROOTS) else _to_ldm(path, n, up_attn, source)
            key = f"{UNET}{rest}.weight"
        else:
            key = f"{slots[comp].prefix}{path}.weight"
        shapes[key] = torch.Size([m.up.shape[0], *m.down.shape[1:]])
    return target_names(layout, shapes), shapes, family


def _to_ldm(path: str, n: int, up_attn: set[int], source: str) -> str:
    try:
        return _unet_key_to_ldm(path + ".weight", n, up_attn)[: -len(".weight")]
    except KeyError as err:
        raise LoraError(f"{source}: U-Net module `{path}` is not a diffusers module name.") from err
