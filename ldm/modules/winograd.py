"""Winograd convolution F(m x m, 3 x 3) for 3x3 'same' convolutions in CPU inference.

Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks" (CVPR 2016): a 3x3 convolution
over (m + 2) x (m + 2) input tiles becomes (m + 2)^2 independent matrix products over channels,
Y = A^T [ (G g G^T) . (B^T d B) ] A, so an m x m output tile costs (m + 2)^2 multiplications per
channel pair instead of 9 m^2: 2.25x fewer for F(2x2, 3x3), 4x fewer for F(4x4, 3x3).

On this project's CPUs oneDNN's direct convolution runs the U-Net's low-resolution, wide layers
(1280 channels at 8x8 and 16x16) far below the machine's matmul rate; there the Winograd form
takes 0.33-0.42 of the direct time, 0.42-0.80 at 32x32 and 64x64 with F(4x4) in fp32
(``benchmarks/bench_winograd.py``; the SD v1 U-Net forward: 0.77-0.81x of diffusers in fp32,
``benchmarks/README.md``). The transformed weights ((m + 2)^2 / 9 times the weight's size:
4.2 GB for the SD v1 U-Net in fp32, 1.5 GB in bf16) are computed once and cached per weight
version (and a probe of its values, for edits through ``.data``), so the path is for inference
(no autograd graph); a training forward frees them. fp32 training uses F(4x4) with its own
backward above 16x16 (``ldm.modules.conv_training``); below that, without a cache, the per-step
weight transform eats the gain, except with freed memory kept (``ldm.malloc_policy``) for wide
layers at batch 2 and up. ``ldm.modules.conv2d.WinogradConv2d`` picks the form per call.

Accuracy in fp32: F(2x2) matches the direct convolution's rounding error (about 5e-7 relative to
the largest output against float64), F(4x4) is about 1e-5. In bf16 only F(2x2) is used (F(4x4)'s
larger transform coefficients lose too much in bf16: 6e-2).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from fractions import Fraction
from functools import cache

import torch
import torch.nn.functional as F
from torch import nn

from ldm import malloc_policy
from ldm.modules.weight_cache import DerivedWeights, env_switch

_HALF = Fraction(1, 2)

# (B^T, G, A^T) per output tile size m; interpolation points 0, 1, -1 (m = 2) and 0, 1, -1, 2, -2
# (m = 4), with the point at infinity.
_MATRICES: dict[int, tuple[list[list[Fraction]], ...]] = {
    2: (
        [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
        [[1, 0, 0], [_HALF, _HALF, _HALF], [_HALF, -_HALF, _HALF], [0, 0, 1]],
        [[1, 1, 1, 0], [0, 1, -1, -1]],
    ),
    4: (
        [
            [4, 0, -5, 0, 1, 0],
            [0, -4, -4, 1, 1, 0],
            [0, 4, -4, -1, 1, 0],
            [0, -2, -1, 2, 1, 0],
            [0, 2, -1, -2, 1, 0],
            [0, 4, 0, -5, 0, 1],
        ],
        [
            [Fraction(1, 4), 0, 0],
            [Fraction(-1, 6), Fraction(-1, 6), Fraction(-1, 6)],
            [Fraction(-1, 6), Fraction(1, 6), Fraction(-1, 6)],
            [Fraction(1, 24), Fraction(1, 12), Fraction(1, 6)],
            [Fraction(1, 24), Fraction(-1, 12), Fraction(1, 6)],
            [0, 0, 1],
        ],
        [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]],
    ),
}
TILE_SIZES = tuple(_MATRICES)

# Policy, from ``benchmarks/bench_winograd.py`` (SD v1 U-Net shapes, 2 threads, AMX CPU):
# - below this min(C_in, C_out) the transforms' memory traffic outweighs the smaller products
#   (the default run's 64-256 channel layers: 1.1-7x the direct time; a 256-channel layer at
#   128x128: 1.07x with F(4x4));
MIN_CHANNELS = 320
# - fp32: F(2x2) up to 16x16 images (0.33-0.42 of direct; F(4x4) is 0.53-0.55 at 8x8 and
#   0.34-0.37 at 16x16, but its cached weight is 2.25x larger and those 1280-channel layers hold
#   most of the U-Net's weights), F(4x4) above it (0.42-0.59 at 32x32, 0.57-0.87 at 64x64);
FP32_F2_MAX_PIXELS = 16 * 16
# - fp32 F(4x4) only while the batch's pixels (B * H * W) are at most this: its transformed input
#   (2.25x the activation) then stays in cache; above it the transforms run at memory speed and
#   the gain is gone (batch 4 at 64x64: 1.06; batch 2 at 96x96: 0.95, at 128x128: 1.11);
FP32_F4_MAX_BATCH_PIXELS = 2 * 64 * 64
# - bf16: F(2x2) up to 16x16 images (0.34-0.70); above it oneDNN's bf16 convolution is as fast
#   or faster, and F(4x4) loses too much precision in bf16 (6e-2 relative).
BF16_MAX_PIXELS = 16 * 16
# With freed memory kept in the process (``ldm.malloc_policy``, what the commands set) the
# transforms' fresh buffers no longer fault their pages in, and fp32 F(4x4) pays off wider and
# larger (Xeon AVX-512, 2 threads, inference, against oneDNN's direct kernel): 0.70-0.73 at 256
# channels from 64x64 to 256x256, 0.55-0.69 at 320-512 channels up to 4 x 64 x 64 and 128x128,
# 0.53 at 512 channels and 256x256; 128 channels: 0.99-1.02 (left direct). Under glibc's defaults
# the same layers read 0.74-1.09 at 128x128-256x256. At 16x16 and below 256 channels stay direct
# (F(2x2) 0.82-1.71 there).
# The same holds for the fp32 training forms (``ldm.modules.conv_training``): forward+backward
# 0.62 at batch 4 x 64x64 (320 channels), 0.49-0.50 at batch 4-8 x 32x32 (640), 0.65-0.70 at 256
# channels, 64x64.
RETAINED_MIN_CHANNELS = 256
RETAINED_FP32_F4_MAX_BATCH_PIXELS = 256 * 256


def fp32_f4_limits() -> tuple[int, int]:
    """(least channels, most batch pixels) for fp32 F(4x4), inference and training: wider with
    freed memory kept in the process (``ldm.malloc_policy``), else ``MIN_CHANNELS`` and
    ``FP32_F4_MAX_BATCH_PIXELS``."""
    if malloc_policy.retained():
        return RETAINED_MIN_CHANNELS, RETAINED_FP32_F4_MAX_BATCH_PIXELS
    return MIN_CHANNELS, FP32_F4_MAX_BATCH_PIXELS


@cache
def kron_matrices(m: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B^T x B^T, G x G, A^T x A^T) as dense matrices acting on flattened tiles."""
    if m not in _MATRICES:
        raise ValueError(f"Winograd tile size {m!r} is not supported; expected one of {TILE_SIZES}")
    bt, g, at = (
        torch.tensor([[float(v) for v in row] for row in mat], dtype=torch.float64)
        for mat in _MATRICES[m]
    )
    return tuple(torch.kron(mat, mat).to(dtype) for mat in (bt, g, at))  # type: ignore[return-value]


