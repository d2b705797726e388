"""Out of memory while sampling: a message that names the switches of our commands that help."""

from __future__ import annotations

import argparse
from typing import Any

import torch

__all__ = ["is_out_of_memory", "out_of_memory_message"]

_CPU_OOM = ("DefaultCPUAllocator: can't allocate memory", "not enough memory")


def is_out_of_memory(err: BaseException) -> bool:
    """A CUDA/MPS out-of-memory error, or the CPU allocator's (a RuntimeError) / MemoryError."""
    if isinstance(err, torch.OutOfMemoryError | MemoryError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and (
        any(s in text for s in _CPU_OOM) or "out of memory" in text.lower()
    )


def memory_switches(args: argparse.Namespace, device: torch.device) -> list[str]:
    """The command's switches, not already at their most frugal, that lower peak memory."""
    out = []
    slice_size = getattr(args, "attention_slice", None)
    if not slice_size or slice_size > 1:
        out.append("--attention-slice 1 (attention in slices: less memory, a little slower)")
    if not getattr(args, "tiled_decode", False):
        out.append("--tiled-decode (decode the image in tiles)")
    n = getattr(args, "n_samples", 1) or 1
    if n > 1:
        out.append(f"--n_samples {max(1, n // 2)} (fewer images per batch; --n_iter for more)")
    if device.type == "cuda" and getattr(args, "precision", None) in ("full", "fp32"):
        out.append("--precision autocast (half precision)")
    out.append("a smaller --H/--W")
    if getattr(args, "refiner", None):
        out.append("no --refiner (a second model in memory)")
    return out


def out_of_memory_message(
    err: BaseException, args: argparse.Namespace, device: torch.device, doing: str
) -> str:
    """``out of memory on DEVICE while DOING (detail). Try: switches...`` for a RunFailure."""
    detail = " ".join(str(err).split())[:200] or type(err).__name__
    free: Any = ""
    if device.type == "cuda" and torch.cuda.is_available():
        try:
            free_b, total_b = torch.cuda.mem_get_info(device)
            free = f"; {free_b / 2**30:.1f} of {total_b / 2**30:.1f} GiB free now"
        except RuntimeError:
            free = ""
    switches = "; ".join(memory_switches(args, device))
    return f"out of memory on {device} while {doing} ({detail}{free}). Try: {switches}."
