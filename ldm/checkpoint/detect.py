"""Architecture detection from checkpoint keys/shapes: SD v1, SD v2 (eps | v), inpainting, SDXL
base / refiner, ours.

Facts used (shared/reference/README.md): v1 cross-attention keys are `[C, 768]`, v2 `[C, 1024]`;
v2 uses linear `proj_in` (2-D) where v1 uses 1x1 convs (4-D); inpainting U-Nets take 9 input
channels. Whether a v2 file predicts eps or v is not in its keys: it comes from an argument or the
file name ("768-v", "v-pred"), else eps, and the choice is logged. SDXL files have a conditioner
(`conditioner.embedders.*`) and a vector embedding (`label_emb.0.0.weight`, [1280, adm]): base 1.0
takes adm 2816 and context 2048 (CLIP ViT-L + OpenCLIP bigG), refiner 1.0 adm 2560 and context 1280
(bigG only); see shared/reference/later/README.md.
"""

from __future__ import annotations

import copy
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ldm.checkpoint.safe_load import CONFIG_KEY, LoadedCheckpoint
from ldm.checkpoint.sdxl_layout import EMBEDDERS, VECTOR_KEY, is_sdxl_state_dict

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "stable-diffusion"
BUILTIN_CONFIGS = {
    "sd-v1": "v1-inference.yaml",
    "sd-v1-inpainting": "v1-inpainting-inference.yaml",
    "sd-v2": "v2-inference.yaml",
    "sd-v2-v": "v2-inference-v.yaml",
    "sd-v2-inpainting": "v2-inpainting-inference.yaml",
    "sdxl-base": "sdxl-base.yaml",
    "sdxl-refiner": "sdxl-refiner.yaml",
}
# What tells SDXL base 1.0 and refiner 1.0 apart: vector input, context dims, time_embed.0 shape,
# text embedders (index, `transformer` = CLIP | `model` = OpenCLIP).
SDXL_SHAPES = {
    "sdxl-base": (2816, (2048,), (1280, 320), ((0, "transformer"), (1, "model"))),
    "sdxl-refiner": (2560, (1280,), (1536, 384), ((0, "model"),)),
}
# model_index.json `_class_name` of diffusers SDXL folders
SDXL_PIPELINES = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline")
UNET_IN = "model.diffusion_model.input_blocks.0.0.weight"
UNET_TIME = "model.diffusion_model.time_embed.0.weight"
# file names of v-prediction releases: 768-v-ema.ckpt, v2-1_768-ema-pruned (768 => v), *-v-pred*
_V_NAME = re.compile(r"(768-v|(^|[-_.])v[-_]pred|vpred|v-prediction|(^|[-_])v-|2-1_768|2\.1-768)")


class DetectionError(ValueError):
    """The checkpoint's architecture could not be determined; pass a config."""


@dataclass
class Detection:
    """What a checkpoint is, the config that builds it, and why we think so."""

    # "sd-v1", "sd-v2", "sd-v2-v", "sd-v1-inpainting", "sd-v2-inpainting", "embedded" (a config in
    # the file or folder), "sdxl-base" / "sdxl-refiner" / "diffusers-folder" (a foreign folder)
    name: str
    config: dict[str, Any]  # full config with a `model` section
    parameterization: str  # "eps" | "v" | "x0"
    reason: str


def load_builtin_config(name: str) -> dict[str, Any]:
    """A built-in config (configs/stable-diffusion/*.yaml) as a plain dict."""
    from omegaconf import OmegaConf

    path = CONFIG_DIR / BUILTIN_CONFIGS[name]
    if not path.is_file():
        raise FileNotFoundError(f"Built-in config {path} is missing; reinstall or pass --config.")
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)  # type: ignore[return-value]


def as_full_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """Accept `{model: {...}}` or a bare `{target, params}` model config; return `{model: ...}`."""
    if "model" in cfg and isinstance(cfg["model"], dict):
        return cfg
    if "target" in cfg:
        return {"model": cfg}
    raise DetectionError(
        f"Config has neither a `model` section nor a `target`: keys {sorted(cfg)}."
    )


def _from_hyper_parameters(hp: Any) -> dict[str, Any] | None:
    """Rebuild a model config from Lightning `hyper_parameters` when they hold one."""
    from ldm.checkpoint.safe_load import _to_plain

    hp = _to_plain(hp)
    if not isinstance(hp, dict):
        return None
    for key in ("config", "cfg", CONFIG_KEY):  # a whole config passed to the module
        if isinstance(hp.get(key), dict):
            try:
                return as_full_config(hp[key])
            except DetectionError:
                pass
    if "model" in hp or "target" in hp:
        try:
            return as_full_config(hp)
        except DetectionError:
            return None
    if "unet_config" in hp and "first_stage_config" in hp:  # LatentDiffusion.save_hyperparameters
        params = {k: v for k, v in hp.items() if not k.startswith("_")}
        in_ch = (params["unet_config"].get("params") or {}).get("in_channels")
        hybrid = params.get("conditioning_key") == "hybrid" and in_ch == 9
        cls = "LatentInpaintDiffusion" if hybrid else "LatentDiffusion"
        return {"model": {"target": f"ldm.models.diffusion.ddpm.{cls}", "params": params}}
    return None