def winograd_weight(
    weight: torch.Tensor, m: int, dtype: torch.dtype | None = None, transposed: bool = False
) -> torch.Tensor:
    """The transformed 3x3 weight U = G g G^T as [(m + 2)^2, C_out, C_in] (computed in fp32 or
    better, returned in ``dtype``, default the weight's). ``transposed``: that of the transposed
    convolution's weight instead (the kernel flipped, its channel axes swapped: the input gradient's
    convolution), [(m + 2)^2, C_in, C_out]; the flip is a reversal of G x G's columns and the
    channel swap a transposed view of a [(m + 2)^2, C_out, C_in] tensor, so neither copies the
    weight."""
    if weight.dim() != 4 or weight.shape[-2:] != (3, 3):
        raise ValueError(f"expected a [C_out, C_in, 3, 3] weight, got shape {tuple(weight.shape)}")
    out_dtype = dtype or weight.dtype
    work = torch.float64 if weight.dtype == torch.float64 else torch.float32
    _, kg, _ = kron_matrices(m, work)
    kg = kg.to(weight.device)
    if transposed:
        kg = kg.flip(1)  # column 3i + j reads the kernel's tap (2 - i, 2 - j)
    rows, cols = weight.shape[:2]
    u = (kg @ weight.to(work).reshape(rows * cols, 9).t()).view(-1, rows, cols).to(out_dtype)
    return u.transpose(1, 2) if transposed else u


