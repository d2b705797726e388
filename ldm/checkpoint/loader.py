"""`ldm.load_model`: a ready-to-sample model from a checkpoint file or diffusers folder, offline."""

from __future__ import annotations

import copy
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ldm.checkpoint.convert import is_diffusers_folder, read_diffusers_folder, resolve_config
from ldm.checkpoint.detect import DetectionError
from ldm.checkpoint.ema import apply_ema, has_ema, strip_ema
from ldm.checkpoint.lazy_build import assign_weights, parameters_on_meta
from ldm.checkpoint.report import load_checked
from ldm.checkpoint.safe_load import CheckpointFormatError, LoadedCheckpoint, read_checkpoint
from ldm.util import file_hash  # noqa: F401  (re-exported: commands and tests import it here)

logger = logging.getLogger(__name__)

# CLIP text encoders: `cond_stage_model.transformer.` (SD v1) and `conditioner.embedders.N.transformer.`
# (SDXL); OpenCLIP keys (`....model.transformer.resblocks`) do not match
_CLIP_TEXT = re.compile(r"^(cond_stage_model\.|conditioner\.embedders\.\d+\.)transformer\.")
_LEVEL = "text_model."


def default_device() -> torch.device:
    """cuda if available, else mps, else cpu."""
    if torch.cuda.is_available():
        return torch.device(torch.cuda.current_device())
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _clip_prefixes(keys: Any) -> set[str]:
    return {m.group(0) for k in keys if (m := _CLIP_TEXT.match(k))}


def _layout(keys: set[str], prefix: str) -> tuple[bool, bool]:
    """(has nested `text_model.` keys, has flat keys) under a CLIP prefix."""
    under = [k[len(prefix) :] for k in keys if k.startswith(prefix)]
    return any(r.startswith(_LEVEL) for r in under), any(not r.startswith(_LEVEL) for r in under)


def match_clip_layout(sd: dict[str, torch.Tensor], model_keys: set[str]) -> dict[str, torch.Tensor]:
    """Add/remove the `text_model.` level of CLIP text keys to match the model (old/new layouts),
    for every CLIP prefix (`cond_stage_model.transformer.`, `conditioner.embedders.N.transformer.`)."""
    file_keys = set(sd)
    for prefix in _clip_prefixes(file_keys) & _clip_prefixes(model_keys):
        file_nested, file_flat = _layout(file_keys, prefix)
        model_nested, model_flat = _layout(model_keys, prefix)
        nested = prefix + _LEVEL
        if file_flat and not file_nested and model_nested:
            sd = {
                (nested + k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in sd.items()
            }
        elif file_nested and model_flat and not model_nested:
            sd = {
                (prefix + k[len(nested) :] if k.startswith(nested) else k): v for k, v in sd.items()
            }
    return sd


def _strip_ckpt_paths(cfg: Any) -> Any:
    """Drop `ckpt_path` entries so building the model does not read other files."""
    if isinstance(cfg, dict):
        return {k: _strip_ckpt_paths(v) for k, v in cfg.items() if k != "ckpt_path"}
    if isinstance(cfg, list):
        return [_strip_ckpt_paths(v) for v in cfg]
    return cfg


def recorded_sampling_defaults(ckpt: LoadedCheckpoint, config: Any) -> dict[str, Any]:
    """The sampler, steps and guidance a checkpoint was evaluated with: saved with the weights
    (``sampling_defaults``), else, for runs made before they were, read off the run's embedded
    config or its run directory (the judged evaluation, the launch's Lightning config)."""
    import json

    from ldm.engine.defaults import (
        check_sampling_defaults,
        defaults_from_config,
        defaults_from_run_dir,
    )

    where = f"{ckpt.path}: sampling_defaults"
    if ckpt.extras.get("sampling_defaults"):
        return check_sampling_defaults(ckpt.extras["sampling_defaults"], where)
    if "sampling_defaults" in ckpt.metadata:
        return check_sampling_defaults(json.loads(ckpt.metadata["sampling_defaults"]), where)
    return defaults_from_config(ckpt.embedded_config or {}) or defaults_from_run_dir(ckpt.path)


def build_model(config: dict[str, Any], lazy: bool = False) -> nn.Module:
    """Instantiate the `model` section of a config for inference (no EMA copy, no ckpt_path);
    ``lazy``: parameters on the meta device, to be filled by ``assign_weights``."""
    import inspect

    from ldm.util import get_obj_from_str, instantiate_from_config

    model_cfg = _strip_ckpt_paths(copy.deepcopy(config["model"]))
    cls = get_obj_from_str(model_cfg["target"])
    accepts = inspect.signature(cls.__init__).parameters
    from ldm.engine.engine import DiffusionEngine

    if "use_ema" in accepts or (isinstance(cls, type) and issubclass(cls, DiffusionEngine)):
        # EMA weights are applied by the loader, not kept as a second copy
        model_cfg.setdefault("params", {})["use_ema"] = False
    if not lazy:
        return instantiate_from_config(model_cfg)
    with parameters_on_meta():
        return instantiate_from_config(model_cfg)


def load_model(
    path: str | os.PathLike,
    config: Any = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    use_ema: bool | None = None,
    *,
    prediction: str | None = None,
    unsafe: bool = False,
) -> nn.Module:
    """Build and load a model: config given or detected (SD v1/v2/inpainting/ours); EMA if present.

    `use_ema=None` uses the EMA weights when the file has them; `prediction` ('eps' | 'v') decides
    SD v2 eps vs v when neither the config nor the file name does.
    """
    folder_detection = None
    if is_diffusers_folder(path):
        sd, folder_detection = read_diffusers_folder(path, unsafe=unsafe)
        ckpt = LoadedCheckpoint(Path(path), sd, {"ldm_config": folder_detection.config}, {})
    else:
        ckpt = read_checkpoint(path, unsafe=unsafe)
    if ckpt.extras.get("adapter"):
        raise DetectionError(
            f"{path} is a checkpoint of an adapter run ({ckpt.extras['adapter'].get('type')}): "
            "it holds only the adapter's weights. Load the base model it was trained on and apply "
            "the run's exported file: --lora <run>/adapters/<name>.safetensors or --embedding "
            "<run>/adapters/<token>.pt (generate(loras=..., embeddings=...))."
        )
    if folder_detection is not None and config is None and prediction is None:
        detection = folder_detection
    else:
        detection = resolve_config(ckpt, config, prediction)
    logger.info("Model config: %s", detection.reason)
    sd = ckpt.state_dict
    if use_ema is None:
        use_ema = has_ema(sd)
    if use_ema:
        if not has_ema(sd):
            raise CheckpointFormatError(
                f"{path}: no EMA weights (no `model_ema.*` keys), but use_ema=True (--use-ema) "
                "asks for them. Leave out --use-ema."
            )
        sd = apply_ema(sd)
    else:
        sd = strip_ema(sd)
    model = build_model(detection.config, lazy=True)
    sd = match_clip_layout(sd, set(model.state_dict()))
    ckpt.state_dict = {}  # the weights now live in `sd` only (they move into the model)
    load_checked(model, sd, source=str(path), load=assign_weights)
    model.eval()
    model.requires_grad_(False)
    model.to(device=torch.device(device) if device is not None else None, dtype=dtype)
    model.sampling_defaults = recorded_sampling_defaults(ckpt, detection.config)
    model.checkpoint_info = {  # type: ignore[attr-defined]
        "path": str(path),
        "detected": detection.name,
        "parameterization": detection.parameterization,
        "reason": detection.reason,
        "use_ema": bool(use_ema),
        "config": detection.config,
    }
    return model
