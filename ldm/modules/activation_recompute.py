"""Activation recomputation ("gradient checkpointing", Chen et al. 2016, "Training Deep Nets with
Sublinear Memory Cost"): keep a block's inputs, recompute its activations in backward.

Not to be confused with checkpoint files (:mod:`ldm.checkpoint`) or resuming interrupted training
(:mod:`ldm.fault_tolerance`). The function keeps the name ``checkpoint`` that CompVis code and
``torch.utils.checkpoint`` use.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint as _torch_checkpoint


def checkpoint(fn: Callable[..., Any], *args: Any, enabled: bool = True) -> Any:
    """Run fn(*args), recomputing activations in backward when enabled and gradients are on."""
    if enabled and torch.is_grad_enabled():
        return _torch_checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)
