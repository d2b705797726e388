"""Classifier-free guidance as a wrapper around the model function (Ho & Salimans 2022, arXiv 2207.12598).

Negative prompts are the unconditional conditioning. ``guidance_rescale`` is Lin et al. 2023
(arXiv 2305.08891) eq. 15-16: rescale the guided output to the std of the conditional one and blend
with factor phi; applied to the model output as in diffusers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

CondModel = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]


def cat_cond(a: Any, b: Any) -> Any:
    """Batch-concatenate two conditionings of the same structure (tensor, list/tuple, dict, None)."""
    if a is None and b is None:
        return None
    if isinstance(a, torch.Tensor):
        if a.ndim == 3 and b.ndim == 3 and a.shape[1] != b.shape[1]:
            raise ValueError(
                f"cond and uncond contexts differ in length ({a.shape[1]} vs {b.shape[1]} rows; "
                "a long prompt is encoded in chunks): pad the shorter with empty-window chunks "
                "first, e.g. model.conditioner.match_lengths(cond, uncond) (generate does)."
            )
        return torch.cat([a, b])
    if isinstance(a, dict):
        if set(a) != set(b):
            raise ValueError(f"cond and uncond need the same keys, got {sorted(a)} and {sorted(b)}")
        return {k: cat_cond(a[k], b[k]) for k in a}
    if isinstance(a, (list, tuple)):
        if len(a) != len(b):
            raise ValueError(f"cond and uncond lists differ in length: {len(a)} vs {len(b)}")
        return type(a)(cat_cond(x, y) for x, y in zip(a, b))
    raise TypeError(
        f"cannot batch conditioning of type {type(a).__name__}; use tensors, lists or dicts of them"
    )


def rescale_guidance(
    guided: torch.Tensor, cond_out: torch.Tensor, guidance_rescale: float
) -> torch.Tensor:
    """phi * guided * std(cond)/std(guided) + (1 - phi) * guided, std over all but the batch dim (eq. 15-16)."""
    dims = list(range(1, guided.ndim))
    std_cond = cond_out.std(dim=dims, keepdim=True)
    std_guided = guided.std(dim=dims, keepdim=True)
    ratio = torch.where(std_guided > 0, std_cond / std_guided, torch.ones_like(std_guided))
    rescaled = guided * ratio  # a constant guided output (std 0) is left as it is
    return guidance_rescale * rescaled + (1 - guidance_rescale) * guided


def cfg_model_fn(
    model: CondModel,
    cond: Any,
    uncond: Any,
    scale: float,
    guidance_rescale: float = 0.0,
    batched: bool = True,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """model_fn(x, t) = u + scale (c - u) with u, c = model(x, t, uncond), model(x, t, cond).

    ``model(x, t, cond)`` is e.g. ``LatentDiffusion.apply_model``; ``uncond`` is the empty or negative
    prompt's conditioning. ``batched`` runs both branches in one forward pass (2B batch).
    Scale 1 evaluates only the conditional branch.
    """

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if scale == 1.0 and guidance_rescale == 0.0:
            return model(x, t, cond)
        if batched:
            out = model(torch.cat([x, x]), torch.cat([t, t]), cat_cond(uncond, cond))
            out_u, out_c = out.chunk(2)  # [B, ...] each
        else:
            out_u, out_c = model(x, t, uncond), model(x, t, cond)
        guided = out_u + scale * (out_c - out_u)
        if guidance_rescale > 0:
            guided = rescale_guidance(guided, out_c, guidance_rescale)
        return guided

    return model_fn
