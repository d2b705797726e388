"""Optimizer construction shared by the models."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

FUSED_DEVICE_TYPES = ("cpu", "cuda")


def can_fuse(params: list[torch.nn.Parameter]) -> bool:
    """True when PyTorch's fused Adam(W) kernel applies: floating params, all on one cpu/cuda device."""
    if not params:
        return False
    devices = {p.device for p in params}
    return (
        len(devices) == 1
        and next(iter(devices)).type in FUSED_DEVICE_TYPES
        and all(p.is_floating_point() for p in params)
    )


def adamw(
    params: Iterable[torch.nn.Parameter] | Iterable[dict[str, Any]], lr: float, **kwargs: Any
) -> torch.optim.AdamW:
    """AdamW, with the fused kernel where it applies (one kernel instead of a loop over tensors:
    the per-tensor loop is a sizeable share of a small model's step on a CPU). ``params``: the
    parameters, or param groups (dicts with ``params``)."""
    params = list(params)
    flat = (
        [p for g in params for p in g["params"]]
        if params and isinstance(params[0], dict)
        else params
    )
    if "fused" not in kwargs and "foreach" not in kwargs and can_fuse(flat):
        kwargs["fused"] = True
    return torch.optim.AdamW(params, lr=lr, **kwargs)
