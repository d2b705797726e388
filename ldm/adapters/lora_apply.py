"""Merge LoRAs into a model's weights, W <- W + sum_i s_i * delta_i (Hu et al. 2021, sec. 4.2),
and restore the original tensors bit for bit afterwards; or merge into / out of a state dict."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from types import TracebackType

import torch
from torch import Tensor, nn

from ldm.adapters.lora_io import load_lora
from ldm.adapters.lora_weights import LoraError, LoraFile, LoraModule

logger = logging.getLogger(__name__)

LoraSpec = tuple["str | os.PathLike[str] | LoraFile", float]


def resolve(
    loras: Sequence[LoraSpec], shapes: Mapping[str, torch.Size]
) -> list[tuple[LoraFile, float]]:
    """Load the LoRAs given as paths (against `shapes`); keep LoraFiles as they are."""
    out = []
    for item, scale in loras:
        lora = item if isinstance(item, LoraFile) else load_lora(item, shapes)
        out.append((lora, float(scale)))
    return out


def summed_deltas(
    loras: Sequence[tuple[LoraFile, float]], like: Mapping[str, Tensor]
) -> Iterator[tuple[str, Tensor]]:
    """(key, sum_i s_i * delta_i) one weight at a time, in float32 on the weight's device
    (scale-0 LoRAs skipped); every key is checked before the first is yielded."""
    per_key: dict[str, list[tuple[LoraModule, float]]] = {}
    for lora, scale in loras:
        if scale == 0:
            continue
        for key, m in lora.modules.items():
            if key not in like:
                raise LoraError(
                    f"{lora.path or 'a LoRA'} updates {key}, which this model does not have; "
                    "load the LoRA against this model's state dict."
                )
            per_key.setdefault(key, []).append((m, scale))
    for key, parts in per_key.items():
        w = like[key]
        total = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
        for m, scale in parts:
            d = m.delta(w.device) * scale
            if m.rows is None:
                total += d.reshape(w.shape)
            else:
                total[m.rows[0] : m.rows[1]] += d
        yield key, total


class MergedLoras:
    """LoRAs merged into a module's live weights; `unmerge()` (or leaving the `with` block)
    restores the original tensors exactly. Only touched tensors are backed up."""

    def __init__(self, engine: nn.Module, loras: Sequence[LoraSpec]) -> None:
        live = engine.state_dict(keep_vars=True)
        files = resolve(loras, {k: v.shape for k, v in live.items()})
        self._backup: dict[str, Tensor] = {}
        self._live = live
        with torch.no_grad():
            for key, delta in summed_deltas(files, live):
                w = live[key]
                self._backup[key] = w.detach().clone()
                w.add_(delta.to(w.dtype))  # computed in float32, added in the weight's dtype
        logger.info("Merged %d LoRA(s) into %d weights", len(files), len(self._backup))

    @property
    def touched(self) -> list[str]:
        """The keys of the weights the LoRAs changed."""
        return list(self._backup)

    def unmerge(self) -> None:
        """Put the original tensors back (bit for bit)."""
        with torch.no_grad():
            for key, original in self._backup.items():
                self._live[key].copy_(original)
        self._backup.clear()

    def __enter__(self) -> MergedLoras:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.unmerge()


def apply_loras(engine: nn.Module, loras: Sequence[LoraSpec]) -> MergedLoras:
    """Merge (path or LoraFile, scale) pairs into `engine`'s weights; use as a context manager
    or call `.unmerge()`."""
    return MergedLoras(engine, loras)


def merge_into_state_dict(
    sd: dict[str, Tensor], loras: Sequence[LoraSpec], sign: int = 1
) -> dict[str, Tensor]:
    """A copy of `sd` with the LoRAs added (`sign=-1`: subtracted; exact up to float rounding)."""
    if sign not in (1, -1):
        raise ValueError(f"sign must be +1 or -1, got {sign}.")
    files = resolve(loras, {k: v.shape for k, v in sd.items()})
    out = dict(sd)
    for key, delta in summed_deltas(files, sd):
        w = sd[key]
        out[key] = w + (sign * delta).to(w.dtype)
    return out
