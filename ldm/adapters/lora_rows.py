"""Packed weights: LoRAs on row ranges of one weight (OpenCLIP `attn.in_proj_weight` = q | k | v).

Files hold one module per row range (q_proj, k_proj, v_proj); a `LoraSet` holds one module per
weight key. Several row modules on one key combine into one exact module on the whole weight
(down stacked, up block-diagonal); saving splits it back into its row ranges.
"""

from __future__ import annotations

import logging

import torch

from ldm.adapters.lora_weights import LoraModule, LoraSet

logger = logging.getLogger(__name__)


def combine_rows(parts: list[LoraModule], n_rows: int) -> LoraModule:
    """One module on all `n_rows` rows equal to the sum of row-range modules (block-diagonal up)."""
    if len(parts) == 1:
        return parts[0]
    scales = {p.scale for p in parts}
    same = len(scales) == 1  # keep alpha: scale * sum(r) == each part's scale
    downs = [p.down.float() for p in parts]
    total = sum(p.rank for p in parts)
    up = torch.zeros(n_rows, total, dtype=torch.float32, device=parts[0].up.device)
    col = 0
    for p in parts:
        start, stop = p.rows if p.rows is not None else (0, n_rows)
        block = p.up.float() if same else p.up.float() * p.scale
        up[start:stop, col : col + p.rank] += block
        col += p.rank
    alpha = scales.pop() * total if same else None
    dtypes = {t.dtype for p in parts for t in (p.down, p.up)}
    # the parts' own dtype only where nothing was computed (one scale, one dtype): a scaled up
    # or mixed dtypes stay in float32, not rounded to fp16 / bf16
    dtype = dtypes.pop() if same and len(dtypes) == 1 else torch.float32
    return LoraModule(torch.cat(downs).to(dtype), up.to(dtype), alpha, None)


def add_module(modules: LoraSet, key: str, module: LoraModule, n_rows: int) -> None:
    """modules[key] = module, combining with a row module already on `key`."""
    old = modules.get(key)
    if old is None:
        modules[key] = module
        return
    if old.rows is None and module.rows is None:
        raise ValueError(f"Two LoRA modules target {key}.")
    modules[key] = combine_rows([old, module], n_rows)


def split_rows(module: LoraModule, ranges: list[tuple[int, int]]) -> list[LoraModule]:
    """The row-range modules of a whole-weight module; columns of `up` that are zero in a range
    (another range's part of a combined module) are dropped, and a range with none is skipped."""
    if module.rows is not None:
        return [module]
    out = []
    for start, stop in ranges:
        up = module.up[start:stop]
        keep = up.reshape(up.shape[0], -1).ne(0).any(dim=0).nonzero().flatten()
        if keep.numel() == 0:
            continue
        r = int(keep.numel())
        out.append(
            LoraModule(
                module.down[keep].contiguous(),
                up[:, keep].contiguous(),
                module.scale * r,
                (start, stop),
            )
        )
    return out
