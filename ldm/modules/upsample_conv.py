"""conv3x3(nearest_2x(x)) without forming the upsampled input: four 2x2 convs at the low resolution.

Nearest-neighbour 2x upsampling repeats every source pixel in a 2x2 block, so each output pixel of
the following 3x3 conv (stride 1, zero padding 1) reads only a 2x2 window of the *source*: output
row ``2i`` reads source rows ``i-1`` (kernel row 0) and ``i`` (rows 1 + 2 summed), row ``2i+1``
reads rows ``i`` (rows 0 + 1) and ``i+1`` (row 2); the same for columns. The four output phases
``(a, b)`` are therefore four 2x2 convs of the zero-padded source with summed kernels: 16 instead
of 36 multiply-adds per output pixel and channel, and no 4x-sized upsampled copy. The result
equals the two-step form up to float rounding (the kernel sums).

Used by the U-Net's and the autoencoder's ``Upsample`` (see ``worth_fusing``) and by the tiled
decoder. The summed kernels are built on every call (a cache could go stale when weights are
edited through ``.data``), so fusing pays only when the conv is large against its weight. On the
CPU (timed per shape, and in ``benchmarks/bench_vae.py``) that is from 512 source pixels (batch x
height x width) in float32 and from 2048 in bf16 / fp16, whose faster convs leave the kernel
build a larger share. On other devices (not measured here) the two-step form stays.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.conv2d import WinogradConv2d, applies_after_upsampling
from ldm.modules.module_hooks import hooked
from ldm.modules.winograd import compute_dtype, same_3x3


def _tap_map() -> torch.Tensor:
    """``[16, 9]``: row ``(a, b, p, q)`` sums the 3x3 taps ``(r, s)`` that phase (a, b)'s tap (p, q) reads."""
    rows = torch.zeros(3, 2, 2)  # [r, a, p]: kernel row r reaches tap p of row phase a
    rows[0, 0, 0] = rows[1, 0, 1] = rows[2, 0, 1] = 1.0  # a = 0: source rows i-1 | i
    rows[0, 1, 0] = rows[1, 1, 0] = rows[2, 1, 1] = 1.0  # a = 1: source rows i | i+1
    return torch.einsum("rap,sbq->abpqrs", rows, rows).reshape(16, 9)


_TAPS = _tap_map()


def subpixel_kernels(weight: torch.Tensor) -> torch.Tensor:
    """``[O, I, 3, 3]`` -> ``[4 O, I, 2, 2]``: the 2x2 kernels of phases (0,0), (0,1), (1,0), (1,1).

    Half-precision taps are summed in float32 (then cast back), so they lose nothing more.
    """
    out_ch, in_ch = weight.shape[:2]
    w = weight.float() if weight.dtype in (torch.float16, torch.bfloat16) else weight
    taps = _TAPS.to(device=w.device, dtype=w.dtype)
    k = (taps @ w.reshape(out_ch * in_ch, 9).t()).view(2, 2, 2, 2, out_ch, in_ch)
    return k.permute(0, 1, 4, 5, 2, 3).reshape(4 * out_ch, in_ch, 2, 2).to(weight.dtype)


def upsample_conv2d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``conv2d(interpolate(x, scale_factor=2, mode="nearest"), weight, bias, padding=1)``.

    ``x`` is ``[B, I, H, W]``, ``weight`` ``[O, I, 3, 3]``; returns ``[B, O, 2H, 2W]``.
    Differentiable in ``x``, ``weight`` and ``bias``.
    """
    if weight.shape[-2:] != (3, 3) or x.dim() != 4:
        raise ValueError(
            f"upsample_conv2d needs a 4-D input and a 3x3 kernel, got input {tuple(x.shape)} "
            f"and weight {tuple(weight.shape)}"
        )
    b, _, h, w = x.shape
    out_ch = weight.shape[0]
    kernels = subpixel_kernels(weight)
    bias4 = bias.repeat(4) if bias is not None else None
    y = F.conv2d(F.pad(x, (1, 1, 1, 1)), kernels, bias4)  # [B, 4 O, H + 1, W + 1]
    y = y.unflatten(1, (2, 2, out_ch))  # [B, a, b, O, H + 1, W + 1]
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        rows = y.new_empty(b, h, 2, w, 2, out_ch)  # channels-last in, channels-last out
        image = rows.view(b, 2 * h, 2 * w, out_ch).permute(0, 3, 1, 2)
        phases = rows.permute(0, 5, 1, 2, 3, 4)  # [B, O, H, a, W, b]
    else:
        phases = y.new_empty(b, out_ch, h, 2, w, 2)
        image = phases.view(b, out_ch, 2 * h, 2 * w)
    for a in (0, 1):
        for c in (0, 1):
            phases[:, :, :, a, :, c] = y[:, a, c, :, a : a + h, c : c + w]
    return image


_LOW_PRECISION = (torch.bfloat16, torch.float16)


def worth_fusing(conv: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``Upsample`` should call ``upsample_conv2d`` for this conv and input."""
    if x.device.type != "cpu" or x.dim() != 4 or not fusable(conv):
        return False
    if applies_after_upsampling(conv, x):  # the cached Winograd weight / a training form is faster
        return False
    low = compute_dtype(x) in _LOW_PRECISION or x.dtype in _LOW_PRECISION
    return x.shape[0] * x.shape[2] * x.shape[3] >= (2048 if low else 512)


def fusable(conv: nn.Module) -> bool:
    """True when ``conv`` is a plain 2-D 3x3 'same' conv whose call ``upsample_conv2d`` may replace."""
    return type(conv) in (nn.Conv2d, WinogradConv2d) and same_3x3(conv) and not hooked(conv)
