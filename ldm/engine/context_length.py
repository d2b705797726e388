"""Cross-attention contexts of different lengths made equal by appending empty-window chunks.

A long prompt is encoded in chunks (``ldm.modules.encoders.long_prompt``), so a prompt and its
negative prompt, or the two text encoders of SDXL, may give contexts of different lengths
(77 * n rows). Classifier-free guidance runs cond and uncond in one batch and SDXL concatenates
its encoders on the feature axis, so the shorter context gets chunks appended: the encoding of an
empty window, i.e. of the prompt "" (AUTOMATIC1111 pads the same way).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch


def sequence_parts(out: Any) -> list[torch.Tensor]:
    """The ``[B, M, D]`` tensors of an embedder output (a tensor or a tuple with a pooled part)."""
    parts = list(out) if isinstance(out, tuple | list) else [out]
    return [p for p in parts if isinstance(p, torch.Tensor) and p.ndim == 3]


def pad_context(context: torch.Tensor, length: int, empty: torch.Tensor) -> torch.Tensor:
    """``context [B, M, D]`` with copies of the empty-window encoding ``empty [1, L, D]``
    appended up to ``length`` rows."""
    missing = length - context.shape[1]
    if missing == 0:
        return context
    chunk = empty.shape[1]
    if missing < 0 or missing % chunk or empty.shape[-1] != context.shape[-1]:
        raise ValueError(
            f"cannot pad a context of {tuple(context.shape)} to {length} rows with empty chunks "
            f"of {tuple(empty.shape)}: expected the difference to be a multiple of {chunk} rows "
            "and the same feature size. Encode cond and uncond with the same text encoder(s)."
        )
    fill = empty[:1].to(context).expand(context.shape[0], chunk, context.shape[-1])
    return torch.cat([context, *[fill] * (missing // chunk)], dim=1)


def pad_output(out: Any, length: int, empty: Any) -> Any:
    """An embedder output whose ``[B, M, D]`` parts are padded to ``length`` rows with the
    matching parts of ``empty`` (the embedder's output for the prompt "")."""
    fills = iter(sequence_parts(empty))
    if not isinstance(out, tuple | list):
        return pad_context(out, length, next(fills)) if out.ndim == 3 else out
    padded = [
        pad_context(p, length, next(fills)) if isinstance(p, torch.Tensor) and p.ndim == 3 else p
        for p in out
    ]
    return type(out)(padded)


def align_outputs(outs: list[Any], empty_for: Callable[[int], Any], text: list[bool]) -> list[Any]:
    """Outputs of several embedders with their sequence parts padded to the longest; only text
    embedders (``text[i]``) are padded, with ``empty_for(i)`` (embedder i's encoding of "")."""
    lengths = {i: {p.shape[1] for p in sequence_parts(o)} for i, o in enumerate(outs) if text[i]}
    target = max((n for ls in lengths.values() for n in ls), default=0)
    if all(ls <= {target} for ls in lengths.values()):
        return outs
    return [pad_output(o, target, empty_for(i)) if i in lengths else o for i, o in enumerate(outs)]


def crossattn_context(cond: Any) -> torch.Tensor | None:
    """The ``[B, M, D]`` cross-attention context of an assembled conditioning, if it has one."""
    if isinstance(cond, torch.Tensor):
        return cond if cond.ndim == 3 else None
    if isinstance(cond, Mapping):
        parts = cond.get("c_crossattn")
        if isinstance(parts, list | tuple) and len(parts) == 1:
            return crossattn_context(parts[0])
    return None


def replace_context(cond: Any, context: torch.Tensor) -> Any:
    """``cond`` with its cross-attention context replaced by ``context``."""
    if isinstance(cond, torch.Tensor):
        return context
    return {**cond, "c_crossattn": [context]}


def match_context_lengths(
    cond: Any, uncond: Any, empty_context: Callable[[], torch.Tensor | None]
) -> tuple[Any, Any]:
    """(cond, uncond) with the shorter cross-attention context padded with empty-window chunks
    (``empty_context()``: the assembled context of the prompt "", ``[1, L, D]``)."""
    a, b = crossattn_context(cond), crossattn_context(uncond)
    if a is None or b is None or a.shape[1] == b.shape[1]:
        return cond, uncond
    empty = empty_context()
    if empty is None:
        raise ValueError(
            f"cond and uncond contexts have {a.shape[1]} and {b.shape[1]} rows and this model "
            "has no text embedder to pad them with; give conditionings of equal length."
        )
    length = max(a.shape[1], b.shape[1])
    return (
        replace_context(cond, pad_context(a, length, empty)),
        replace_context(uncond, pad_context(b, length, empty)),
    )