def guess_parameterization(
    path: str | Path | None, prediction: str | None = None
) -> tuple[str, str]:
    """(parameterization, reason): explicit argument, else the file name, else eps."""
    if prediction is not None:
        value = {"epsilon": "eps", "v_prediction": "v"}.get(prediction, prediction)
        if value not in ("eps", "v", "x0"):
            raise ValueError(f"prediction must be 'eps', 'v' or 'x0', got {prediction!r}.")
        return value, f"prediction={value!r} given"
    name = Path(path).name.lower() if path is not None else ""
    if name and _V_NAME.search(name):
        return "v", f"file name {name!r} marks a v-prediction model"
    return "eps", "eps by default (v2 eps vs v is not in the keys; pass prediction='v' for 768-v)"


def _shape(sd: dict[str, torch.Tensor], key: str) -> tuple[int, ...] | None:
    t = sd.get(key)
    return tuple(t.shape) if t is not None else None


def context_dims(state_dict: dict[str, torch.Tensor]) -> tuple[int, ...]:
    """The U-Net's cross-attention context widths (the inputs of its `attn2.to_k` layers)."""
    return tuple(
        sorted(
            {
                int(v.shape[1])
                for k, v in state_dict.items()
                if k.startswith("model.diffusion_model.")
                and k.endswith("attn2.to_k.weight")
                and v.ndim == 2
            }
        )
    )


def detect_sd(
    state_dict: dict[str, torch.Tensor],
    path: str | Path | None = None,
    prediction: str | None = None,
) -> Detection:
    """Detect SD v1 / v2 / inpainting / SDXL base / SDXL refiner from the keys of a state dict."""
    if is_sdxl_state_dict(state_dict):
        return detect_sdxl(state_dict)
    in_shape = _shape(state_dict, UNET_IN)
    if in_shape is None:
        from ldm.checkpoint.file_kinds import not_a_model_hint

        prefixes = sorted({k.split(".")[0] for k in state_dict})[:8]
        hint = not_a_model_hint(state_dict)
        where = f"{path}: " if path is not None else ""
        raise DetectionError(
            f"{where}no `{UNET_IN}` in the checkpoint (top-level prefixes: {prefixes}). "
            + (
                hint
                or "It is not a Stable Diffusion checkpoint and embeds no config. Pass "
                "config=<yaml> (--config)."
            )
        )
    time_shape = _shape(state_dict, UNET_TIME)
    ctx_dims = set(context_dims(state_dict))
    proj_ndim = {
        v.ndim
        for k, v in state_dict.items()
        if k.startswith("model.diffusion_model.") and k.endswith("proj_in.weight")
    }
    if time_shape != (1280, 320) or len(ctx_dims) != 1 or len(in_shape) != 4:
        raise DetectionError(
            f"U-Net shapes do not match SD v1/v2 (time_embed {time_shape}, context dims "
            f"{sorted(ctx_dims)}); pass config=<yaml> (--config) for this architecture."
        )
    ctx = ctx_dims.pop()
    in_ch = in_shape[1]
    if ctx == 768 and proj_ndim == {4}:
        family = "sd-v1"
    elif ctx == 1024 and proj_ndim == {2}:
        family = "sd-v2"
    else:
        raise DetectionError(
            f"Cross-attention context dim {ctx} with proj_in of {sorted(proj_ndim)} dims is neither "
            "SD v1 (768, conv) nor SD v2 (1024, linear); pass config=<yaml> (--config)."
        )
    if in_ch not in (4, 9):
        raise DetectionError(f"U-Net has {in_ch} input channels; SD has 4 (or 9 for inpainting).")
    param, why = guess_parameterization(path, prediction)
    name = family + ("-inpainting" if in_ch == 9 else "")
    builtin = name + ("-v" if name == "sd-v2" and param == "v" else "")
    cfg = copy.deepcopy(load_builtin_config(builtin))
    params = cfg["model"]["params"]
    if param == "eps":
        params.pop("parameterization", None)
    else:
        params["parameterization"] = param
    reason = f"{name}: context dim {ctx}, {in_ch} input channels; {why}"
    logger.info("Detected %s (parameterization %s: %s)", name, param, why)
    return Detection(name if param == "eps" else f"{name}-{param}", cfg, param, reason)


