"""SD / our checkpoints <-> diffusers folders (unet, vae, text_encoder, tokenizer, scheduler).

Every key of the source lands somewhere: U-Net, autoencoder and text weights in the diffusers
components, everything diffusers has no slot for (EMA copies, schedule buffers, autoencoder losses,
OpenCLIP's unused last layer, `text_projection`, `logit_scale`, `position_ids`) in
`ldm_extras.safetensors`, and our config in `ldm_config.json`. diffusers ignores both files; we read
them back, so checkpoint -> folder -> checkpoint is bit-exact.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import torch

from ldm.checkpoint import diffusers_config as dcfg
from ldm.checkpoint.detect import (
    Detection,
    DetectionError,
    as_full_config,
    detect,
    detect_sd,
    diffusers_family,
)
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
from ldm.checkpoint.ema import apply_ema, has_ema
from ldm.checkpoint.keymap_text import (
    CLIP_PREFIX,
    OPENCLIP_PREFIX,
    clip_to_hf,
    hf_to_clip,
    hf_to_openclip,
    openclip_num_layers,
    openclip_to_hf,
)
from ldm.checkpoint.keymap_unet import unet_to_diffusers, unet_to_ldm
from ldm.checkpoint.keymap_vae import vae_to_diffusers, vae_to_ldm
from ldm.checkpoint.prune import save_state_dict
from ldm.checkpoint.safe_load import LoadedCheckpoint, read_checkpoint
from ldm.checkpoint.sdxl_layout import is_sdxl_config

logger = logging.getLogger(__name__)


def text_kind(config: dict[str, Any], sd: dict[str, torch.Tensor]) -> str | None:
    """'clip' (SD v1 FrozenCLIPEmbedder), 'openclip' (SD v2) or None (no convertible text encoder)."""
    target = str(config["model"].get("params", {}).get("cond_stage_config", {}).get("target", ""))
    if any(k.startswith(OPENCLIP_PREFIX) for k in sd) and "OpenCLIP" in target:
        return "openclip"
    if any(k.startswith(CLIP_PREFIX) for k in sd) and "CLIP" in target:
        return "clip"
    return None


def _layer_mode(config: dict[str, Any]) -> str:
    cond = config["model"].get("params", {}).get("cond_stage_config", {})
    return str((cond.get("params") or {}).get("layer", "last"))


def _heads(config: dict[str, Any]) -> int | None:
    """The text encoder's attention heads as its config gives them: ``heads`` / ``num_heads`` /
    ``num_attention_heads``, directly or in a transformers ``config`` mapping."""
    params = config["model"].get("params", {}).get("cond_stage_config", {}).get("params") or {}
    nested = params.get("config")
    for where in (params, nested if isinstance(nested, dict) else {}):
        for key in ("heads", "num_heads", "num_attention_heads"):
            if isinstance(where.get(key), int):
                return where[key]
    return None


def split_for_diffusers(
    sd: dict[str, torch.Tensor], config: dict[str, Any]
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor], dict[str, str]]:
    """(components, extras, metadata): diffusers state dicts, leftover SD keys, layout facts."""
    unet, vae = split_unet_vae(sd)
    comps: dict[str, dict[str, torch.Tensor]] = {
        "unet": unet_to_diffusers(unet),
        "vae": vae_to_diffusers(vae),
    }
    meta: dict[str, str] = {}
    used = {UNET_PREFIX + k for k in unet} | {VAE_PREFIX + k for k in vae}
    kind = text_kind(config, sd)
    extras: dict[str, torch.Tensor] = {}
    if kind == "clip":
        if _layer_mode(config) != "last":
            logger.warning(
                "Text encoder uses layer=%s; diffusers' text_encoder gives the last layer.",
                _layer_mode(config),
            )
        text_sd = {k: v for k, v in sd.items() if k.startswith(CLIP_PREFIX)}
        comps["text_encoder"], extra, nested = clip_to_hf(text_sd)
        extras.update(extra)
        meta["clip_text_model_level"] = "1" if nested else "0"
        used |= set(text_sd)
    elif kind == "openclip":
        text_sd = {k: v for k, v in sd.items() if k.startswith(OPENCLIP_PREFIX)}
        n = openclip_num_layers(text_sd)
        keep = n - 1 if _layer_mode(config) == "penultimate" else n
        comps["text_encoder"], extra = openclip_to_hf(text_sd, keep_layers=keep)
        extras.update(extra)
        used |= set(text_sd)
    else:
        logger.warning("Text encoder is not CLIP/OpenCLIP: its weights go to %s only.", EXTRAS_FILE)
    if kind is not None:
        meta["text_kind"] = kind
    extras.update({k: v for k, v in sd.items() if k not in used})
    return comps, extras, meta


def to_diffusers(
    src: str | os.PathLike | LoadedCheckpoint,
    out_dir: str | os.PathLike,
    *,
    config: dict[str, Any] | str | os.PathLike | None = None,
    prediction: str | None = None,
    use_ema: bool = False,
    unsafe: bool = False,
) -> Path:
    """Write a diffusers Stable Diffusion folder from an SD/our checkpoint (EMA weights if use_ema)."""
    ckpt = (
        src
        if isinstance(src, LoadedCheckpoint)
        else read_checkpoint(src, unsafe=unsafe, verify=True)
    )
    cfg = resolve_config(ckpt, config, prediction).config
    sd = apply_ema(ckpt.state_dict) if use_ema and has_ema(ckpt.state_dict) else ckpt.state_dict
    if has_ema(ckpt.state_dict) and not use_ema:
        logger.warning(
            "%s has EMA weights; unet/ gets the trained (non-EMA) weights, as diffusers' own "
            "converter does, and the EMA copy is kept in %s. ldm's loader and txt2img use the "
            "EMA weights by default: convert with --ema use (use_ema=True) to put them in unet/.",
            ckpt.path,
            EXTRAS_FILE,
        )
    if is_sdxl_config(cfg):
        from ldm.checkpoint.convert_sdxl import write_sdxl_folder

        return write_sdxl_folder(sd, cfg, Path(out_dir))
    comps, extras, meta = split_for_diffusers(sd, cfg)
    params = cfg["model"]["params"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    unet_params = params["unet_config"]["params"]
    latent = params.get("image_size", unet_params.get("image_size", 64))
    save_component(out, "unet", comps["unet"], dcfg.unet_config(unet_params, latent))
    scale = float(sd["scale_factor"]) if "scale_factor" in sd else params.get("scale_factor", 1.0)
    save_component(
        out, "vae", comps["vae"], dcfg.vae_config(params["first_stage_config"]["params"], scale)
    )
    if "text_encoder" in comps:
        kind = meta["text_kind"]
        save_component(
            out,
            "text_encoder",
            comps["text_encoder"],
            dcfg.text_config(comps["text_encoder"], kind, _heads(cfg)),
        )
        dcfg.write_tokenizer(out / "tokenizer", kind)
    (out / "scheduler").mkdir(exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(
        json.dumps(dcfg.scheduler_config(params), indent=2)
    )
    inpainting = unet_params["in_channels"] == 9
    (out / "model_index.json").write_text(json.dumps(dcfg.model_index(inpainting), indent=2))
    (out / CONFIG_FILE).write_text(json.dumps(cfg, indent=2))
    write_extras(out, extras, meta)
    logger.info(
        "Wrote diffusers folder %s (%d extra keys kept in %s)", out, len(extras), EXTRAS_FILE
    )
    return out


def resolve_config(
    ckpt: LoadedCheckpoint, config: Any = None, prediction: str | None = None
) -> Detection:
    """The config for a checkpoint: given (path/dict) or detected."""
    if config is None:
        return detect(ckpt, prediction)
    if isinstance(config, (str, os.PathLike)):
        from omegaconf import OmegaConf

        from ldm.config import load_yaml

        cfg = OmegaConf.to_container(load_yaml(config), resolve=True)  # ConfigError if not YAML
        reason = f"config file {config}"
    else:
        from ldm.checkpoint.safe_load import _to_plain

        cfg, reason = _to_plain(config), "config given"
    cfg = as_full_config(cfg)  # type: ignore[arg-type]
    if prediction is not None:
        from ldm.checkpoint.detect import guess_parameterization

        cfg["model"].setdefault("params", {})["parameterization"] = guess_parameterization(
            None, prediction
        )[0]
    param = cfg["model"].get("params", {}).get("parameterization", "eps")
    return Detection("given", cfg, param, reason)


def is_diffusers_folder(path: str | os.PathLike) -> bool:
    """True for a folder with model_index.json and a unet/ subfolder."""
    p = Path(path)
    return p.is_dir() and (p / "model_index.json").is_file() and (p / "unet").is_dir()


def from_diffusers(
    folder: str | os.PathLike, *, unsafe: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(SD-layout state dict, our config) from a diffusers Stable Diffusion folder; ``unsafe``
    lets `.bin` weights unpickle arbitrary objects (trusted folders only)."""
    sd, detection = read_diffusers_folder(folder, unsafe=unsafe)
    return sd, detection.config


