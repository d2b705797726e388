"""Checkpoints: safe loading, architecture detection, key reports, EMA, pruning, diffusers conversion."""

from ldm.checkpoint.convert import diffusers_to_checkpoint, from_diffusers, to_diffusers
from ldm.checkpoint.detect import Detection, DetectionError, detect
from ldm.checkpoint.ema import apply_ema, has_ema
from ldm.checkpoint.loader import load_model
from ldm.checkpoint.prune import prune_checkpoint, save_state_dict
from ldm.checkpoint.report import CheckpointMismatchError, KeyReport
from ldm.checkpoint.safe_load import (
    CONFIG_KEY,
    UnsafeCheckpointError,
    load_state_dict,
    read_checkpoint,
)

__all__ = [
    "CONFIG_KEY",
    "CheckpointMismatchError",
    "Detection",
    "DetectionError",
    "KeyReport",
    "UnsafeCheckpointError",
    "apply_ema",
    "detect",
    "diffusers_to_checkpoint",
    "from_diffusers",
    "has_ema",
    "load_model",
    "load_state_dict",
    "prune_checkpoint",
    "read_checkpoint",
    "save_state_dict",
    "to_diffusers",
]
