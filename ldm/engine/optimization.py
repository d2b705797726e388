"""The engine's optimizer and frozen parameters from ``optimizer_config`` (``ldm.optimizers``).

``freeze`` patterns are applied once the engine is built (after checkpoint loading and adapters):
the matching parameters get ``requires_grad=False``, lose their EMA shadow and are left out of
``trainable_parameters`` and so of the optimizer. Without ``optimizer_config`` nothing changes.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from ldm.optimizers import OptimizerSpec, build_optimizer
from ldm.param_groups import freeze_matching, param_names

logger = logging.getLogger(__name__)

__all__ = ["apply_freeze", "engine_optimizer", "without_frozen"]


def apply_freeze(engine: Any, spec: OptimizerSpec | None) -> list[str]:
    """Freeze ``spec.freeze``'s parameters of ``engine``; returns their names."""
    if spec is None or not spec.freeze:
        return []
    frozen = freeze_matching(engine, spec.freeze)
    dropped = engine.model_ema.drop_untrained(engine.model) if engine.use_ema else []
    cond = engine.conditioner
    if cond is not None and cond.trains:
        if not any(p.requires_grad for p in cond.trainable_parameters()):
            cond.trains = False  # all of it frozen: encode without gradients
    names = set(frozen)
    numbers = sum(p.numel() for n, p in engine.named_parameters() if n in names)
    logger.info(
        "optimizer_config.freeze: %d parameter tensors (%d numbers) frozen, %d of them had an EMA.",
        len(frozen),
        numbers,
        len(dropped),
    )
    return frozen


def without_frozen(engine: Any, params: list[nn.Parameter]) -> list[nn.Parameter]:
    """``params`` less those ``optimizer_config.freeze`` froze (unchanged without freeze, so the
    default optimizer's parameter list stays what it was)."""
    spec: OptimizerSpec | None = engine.optimizer_spec
    if spec is None or not spec.freeze:
        return params
    return [p for p in params if p.requires_grad]


def engine_optimizer(engine: Any) -> torch.optim.Optimizer:
    """The optimizer over ``engine.trainable_parameters()`` at ``engine.learning_rate``."""
    return build_optimizer(
        engine.trainable_parameters(),
        param_names(engine),
        float(engine.learning_rate),
        engine.optimizer_spec,
    )