def detect_sdxl(state_dict: dict[str, torch.Tensor]) -> Detection:
    """SDXL base 1.0 or refiner 1.0 from the U-Net and conditioner keys; else DetectionError."""
    vector = _shape(state_dict, VECTOR_KEY)
    ctx = context_dims(state_dict)
    time_shape = _shape(state_dict, UNET_TIME)
    embedders = tuple(
        sorted(
            {
                (int(m.group(1)), m.group(2))
                for k in state_dict
                if (m := re.match(re.escape(EMBEDDERS) + r"(\d+)\.(transformer|model)\.", k))
            }
        )
    )
    found = (vector[1] if vector and len(vector) == 2 else vector, ctx, time_shape, embedders)
    for name, expected in SDXL_SHAPES.items():
        if found == expected:
            cfg = copy.deepcopy(load_builtin_config(name))
            reason = (
                f"{name}: vector embedding input {found[0]}, context dim {ctx[0]}, "
                f"text embedders {[f'{i}.{s}' for i, s in embedders]}"
            )
            logger.info("Detected %s", reason)
            return Detection(name, cfg, "eps", reason)
    raise DetectionError(
        "The checkpoint looks like SDXL (`conditioner.embedders.*` / `label_emb.0.0.weight`) but "
        f"matches neither SDXL base 1.0 nor refiner 1.0. Found: vector embedding input (adm) "
        f"{found[0]}, cross-attention context dims {list(ctx)}, time_embed.0 {time_shape}, text "
        f"embedders {[f'{i}.{s}' for i, s in embedders]}; expected base: adm 2816, context 2048, "
        "time_embed.0 (1280, 320), embedders 0.transformer + 1.model; refiner: adm 2560, context "
        "1280, time_embed.0 (1536, 384), embedder 0.model. Pass config=<yaml> (--config) for this "
        "architecture."
    )


def diffusers_family(folder: str | Path) -> str:
    """'sdxl-base' / 'sdxl-refiner' for a diffusers SDXL folder, 'sd' for any other pipeline.

    Read from model_index.json: `StableDiffusionXLPipeline` is the base; the img2img pipeline is
    the refiner when it has no first `text_encoder` (the refiner's layout), else the base.
    """
    import json

    index_path = Path(folder) / "model_index.json"
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError) as err:
        raise DetectionError(
            f"{index_path}: cannot read the diffusers model_index.json ({err}); a diffusers "
            "folder needs one."
        ) from err
    cls = index.get("_class_name", "")
    if cls not in SDXL_PIPELINES:
        return "sd"
    text = index.get("text_encoder") or [None, None]
    if cls == "StableDiffusionXLImg2ImgPipeline" and text[-1] is None:
        return "sdxl-refiner"
    return "sdxl-base"


def find_run_config(path: str | Path) -> Path | None:
    """`<run>/configs/*-project.yaml` for `<run>/checkpoints/<file>` (the CompVis/our run layout)."""
    path = Path(path)
    if path.parent.name != "checkpoints":
        return None
    found = sorted((path.parent.parent / "configs").glob("*-project.yaml"))
    return found[-1] if found else None


def detect(ckpt: LoadedCheckpoint, prediction: str | None = None) -> Detection:
    """Embedded config (ours) > Lightning hyper_parameters > the run's saved config > SD keys."""
    embedded = ckpt.embedded_config
    if embedded is not None:
        cfg = as_full_config(embedded)
        if prediction is not None:
            cfg["model"].setdefault("params", {})["parameterization"] = guess_parameterization(
                None, prediction
            )[0]
        param = cfg["model"].get("params", {}).get("parameterization", "eps")
        return Detection(
            "embedded", cfg, param, f"config embedded in the file under `{CONFIG_KEY}`"
        )
    hp = ckpt.extras.get("hyper_parameters")
    if hp is not None:
        cfg = _from_hyper_parameters(hp)
        if cfg is not None:
            param = cfg["model"].get("params", {}).get("parameterization", "eps")
            return Detection(
                "hyper_parameters", cfg, param, "config rebuilt from Lightning hyper_parameters"
            )
    run_cfg = find_run_config(ckpt.path)
    if run_cfg is not None:
        from omegaconf import OmegaConf

        cfg = as_full_config(OmegaConf.to_container(OmegaConf.load(run_cfg), resolve=True))  # type: ignore[arg-type]
        if prediction is not None:
            cfg["model"].setdefault("params", {})["parameterization"] = guess_parameterization(
                None, prediction
            )[0]
        param = cfg["model"].get("params", {}).get("parameterization", "eps")
        return Detection("run-config", cfg, param, f"the run's saved config {run_cfg}")
    return detect_sd(ckpt.state_dict, ckpt.path, prediction)
