"""DreamBooth's prior-preservation loss (Ruiz et al. 2023, eq. 2): instance loss + lambda * class loss.

Batches from ``ldm.data.dreambooth.DreamBoothDataset`` flag each item with ``prior`` (True: a
class image the model generated before training). The batch is split by that flag and the two
halves' losses are combined as ``L_instance + prior_loss_weight * L_prior``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

PRIOR_KEY = "prior"


def select(batch: Mapping[str, Any], keep: torch.Tensor) -> dict[str, Any]:
    """The rows of a collated batch where ``keep`` [B] is True (tensors and lists; others as is)."""
    rows = torch.nonzero(keep).flatten().tolist()
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.ndim and len(value) == len(keep):
            out[key] = value[keep.to(value.device)]
        elif isinstance(value, list | tuple) and len(value) == len(keep):
            out[key] = [value[i] for i in rows]
        else:
            out[key] = value
    return out


def prior_preservation_loss(
    batch: Mapping[str, Any],
    step: Callable[[Mapping[str, Any]], tuple[torch.Tensor, dict[str, torch.Tensor]]],
    weight: float,
    prefix: str,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``step(instance rows) + weight * step(prior rows)``; either part may be absent."""
    flags = torch.as_tensor(batch[PRIOR_KEY]).bool().flatten()
    total: torch.Tensor | None = None
    logged: dict[str, torch.Tensor] = {}
    for name, keep, w in (("instance", ~flags, 1.0), ("prior", flags, float(weight))):
        if not bool(keep.any()):
            continue
        loss, loss_dict = step(select(batch, keep))
        if name == "instance":
            logged.update(loss_dict)
        logged[f"{prefix}/loss_{name}"] = loss.detach()
        total = w * loss if total is None else total + w * loss
    assert total is not None  # a batch has at least one row
    logged[f"{prefix}/loss"] = total.detach()
    return total, logged
