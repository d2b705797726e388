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
    inner: nn.Module,
    state_dict: dict[str, Any],
    prefix: str,
    *args: Any,
) -> None:
    """Remap legacy keys, then mark the weights loaded when the state dict holds all of them.

    Registered on the encoder's inner model (``transformer`` / ``model``), so it fires whether the
    weights arrive through the encoder, a parent (``LatentDiffusion``) or the inner model itself.
    Everything it needs is stored on the inner module, which keeps it picklable and deep-copyable.
    """
    guard = inner._ldm_guard
    if guard.get("remap") is not None:
        guard["remap"](inner, state_dict, prefix)
    required = [k for k in inner.state_dict(keep_vars=True) if k not in guard["optional"]]
    present = [k for k in required if prefix + k in state_dict]
    if required and len(present) == len(required):
        guard["loaded"] = True
    elif present:
        logger.warning(
            "%s: the loaded state dict holds %d of its %d weights under '%s'; the encoder stays "
            "marked as not loaded.",
            guard["owner"],
            len(present),
            len(required),
            prefix,
        )


def _constant_buffer(name: str, like: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    """Value of a known non-persistent constant buffer (absent from checkpoints)."""
    if name.endswith("position_ids"):  # transformers CLIP: [[0, 1, ..., L-1]]
        return torch.arange(like.shape[-1], device=device).expand(like.shape).clone()
    if name.endswith("attn_mask"):  # open_clip causal mask: -inf above the diagonal
        return torch.full(like.shape, float("-inf"), dtype=like.dtype, device=device).triu_(1)
    return None


def _materialize_post_hook(inner: nn.Module, incompatible_keys: Any) -> None:
    """After ``load_state_dict(..., assign=True)`` into a meta-built model, rebuild constant buffers."""
    devices = [p.device for p in inner.parameters() if not p.is_meta]
    if not devices or any(p.is_meta for p in inner.parameters()):
        return
    for name, buf in list(inner.named_buffers()):
        if buf is None or not buf.is_meta:
            continue
        value = _constant_buffer(name, buf, devices[0])
        if value is None:
            logger.warning(
                "%s: buffer '%s' is still on the meta device", type(inner).__name__, name
            )
            continue
        owner_path, _, leaf = name.rpartition(".")
        inner.get_submodule(owner_path)._buffers[leaf] = value


class FrozenWeightsMixin(nn.Module):
    """Tracks whether real weights were loaded; frozen modules stay in eval mode without grads."""

    def _setup_guard(
        self,
        inner: nn.Module,
        freeze: bool,
        allow_random_weights: bool,
        optional_keys: set[str] | None = None,
        remap: Any = None,
    ) -> None:
        """Install the guard on ``inner``; ``remap(inner, state_dict, prefix)`` renames old keys."""
        self.frozen = bool(freeze)
        self.allow_random_weights = bool(allow_random_weights)
        inner._ldm_guard = {
            "loaded": False,
            "optional": frozenset(optional_keys or ()),
            "remap": remap,
            "owner": type(self).__name__,
        }
        self._guarded_name = next(n for n, m in self.named_children() if m is inner)
        inner.register_load_state_dict_pre_hook(_guard_pre_hook)
        inner.register_load_state_dict_post_hook(_materialize_post_hook)
        if self.frozen:
            self.freeze()

    @property
    def weights_loaded(self) -> bool:
        """Whether real weights were loaded (a state dict with all keys, a local file or the hub)."""
        return bool(getattr(self, self._guarded_name)._ldm_guard["loaded"])

    @weights_loaded.setter
    def weights_loaded(self, value: bool) -> None:
        getattr(self, self._guarded_name)._ldm_guard["loaded"] = bool(value)

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
