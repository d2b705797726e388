"""SDXL single-file checkpoints <-> diffusers SDXL folders, bit-exact both ways for our folders.

Checkpoint layout (= our model's): `model.diffusion_model.*` (CompVis U-Net, vector embedding
`label_emb.0.*`), `first_stage_model.*` (KL-f8), `conditioner.embedders.N.transformer.*` (CLIP ViT-L,
base only) and `conditioner.embedders.N.model.*` (OpenCLIP bigG with `text_projection`). Folder:
`unet` (`add_embedding.*`), `vae`, `text_encoder` + `tokenizer` (base only), `text_encoder_2`
(every bigG layer; `text_projection.weight` = the OpenCLIP matrix transposed) + `tokenizer_2`,
`scheduler`, model_index.json. Leftover keys (logit_scale, position_ids, EMA, ...) go to
`ldm_extras.safetensors`, the config to `ldm_config.json`, as for SD v1/v2.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from pathlib import Path
from typing import Any

import torch

from ldm.checkpoint import diffusers_config as dcfg
from ldm.checkpoint import diffusers_config_sdxl as xcfg
from ldm.checkpoint.detect import diffusers_family, load_builtin_config
from ldm.checkpoint.diffusers_config import ConversionError
from ldm.checkpoint.diffusers_folder import (
    CONFIG_FILE,
    EXTRAS_FILE,
    UNET_PREFIX,
    VAE_PREFIX,
    read_component,
    read_extras,
    save_component,
    split_unet_vae,
    write_extras,
)
from ldm.checkpoint.keymap_text import clip_to_hf, hf_to_clip, hf_to_openclip, openclip_to_hf
from ldm.checkpoint.keymap_unet import unet_to_diffusers, unet_to_ldm
from ldm.checkpoint.keymap_vae import vae_to_diffusers, vae_to_ldm
from ldm.checkpoint.sdxl_layout import TextEmbedder, text_embedders, time_embed_dim

logger = logging.getLogger(__name__)

CLIP_LEVEL_META = "clip_text_model_level"  # "1": the file's CLIP keys had `text_model.`
# open_clip's initial logit scale; the value is unused by SDXL (no image tower)
_LOGIT_SCALE = math.log(1 / 0.07)


def sdxl_text_encoders(config: dict[str, Any]) -> tuple[TextEmbedder | None, TextEmbedder]:
    """(CLIP embedder or None, OpenCLIP embedder) of an SDXL config; else ConversionError."""
    texts = text_embedders(config)
    clips = [t for t in texts if t.kind == "clip"]
    opens = [t for t in texts if t.kind == "openclip"]
    if len(clips) > 1 or len(opens) != 1:
        found = [f"{t.index}: {t.kind}" for t in texts]
        raise ConversionError(
            "conditioner_config.params.emb_models: diffusers SDXL folders hold at most one CLIP "
            f"(text_encoder) and exactly one OpenCLIP (text_encoder_2) text embedder; found "
            f"{found}. Convert this model's weights with a config of that shape."
        )
    return (clips[0] if clips else None), opens[0]


def _under(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    found = {k: v for k, v in sd.items() if k.startswith(prefix)}
    if not found:
        raise ConversionError(
            f"The config names a text embedder whose weights would be `{prefix}*`, but the "
            "checkpoint has no such keys; pass the config that matches this file (config=)."
        )
    return found


def split_sdxl(
    sd: dict[str, torch.Tensor], config: dict[str, Any]
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor], dict[str, str]]:
    """(diffusers components, leftover keys, layout metadata) of an SDXL state dict."""
    clip, openclip = sdxl_text_encoders(config)
    unet, vae = split_unet_vae(sd)
    comps = {"unet": unet_to_diffusers(unet, text_time=True), "vae": vae_to_diffusers(vae)}
    used = {UNET_PREFIX + k for k in unet} | {VAE_PREFIX + k for k in vae}
    extras: dict[str, torch.Tensor] = {}
    meta: dict[str, str] = {"text_kind": "sdxl"}
    if clip is not None:
        text_sd = _under(sd, clip.prefix)
        comps["text_encoder"], extra, nested = clip_to_hf(text_sd, prefix=clip.prefix)
        meta[CLIP_LEVEL_META] = "1" if nested else "0"
        extras.update(extra)
        used |= set(text_sd)
    text_sd = _under(sd, openclip.prefix)
    comps["text_encoder_2"], extra = openclip_to_hf(
        text_sd, prefix=openclip.prefix, projection=True
    )
    extras.update(extra)
    used |= set(text_sd)
    extras.update({k: v for k, v in sd.items() if k not in used})
    return comps, extras, meta


def write_sdxl_folder(sd: dict[str, torch.Tensor], config: dict[str, Any], out: Path) -> Path:
    """Write a diffusers SDXL folder (base or refiner layout) from an SDXL state dict + config."""
    clip, openclip = sdxl_text_encoders(config)
    comps, extras, meta = split_sdxl(sd, config)
    params = config["model"]["params"]
    out.mkdir(parents=True, exist_ok=True)
    save_component(out, "unet", comps["unet"], xcfg.unet_config(config, time_embed_dim(config)))
    scale = float(sd["scale_factor"]) if "scale_factor" in sd else params.get("scale_factor", 1.0)
    save_component(out, "vae", comps["vae"], xcfg.vae_config(config, scale))
    if clip is not None:
        te = comps["text_encoder"]
        save_component(out, "text_encoder", te, xcfg.clip_config(te, clip.params))
        dcfg.write_tokenizer(out / "tokenizer", "clip")
    te2 = comps["text_encoder_2"]
    save_component(out, "text_encoder_2", te2, xcfg.openclip_config(te2, openclip.params))
    dcfg.write_tokenizer(out / "tokenizer_2", "openclip")  # pads with "!" (id 0), as open_clip
    (out / "scheduler").mkdir(exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(
        json.dumps(xcfg.scheduler_config(config), indent=2)
    )
    (out / "model_index.json").write_text(json.dumps(xcfg.model_index(clip is not None), indent=2))
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    write_extras(out, extras, meta)
    logger.info(
        "Wrote diffusers SDXL folder %s (%d extra keys kept in %s)", out, len(extras), EXTRAS_FILE
    )
    return out


def _foreign_fill(sd: dict[str, torch.Tensor], openclip: TextEmbedder) -> None:
    """Keys a folder not written by us lacks: OpenCLIP's `logit_scale` (unused by SDXL)."""
    key = openclip.prefix + "logit_scale"
    if key not in sd:
        sd[key] = torch.tensor(_LOGIT_SCALE, dtype=torch.float32)
        logger.info("%s is not in a diffusers folder; set to open_clip's initial value.", key)