def read_diffusers_folder(
    folder: str | os.PathLike, *, unsafe: bool = False
) -> tuple[dict[str, torch.Tensor], Detection]:
    """(SD-layout state dict, how its config was found) of a diffusers folder (SD, SDXL)."""
    folder = Path(folder)
    if not is_diffusers_folder(folder):
        raise FileNotFoundError(
            f"{folder} is not a diffusers folder (model_index.json + unet/ expected)."
        )
    if diffusers_family(folder) != "sd":
        from ldm.checkpoint.convert_sdxl import from_sdxl_folder

        sd, config = from_sdxl_folder(folder, unsafe=unsafe)
        name = "embedded" if (folder / CONFIG_FILE).is_file() else diffusers_family(folder)
        return sd, _folder_detection(folder, config, name, "its SDXL config")
    unet = read_component(folder, "unet", unsafe=unsafe)
    vae = read_component(folder, "vae", unsafe=unsafe)
    if vae is None:
        raise FileNotFoundError(
            f"{folder}: no vae/ subfolder; a Stable Diffusion folder needs unet/ and vae/ "
            "(each a config.json and its weights)."
        )
    sd = {UNET_PREFIX + k: v for k, v in unet_to_ldm(unet).items()}
    sd.update({VAE_PREFIX + k: v for k, v in vae_to_ldm(vae).items()})
    extras, meta = read_extras(folder)
    text = read_component(folder, "text_encoder", unsafe=unsafe)
    if text is None and _index_lists(folder, "text_encoder"):
        raise FileNotFoundError(
            f"{folder}: model_index.json lists a text_encoder, but there is no text_encoder/ "
            "subfolder; download it with the rest of the folder."
        )
    if text is not None:
        kind = meta.get("text_kind")
        if kind is None:
            tcfg = json.loads((folder / "text_encoder" / "config.json").read_text())
            kind = "clip" if tcfg.get("hidden_act") == "quick_gelu" else "openclip"
        if kind == "clip":
            sd.update(hf_to_clip(text, nested=meta.get("clip_text_model_level", "1") == "1"))
        else:
            sd.update(hf_to_openclip(text))
    sd.update(extras)
    cfg_path = folder / CONFIG_FILE
    if cfg_path.is_file():
        config = json.loads(cfg_path.read_text())
        return sd, _folder_detection(folder, config, "embedded", f"its {CONFIG_FILE}")
    sched = _scheduler(folder)
    param = dcfg.params_from_scheduler(sched)["parameterization"]
    try:  # SD-sized: the built-in (official) config
        found = detect_sd(sd, folder, param)
        config, name, source = found.config, found.name, found.reason
    except DetectionError:
        config = dcfg.ldm_config_from_diffusers(folder)
        name, source = "diffusers-folder", "rebuilt from its component configs"
    if sched.get("rescale_betas_zero_snr"):
        config["model"].setdefault("params", {})["zero_terminal_snr"] = True
    if meta.get("text_kind") is None and any(k.startswith(OPENCLIP_PREFIX) for k in sd):
        _fill_unused_openclip_layer(sd, config)
    return sd, _folder_detection(folder, config, name, source)