def input_transform(x: torch.Tensor, m: int) -> tuple[torch.Tensor, int, int]:
    """``V = B^T d B`` for every (m + 2) x (m + 2) input tile ``d`` of the zero-padded ``x`` [B, C,
    H, W] (tiles at stride m, the last ones padded): ``(V [(m + 2)^2, C, P], nH, nW)``, P = B nH nW
    tiles in (batch, tile row, tile column) order.

    In fp32 (an NCHW input, or channels-last from 128x128) the overlapping tiles are gathered and
    transformed by one stride-m convolution with the (m + 2)^2 rows of B^T x B^T as its filters:
    0.55-0.65 of the gather-then-matmul time at the SD U-Net's 16x16-64x64 levels and 0.43-0.60
    at the autoencoder's 128x128-256x256, the same values there. Elsewhere (bf16, smaller
    channels-last images, where the convolution is no faster) one gather into tile-major order
    and one matmul."""
    t = m + 2
    b, c, h, w = x.shape
    kb, _, _ = kron_matrices(m, x.dtype)
    kb = kb.to(x.device)
    nh, nw = -(-h // m), -(-w // m)
    p = b * nh * nw
    pad_h, pad_w = 1 + nh * m - h, 1 + nw * m - w  # zeros after the bottom / right edge
    if x.dtype == torch.float32 and (x.is_contiguous() or h * w >= 128 * 128):
        planes = x.reshape(b * c, 1, h, w)  # a view of an NCHW input
        kernel = kb.view(t * t, 1, t, t)
        if pad_h == pad_w == 1:
            out = F.conv2d(planes, kernel, stride=m, padding=1)
        else:
            out = F.conv2d(F.pad(planes, (1, pad_w, 1, pad_h)), kernel, stride=m)
        # [B * C, t^2, nH, nW] -> [t^2, C, B * nH * nW]: copies runs of nH * nW values
        return out.view(b, c, t * t, nh * nw).permute(2, 1, 0, 3).reshape(t * t, c, p), nh, nw
    xp = F.pad(x, (1, pad_w, 1, pad_h))
    tiles = xp.unfold(2, t, m).unfold(3, t, m)  # [B, C, nH, nW, t, t] (a view)
    d = tiles.permute(4, 5, 1, 0, 2, 3).reshape(t * t, c * p)  # one gather into tile-major order
    return (kb @ d).view(t * t, c, p), nh, nw


def winograd_conv3x3(
    x: torch.Tensor,
    u: torch.Tensor,
    bias: torch.Tensor | None,
    m: int,
    v: torch.Tensor | None = None,
) -> torch.Tensor:
    """A stride-1, padding-1 3x3 convolution of ``x`` [B, C, H, W] from the transformed weight
    ``u`` (``winograd_weight``); any H and W (the last tiles are padded and the output cropped).
    ``v``: ``input_transform(x, m)``'s tiles where the caller has them already."""
    t = m + 2
    b, c, h, w = x.shape
    if u.shape[0] != t * t or u.shape[2] != c:
        raise ValueError(
            f"transformed weight of shape {tuple(u.shape)} does not fit F({m}x{m}, 3x3) on an input "
            f"with {c} channels; expected [{t * t}, C_out, {c}]"
        )
    c_out = u.shape[1]
    _, _, ka = kron_matrices(m, x.dtype)
    ka = ka.to(x.device)
    nh, nw = -(-h // m), -(-w // m)
    if v is None:
        v = input_transform(x, m)[0]
    p = b * nh * nw
    prod = torch.bmm(u, v)  # [t^2, C_out, P]: the (m + 2)^2 channel products
    y = (ka @ prod.view(t * t, c_out * p)).view(m, m, c_out, b, nh, nw)  # A^T M A
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        # a channels-last input gets a channels-last output (the autoencoder's layout)
        y = y.permute(3, 4, 0, 5, 1, 2).reshape(b, nh * m, nw * m, c_out).permute(0, 3, 1, 2)
    else:
        y = y.permute(3, 2, 4, 0, 5, 1).reshape(b, c_out, nh * m, nw * m)
    if nh * m != h or nw * m != w:
        y = y[:, :, :h, :w]
    if bias is not None:  # y (or what it views) is this call's own intermediate: add in place
        y = y.add_(bias.to(y.dtype).view(1, -1, 1, 1))
    return y


_override: list[bool] = []  # innermost ``winograd_enabled`` last


def winograd_is_on() -> bool:
    """Whether the Winograd (and training) forms may run: the innermost ``winograd_enabled``,
    else ``LDM_WINOGRAD``."""
    if _override:
        return _override[-1]
    return env_switch(
        "LDM_WINOGRAD",
        off="direct convolution everywhere",
        on="Winograd where it is faster",
    )


@contextmanager
def winograd_enabled(enabled: bool) -> Iterator[None]:
    """Switch the Winograd path on or off inside the block (over ``LDM_WINOGRAD``)."""
    _override.append(bool(enabled))
    try:
        yield
    finally:
        _override.pop()


def same_3x3(conv: nn.Conv2d, stride: int = 1) -> bool:
    """A 3x3, stride-1 (or ``stride``), zero-padding-1 ('same' at stride 1), undilated, ungrouped
    convolution."""
    return (
        conv.kernel_size == (3, 3)
        and conv.stride == (stride, stride)
        and conv.padding == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
    )


def tile_size(
    conv: nn.Conv2d, x: torch.Tensor, dtype: torch.dtype, pixels: int | None = None
) -> int:
    """The Winograd tile size to run ``conv`` on ``x`` in ``dtype`` with, or 0 for the direct
    convolution (wrong device, shape, dtype, narrow channels, or an autograd graph to record).
    ``pixels`` overrides the image size H * W read from ``x``."""
    if (
        x.device.type != "cpu"
        or x.dim() != 4
        or not same_3x3(conv)
        or (torch.is_grad_enabled() and (x.requires_grad or conv.weight.requires_grad))
        or torch.compiler.is_compiling()
        or not winograd_is_on()
    ):
        return 0
    channels = min(conv.in_channels, conv.out_channels)
    if pixels is None:
        pixels = x.shape[2] * x.shape[3]
    if dtype == torch.float32:
        if pixels <= FP32_F2_MAX_PIXELS:  # F(2x2) from MIN_CHANNELS only (256: 0.82-1.71)
            return 2 if channels >= MIN_CHANNELS else 0
        f4_min_channels, f4_max = fp32_f4_limits()
        return 4 if channels >= f4_min_channels and x.shape[0] * pixels <= f4_max else 0
    if dtype == torch.bfloat16:  # bf16 keeps MIN_CHANNELS (measured without the allocator)
        return 2 if pixels <= BF16_MAX_PIXELS and channels >= MIN_CHANNELS else 0
    return 0


# Transformed weights, per module, while the weight is unchanged (``ldm.modules.weight_cache``).
_CACHE = DerivedWeights()


def drop_cached(conv: nn.Conv2d) -> None:
    """Free ``conv``'s cached transformed weights, if any."""
    if len(_CACHE):
        _CACHE.drop(conv)


def cached_weight(conv: nn.Conv2d, m: int, dtype: torch.dtype) -> torch.Tensor | None:
    """``winograd_weight`` of ``conv.weight``, reused while the weight is unchanged (the same
    tensor, storage, version counter and probed values: ``DerivedWeights``). None when the
    weight's version cannot be read (inference-mode tensors)."""
    weight = conv.weight
    return _CACHE.get(conv, (weight,), (m, dtype), lambda: winograd_weight(weight, m, dtype))


def clear_cache() -> None:
    """Free every cached transformed weight."""
    _CACHE.clear()


def cache_bytes() -> int:
    """Memory held by the cached transformed weights."""
    return _CACHE.nbytes()


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a convolution of ``x`` runs in: the CPU autocast dtype when autocast is on."""
    if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        return torch.get_autocast_dtype("cpu")
    return x.dtype