def from_sdxl_folder(
    folder: Path, *, unsafe: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(SDXL single-file state dict, config) from a diffusers SDXL folder (ours or foreign);
    ``unsafe``: `.bin` weights may unpickle arbitrary objects."""
    family = diffusers_family(folder)
    cfg_path = folder / CONFIG_FILE
    if cfg_path.is_file():
        config = json.loads(cfg_path.read_text())
    else:
        config = xcfg.sdxl_config_from_diffusers(folder, load_builtin_config(family))
        logger.info("%s: no %s; config rebuilt from the %s built-in", folder, CONFIG_FILE, family)
    clip, openclip = sdxl_text_encoders(config)
    unet = read_component(folder, "unet", unsafe=unsafe)
    vae = read_component(folder, "vae", unsafe=unsafe)
    te2 = read_component(folder, "text_encoder_2", unsafe=unsafe)
    if unet is None or vae is None or te2 is None:
        raise FileNotFoundError(
            f"{folder}: an SDXL folder needs unet/, vae/ and text_encoder_2/; missing: "
            + ", ".join(
                f"{n}/"
                for n, c in (("unet", unet), ("vae", vae), ("text_encoder_2", te2))
                if c is None
            )
            + ". Download the whole folder."
        )
    extras, meta = read_extras(folder)
    sd = {UNET_PREFIX + k: v for k, v in unet_to_ldm(unet).items()}
    sd.update({VAE_PREFIX + k: v for k, v in vae_to_ldm(vae).items()})
    if clip is not None:
        te = read_component(folder, "text_encoder", unsafe=unsafe)
        if te is None:
            raise FileNotFoundError(
                f"{folder} has no text_encoder/ subfolder, but the config has a CLIP embedder "
                f"(conditioner.embedders.{clip.index}). Download the whole folder."
            )
        # a foreign folder gets the layout of the SDXL base 1.0 key list (no `text_model.`)
        nested = meta.get(CLIP_LEVEL_META, "0") == "1"
        sd.update(hf_to_clip(te, nested=nested, prefix=clip.prefix))
    sd.update(hf_to_openclip(te2, prefix=openclip.prefix))
    sd.update(extras)
    if not extras:
        _foreign_fill(sd, openclip)
    return sd, copy.deepcopy(config)
