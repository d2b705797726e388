"""Conditioner base classes and the guard that stops frozen encoders running on random weights.

A frozen encoder (CLIP, OpenCLIP) is built offline from built-in hyperparameters with random
weights; real weights arrive later from a checkpoint. Until a state dict holding all of its keys is
loaded (directly or through a parent such as ``LatentDiffusion.load_state_dict``), ``encode``
refuses to run unless the caller opts in with ``allow_random_weights=True`` or the environment
variable ``LDM_ALLOW_RANDOM_WEIGHTS=1``.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

ALLOW_RANDOM_ENV = "LDM_ALLOW_RANDOM_WEIGHTS"
_TRUE = {"1", "true", "yes", "on"}


def random_weights_allowed(flag: bool = False) -> bool:
    """True when ``flag`` is set or the environment variable ``LDM_ALLOW_RANDOM_WEIGHTS`` is truthy."""
    return bool(flag) or os.environ.get(ALLOW_RANDOM_ENV, "").strip().lower() in _TRUE


def disabled_train(self: nn.Module, mode: bool = True) -> nn.Module:
    """Replacement for ``nn.Module.train`` that keeps a frozen module in eval mode (CompVis)."""
    return self


class AbstractEncoder(nn.Module):
    """Conditioner interface (CompVis): ``encode(x)`` is ``forward(x)``."""

    def encode(self, *args: Any, **kwargs: Any) -> Any:
        """Conditioning for the input; same as calling the module."""
        return self(*args, **kwargs)


class IdentityEncoder(AbstractEncoder):
    """Pass-through conditioner (Stability ``IdentityEncoder``)."""

    def forward(self, x: Any) -> Any:
        """Return ``x`` unchanged."""
        return x


def _guard_pre_hook(
    module: FrozenWeightsMixin,
    state_dict: dict[str, Any],
    prefix: str,
    *args: Any,
) -> None:
    """Remap legacy keys, then mark the encoder loaded when the state dict holds all its keys."""
    module._remap_state_dict(state_dict, prefix)
    required = module._required_state_keys()
    present = [k for k in required if prefix + k in state_dict]
    if required and len(present) == len(required):
        module.weights_loaded = True
    elif present:
        logger.warning(
            "%s: the loaded state dict holds %d of its %d weights under '%s'; the encoder stays "
            "marked as not loaded.",
            type(module).__name__,
            len(present),
            len(required),
            prefix,
        )


class FrozenWeightsMixin(nn.Module):
    """Tracks whether real weights were loaded; frozen modules stay in eval mode without grads."""

    weights_loaded: bool = False

    def _setup_guard(self, freeze: bool, allow_random_weights: bool) -> None:
        self.frozen = bool(freeze)
        self.allow_random_weights = bool(allow_random_weights)
        self.weights_loaded = False
        self._required_keys_cache: tuple[str, ...] | None = None
        self.register_load_state_dict_pre_hook(_guard_pre_hook)
        if self.frozen:
            self.freeze()

    # subclasses override these two
    def _remap_state_dict(self, state_dict: dict[str, Any], prefix: str) -> None:
        """Rename keys of older checkpoint layouts in place (``prefix`` = this module's prefix)."""

    def _optional_state_keys(self) -> set[str]:
        """State keys that do not influence ``encode`` and need not be present to count as loaded."""
        return set()

    def _required_state_keys(self) -> tuple[str, ...]:
        if self._required_keys_cache is None:
            optional = self._optional_state_keys()
            keys = [k for k in self.state_dict(keep_vars=True) if k not in optional]
            self._required_keys_cache = tuple(keys)
        return self._required_keys_cache

    def freeze(self) -> None:
        """Eval mode and ``requires_grad=False`` for every parameter (CompVis ``freeze``)."""
        self.frozen = True
        super().train(False)
        for p in self.parameters():
            p.requires_grad = False

    def train(self, mode: bool = True) -> nn.Module:
        """Frozen encoders ignore ``train(True)`` and stay in eval mode (no dropout, no updates)."""
        return super().train(False if getattr(self, "frozen", False) else mode)

    def mark_weights_loaded(self, loaded: bool = True) -> None:
        """Declare the current weights real (e.g. after filling them by hand)."""
        self.weights_loaded = bool(loaded)

    def check_weights_loaded(self) -> None:
        """Raise if this frozen encoder would run on weights that were never loaded."""
        if (
            not self.frozen
            or self.weights_loaded
            or random_weights_allowed(self.allow_random_weights)
        ):
            return
        raise RuntimeError(
            f"{type(self).__name__} ({self._describe()}) refuses to encode: its weights were never "
            "loaded, so its output would be random. Do one of: load a checkpoint that contains the "
            "text encoder (a full Stable Diffusion .ckpt/.safetensors through "
            "model.load_state_dict or ckpt_path=...); pass a local weights path "
            f"({self._weights_hint()}); or, for tests only, pass allow_random_weights=True or set "
            f"the environment variable {ALLOW_RANDOM_ENV}=1."
        )

    def _describe(self) -> str:
        return "text encoder"

    def _weights_hint(self) -> str:
        return "weights=<file or directory>"

    def _module_device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        return torch.device("cpu")


def load_weights_file(path: str) -> dict[str, torch.Tensor]:
    """State dict from a ``.safetensors`` or torch file (``state_dict`` key unwrapped), safely."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ValueError(
            f"'{path}': expected a state dict (mapping of names to tensors), found {type(obj).__name__}."
        )
    return obj


def strip_prefixes(state_dict: dict[str, Any], prefixes: tuple[str, ...]) -> dict[str, Any]:
    """Keys under the first of ``prefixes`` that any key starts with, with that prefix removed."""
    for prefix in prefixes:
        if prefix and any(k.startswith(prefix) for k in state_dict):
            return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    return dict(state_dict)
