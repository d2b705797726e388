"""Tensors derived from a module's weights (transformed, fused, packed), cached for inference.

``DerivedWeights.get(owner, weights, tag, build)`` returns ``build()``'s result and reuses it
while every weight in ``weights`` is unchanged: the same tensor, storage and version counter (an
in-place edit, ``load_state_dict``, ``.to()`` or a new Parameter rebuilds it) and the same values
at ``PROBE_SIZE`` evenly strided places per weight (an edit through ``.data``, which the version
counter misses: ``ldm/ema.py``'s EMA swap, PEFT's LoRA merge). One entry per owner module, held
in a WeakKeyDictionary: copies, pickles and state dicts never carry it, and it is freed with the
module. Weights whose version cannot be read (inference-mode tensors) are not cached: ``get``
returns None and the caller computes directly.

``env_switch`` reads the on/off environment variables of these inference paths.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable, Hashable, Sequence
from functools import cache
from typing import Any

import torch
from torch import nn

PROBE_SIZE = 4096


def probe(weight: torch.Tensor, size: int = PROBE_SIZE) -> torch.Tensor:
    """About ``size`` evenly strided values of ``weight`` (a view where the weight is dense,
    read in memory order; ``.clone()`` it to keep)."""
    w = weight.detach()
    if w.is_contiguous() or (w.dim() == 4 and w.is_contiguous(memory_format=torch.channels_last)):
        flat = w.as_strided((w.numel(),), (1,))  # dense: the storage in memory order, no copy
    else:
        flat = w.reshape(-1)
    return flat[:: max(1, flat.numel() // size)]


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, tuple | list):
        return sum(_nbytes(v) for v in value)
    nbytes = getattr(value, "nbytes", None)
    return int(nbytes()) if callable(nbytes) else 0


class DerivedWeights:
    """A per-module cache of values derived from weights (see the module docstring)."""

    def __init__(self, probe_size: int = PROBE_SIZE) -> None:
        self.probe_size = probe_size
        self._entries: weakref.WeakKeyDictionary[nn.Module, tuple[Any, ...]] = (
            weakref.WeakKeyDictionary()
        )

    def _probes(self, weights: Sequence[torch.Tensor]) -> torch.Tensor:
        """The weights' probes as one tensor (one comparison per lookup; ``cat`` promotes mixed
        dtypes exactly)."""
        parts = [probe(w, self.probe_size) for w in weights]
        if len(parts) == 1:
            return parts[0]
        return torch.cat(parts) if parts else torch.empty(0)  # no weights (a 0-layer encoder)

    def get(
        self,
        owner: nn.Module,
        weights: Sequence[torch.Tensor],
        tag: Hashable,
        build: Callable[[], Any],
        unprobed: Sequence[torch.Tensor] = (),
    ) -> Any | None:
        """``build()`` for ``owner``, reused while ``weights``, ``unprobed`` and ``tag`` are
        unchanged (``unprobed``, e.g. biases, by identity, storage and version only); None when
        a tensor's version cannot be read (inference-mode tensors)."""
        tensors = (*weights, *unprobed)
        try:
            versions = tuple(w._version for w in tensors)
        except RuntimeError:
            return None
        key = (
            tag,
            versions,
            tuple((w.data_ptr(), w.dtype, w.device, tuple(w.shape)) for w in tensors),
        )
        entry = self._entries.get(owner)
        if (
            entry is not None
            and entry[1] == key
            and all(ref() is w for ref, w in zip(entry[0], tensors, strict=True))
            and torch.equal(entry[2], self._probes(weights))
        ):
            return entry[3]
        self.drop(owner)  # one entry per module: free a stale value before building the new one
        with torch.no_grad():
            value = build()
        refs = tuple(weakref.ref(w) for w in tensors)
        self._entries[owner] = (refs, key, self._probes(weights).clone(), value)
        return value

    def drop(self, owner: nn.Module) -> None:
        """Free ``owner``'s entry, if any."""
        self._entries.pop(owner, None)

    def clear(self) -> None:
        """Free every entry."""
        self._entries.clear()

    def nbytes(self) -> int:
        """Memory held by the cached values."""
        return sum(_nbytes(entry[3]) for entry in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)


def env_switch(name: str, off: str, on: str) -> bool:
    """The on/off environment variable ``name`` (default on); a value that is not a switch word
    is an error naming both settings (``off`` / ``on`` say what 0 and 1 do)."""
    return _parse_switch(name, os.environ.get(name, "1"), off, on)


@cache
def _parse_switch(name: str, value: str, off: str, on: str) -> bool:
    word = value.strip().lower()
    if word in ("1", "true", "yes", "on", ""):
        return True
    if word in ("0", "false", "no", "off"):
        return False
    raise ValueError(
        f"{name}={value!r} is not a switch; set it to 0 ({off}) or 1 (the default: {on}), or "
        "unset it"
    )
