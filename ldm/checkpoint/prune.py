"""Prune a training checkpoint to the weights: no optimizer state, optional EMA-only, optional fp16."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from ldm.checkpoint.ema import apply_ema, has_ema, strip_ema
from ldm.checkpoint.safe_load import CONFIG_KEY, read_checkpoint

logger = logging.getLogger(__name__)


def to_saveable(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous tensors with no shared storage (safetensors refuses aliasing)."""
    seen: set[int] = set()
    out: dict[str, torch.Tensor] = {}
    for k, v in state_dict.items():
        v = v.detach()
        if v.device.type == "meta":
            raise ValueError(f"{k} is on the meta device; materialize the weights before saving.")
        ptr = v.untyped_storage().data_ptr()
        if (
            ptr in seen
            or not v.is_contiguous()
            or v.numel() != v.untyped_storage().nbytes() // max(v.element_size(), 1)
        ):
            v = v.contiguous().clone()  # own storage: no aliasing, no slack
        seen.add(v.untyped_storage().data_ptr())
        out[k] = v
    return out


def save_state_dict(
    state_dict: dict[str, torch.Tensor],
    path: str | os.PathLike,
    *,
    config: dict[str, Any] | None = None,
    extras: dict[str, Any] | None = None,
) -> Path:
    """Write `.safetensors` (config as JSON metadata `ldm_config`) or `.ckpt` (`state_dict` + `ldm_config`)."""
    from ldm.atomic_output import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        _write(state_dict, path.suffix, tmp, config, extras)
    return path


def _write(
    state_dict: dict[str, torch.Tensor],
    suffix: str,
    path: Path,
    config: dict[str, Any] | None,
    extras: dict[str, Any] | None,
) -> None:
    if suffix.lower() == ".safetensors":
        from safetensors.torch import save_file

        meta = {"format": "pt"}
        if config is not None:
            meta[CONFIG_KEY] = json.dumps(config)
        for k, v in (extras or {}).items():
            if isinstance(v, (int, float, str)):
                meta[k] = str(v)
            elif isinstance(v, dict):
                meta[k] = json.dumps(v)
        save_file(to_saveable(state_dict), str(path), metadata=meta)
    else:
        obj: dict[str, Any] = dict(extras or {})
        obj["state_dict"] = state_dict
        if config is not None:
            obj[CONFIG_KEY] = config
        with open(path, "wb") as f:  # a Python file: a full disk raises OSError(ENOSPC)
            torch.save(obj, f)


def prune_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    fp16: bool = False,
    ema: str = "auto",
    unsafe: bool = False,
) -> Path:
    """Keep only weights (+ our config); `ema`: 'auto'/'use' (EMA-only model), 'keep', 'drop'."""
    if ema not in ("auto", "use", "keep", "drop"):
        raise ValueError(f"ema must be 'auto', 'use', 'keep' or 'drop', got {ema!r}.")
    ckpt = read_checkpoint(src, unsafe=unsafe, verify=True)
    sd = ckpt.state_dict
    if ema in ("auto", "use") and has_ema(sd):
        sd = apply_ema(sd)
    elif ema == "use":
        raise ValueError(f"{src} has no EMA weights (no `model_ema.*` keys); use ema='drop'.")
    elif ema == "drop":
        sd = strip_ema(sd)
    if fp16:
        sd = {
            k: v.half() if v.dtype in (torch.float32, torch.float64, torch.bfloat16) else v
            for k, v in sd.items()
        }
    config = ckpt.embedded_config
    if config is None:
        from ldm.checkpoint.detect import _from_hyper_parameters

        hp = ckpt.extras.get("hyper_parameters")
        config = _from_hyper_parameters(hp) if hp is not None else None
    keep = ("global_step", "epoch", "sampling_defaults")
    extras = {k: ckpt.extras[k] for k in keep if k in ckpt.extras}
    if "sampling_defaults" in ckpt.metadata:
        extras["sampling_defaults"] = json.loads(ckpt.metadata["sampling_defaults"])
    dropped = sorted(k for k in ckpt.extras if k not in extras and k != CONFIG_KEY)
    if dropped:
        logger.info("Pruned away: %s", ", ".join(dropped))
    return save_state_dict(sd, dst, config=config, extras=extras)
