"""Frozen sub-models (first stage, a frozen cond stage): eval mode for good, no gradients."""

from __future__ import annotations

import functools

from torch import nn


def disabled_train(self: nn.Module, mode: bool = True) -> nn.Module:
    """Replacement for `.train()` on frozen sub-models so they stay in eval mode (CompVis)."""
    return self


def freeze(module: nn.Module) -> nn.Module:
    """Eval mode for good (``.train()`` becomes a no-op), no gradients."""
    module = module.eval()
    module.train = functools.partial(disabled_train, module)
    for param in module.parameters():
        param.requires_grad = False
    return module