def _folder_detection(folder: Path, config: dict[str, Any], name: str, source: str) -> Detection:
    param = config["model"].get("params", {}).get("parameterization", "eps")
    return Detection(name, config, param, f"diffusers folder {folder}: {source}")


def _index_lists(folder: Path, component: str) -> bool:
    """Whether model_index.json names a (non-null) ``component``."""
    entry = json.loads((folder / "model_index.json").read_text()).get(component)
    return isinstance(entry, list) and any(e is not None for e in entry)


def _scheduler(folder: Path) -> dict[str, Any]:
    """scheduler/scheduler_config.json; {} (the defaults) when the folder has none."""
    path = folder / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        logger.warning("%s: no scheduler/scheduler_config.json; using SD's schedule.", folder)
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise dcfg.ConversionError(f"{path}: not valid JSON ({err}).") from err


def _fill_unused_openclip_layer(sd: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
    """diffusers' SD 2 text encoders drop OpenCLIP's last layer (unused with layer='penultimate').

    Our FrozenOpenCLIPEmbedder keeps it, so it is filled with zeros; it never affects the output.
    """
    if _layer_mode(config) != "penultimate":
        return
    n = openclip_num_layers(sd)
    arch_layers = 24 if n == 23 else None  # ViT-H-14 text tower of SD 2.x
    if arch_layers is None:
        return
    src = f"{OPENCLIP_PREFIX}transformer.resblocks.{n - 1}."
    for k in [k for k in sd if k.startswith(src)]:
        sd[f"{OPENCLIP_PREFIX}transformer.resblocks.{n}." + k[len(src) :]] = torch.zeros_like(sd[k])
    width = sd[OPENCLIP_PREFIX + "ln_final.weight"].shape[0]
    # CLIPTextModel has no projection head: open_clip's, unused by the penultimate layer
    sd.setdefault(OPENCLIP_PREFIX + "text_projection", torch.zeros(width, width))
    sd.setdefault(OPENCLIP_PREFIX + "logit_scale", torch.tensor(math.log(1 / 0.07)))
    logger.info(
        "Filled the unused last OpenCLIP layer %d and the unused text_projection with zeros, "
        "logit_scale with open_clip's initial value (diffusers folders omit them).",
        n,
    )


def diffusers_to_checkpoint(
    folder: str | os.PathLike, dst: str | os.PathLike, *, unsafe: bool = False
) -> Path:
    """Convert a diffusers folder to our checkpoint (`.safetensors` or `.ckpt`, config embedded)."""
    sd, config = from_diffusers(folder, unsafe=unsafe)
    return save_state_dict(sd, dst, config=config)
