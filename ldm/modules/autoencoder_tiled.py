"""Exact tiled forward of the autoencoder ``Decoder``: the same output as ``Decoder.forward`` to
float tolerance, with the convolutions computed in horizontal strips (tiles of full width).

The decoder is walked layer by layer with the module's own parameters (functional ops; the module
tree and state-dict keys are untouched). What makes it exact where per-tile decoding is not:
- GroupNorm statistics are taken over the WHOLE activation (Wu & He 2018, Eq. 1-2): a chunked
  float64 reduction of sum and sum of squares per (sample, group); the affine map and SiLU are
  then applied strip by strip.
- A 3x3 convolution of a strip reads a halo of ``padding`` rows from the full input; zero
  padding is added only at the real top / bottom border (strips span the full width).
- Nearest-neighbour 2x upsampling and its conv are fused per strip: the upsampled input is never
  materialised in full.
- Self-attention (``AttnBlock``) is exact with query chunks against the full keys and values.

Memory: a ResNet block holds its input and one activation of its output (the second conv writes
into the first conv's output in place, keeping the overwritten halo rows aside), instead of the
four to five full-size temporaries of the untiled forward; strip temporaries are bounded by
``strip_bytes``. Measured numbers: ``benchmarks/bench_tiled_decode.py`` and the README.
``LinAttnBlock`` (linear attention, a global reduction without a norm) runs untiled.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.attention_backends import attention
from ldm.modules.autoencoder_blocks import AttnBlock, ResnetBlock, Upsample
from ldm.modules.upsample_conv import upsample_conv2d

#: default budget for one strip's temporaries (input with halo, normalised copy, conv output)
STRIP_BYTES = 32 * 2**20

Pointwise = Callable[[torch.Tensor], torch.Tensor]


def _rows(x: torch.Tensor, channels: int, strip_bytes: int) -> int:
    """Rows per strip so that a [B, channels, rows, W] float32 strip fits ``strip_bytes``."""
    per_row = x.shape[0] * channels * x.shape[-1] * 4
    return max(1, strip_bytes // max(per_row, 1))


def _spans(height: int, rows: int) -> Iterator[tuple[int, int]]:
    for r0 in range(0, height, rows):
        yield r0, min(r0 + rows, height)


class GroupStats:
    """Per-(sample, group) sums in float64, accumulated strip by strip -> GroupNorm scale/shift."""

    def __init__(self, norm: nn.GroupNorm, batch: int, device: torch.device) -> None:
        self.norm = norm
        self.s1 = torch.zeros(batch, norm.num_groups, dtype=torch.float64, device=device)
        self.s2 = torch.zeros_like(self.s1)
        self.count = 0

    def add(self, strip: torch.Tensor) -> None:
        """Accumulate a [B, C, r, W] strip."""
        b = strip.shape[0]
        g = strip.reshape(b, self.norm.num_groups, -1).double()  # [B, G, C/G * r * W]
        self.s1 += g.sum(-1)
        self.s2 += g.square().sum(-1)
        self.count += g.shape[-1]

    def affine(self, silu: bool) -> Pointwise:
        """x -> GroupNorm(x) (whole-activation statistics), then SiLU when ``silu``."""
        n = self.norm
        mean = self.s1 / self.count  # [B, G]
        var = (self.s2 / self.count - mean.square()).clamp_min(0)
        rstd = (var + n.eps).rsqrt()
        per = n.num_channels // n.num_groups
        rstd_c = rstd.repeat_interleave(per, dim=1)  # [B, C]
        mean_c = mean.repeat_interleave(per, dim=1)
        gamma = n.weight.double() if n.weight is not None else 1.0
        beta = n.bias.double() if n.bias is not None else 0.0
        scale = rstd_c * gamma  # [B, C]
        shift = beta - mean_c * scale

        def apply(x: torch.Tensor) -> torch.Tensor:
            y = torch.addcmul(
                shift.to(torch.float32)[:, :, None, None],
                x.float(),
                scale.to(torch.float32)[:, :, None, None],
            )
            return (F.silu(y) if silu else y).to(x.dtype)

        return apply


def group_stats(x: torch.Tensor, norm: nn.GroupNorm, strip_bytes: int) -> GroupStats:
    """GroupNorm statistics of the whole ``x`` [B, C, H, W], read in strips."""
    stats = GroupStats(norm, x.shape[0], x.device)
    for r0, r1 in _spans(x.shape[2], _rows(x, x.shape[1], strip_bytes)):
        stats.add(x[:, :, r0:r1])
    return stats


def _conv_rows(
    conv: nn.Conv2d, src: torch.Tensor, top: bool, bottom: bool, pre: Pointwise | None
) -> torch.Tensor:
    """conv over rows that already carry their halo; zero rows added only at a real border."""
    p = conv.padding[0]
    if pre is not None:
        src = pre(src)
    if p and (top or bottom):
        src = F.pad(src, (0, 0, p if top else 0, p if bottom else 0))
    return F.conv2d(src, conv.weight, conv.bias, conv.stride, (0, conv.padding[1]))


def conv_strips(
    conv: nn.Conv2d,
    x: torch.Tensor,
    strip_bytes: int,
    pre: Pointwise | None = None,
    post: Callable[[torch.Tensor, int, int], torch.Tensor] | None = None,
    out: torch.Tensor | None = None,
    stats: GroupStats | None = None,
) -> torch.Tensor:
    """conv(pre(x)) strip by strip (stride 1, 'same' padding), then ``post(y, r0, r1)``.

    ``out is x`` computes in place: the last ``padding`` input rows of each strip are kept aside
    before the strip is overwritten, so the next strip still reads its original halo. ``stats``
    accumulates the GroupNorm sums of the output as it is written.
    """
    if (
        conv.stride != (1, 1)
        or conv.padding_mode != "zeros"
        or conv.padding[0] != conv.kernel_size[0] // 2
    ):
        raise ValueError(f"conv_strips needs a stride-1 'same' conv, got {conv}")
    b, _, height, width = x.shape
    p = conv.padding[0]
    if out is None:
        out = x.new_empty(b, conv.out_channels, height, width)
    in_place = out is x
    rows = _rows(x, max(x.shape[1], conv.out_channels) * 3, strip_bytes)
    kept: torch.Tensor | None = None  # original rows above the strip (in place)
    for r0, r1 in _spans(height, rows):
        lo, hi = max(r0 - p, 0), min(r1 + p, height)
        src = x[:, :, lo:hi]
        if in_place and kept is not None:
            src = torch.cat([kept, x[:, :, r0:hi]], dim=2)
        y = _conv_rows(conv, src, r0 - p < 0, r1 + p > height, pre)  # [B, C_out, r1 - r0, W]
        if post is not None:
            y = post(y, r0, r1)
        if in_place and p:
            kept = x[:, :, max(r1 - p, 0) : r1].clone()
        out[:, :, r0:r1] = y
        if stats is not None:
            stats.add(y)
    return out


def _upconv_rows(conv: nn.Conv2d, x: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
    """Rows [r0, r1) of conv(nearest_2x(x)), from the source rows they need.

    Output row ``2i + a`` reads source rows ``i - 1 + a`` and ``i + a``, so one source row of
    halo on each side suffices; the strip's own first / last output row, computed against zero
    padding, is dropped unless it lies on the image border (where zero padding is right)."""
    height = x.shape[2]
    s0, s1 = max(r0 // 2 - 1, 0), min((r1 - 1) // 2 + 2, height)
    y = upsample_conv2d(x[:, :, s0:s1], conv.weight, conv.bias)  # rows [2 s0, 2 s1)
    return y[:, :, r0 - 2 * s0 : r1 - 2 * s0]


class UpsampledRows:
    """conv(nearest_2x(x)) that is never stored: ``self[:, :, r0:r1]`` computes those rows.

    Stands in for the activation where it is read only in row ranges (GroupNorm statistics, a
    conv with its halo, the shortcut), trading three computations of the upsampling conv for
    the largest activation of the decoder."""

    def __init__(self, up: Upsample, x: torch.Tensor) -> None:
        self.conv, self.x = up.conv, x
        b, _, h, w = x.shape
        self.shape = torch.Size((b, up.conv.out_channels, 2 * h, 2 * w))
        self.dtype, self.device = x.dtype, x.device

    def __getitem__(self, key: tuple) -> torch.Tensor:
        rows = key[2]
        r0, r1, _ = rows.indices(self.shape[2])
        return _upconv_rows(self.conv, self.x, r0, r1)

    def new_empty(self, *size: int) -> torch.Tensor:
        return self.x.new_empty(*size)


def upsample_conv_strips(
    up: Upsample, x: torch.Tensor, strip_bytes: int, stats: GroupStats | None = None
) -> torch.Tensor:
    """conv(nearest_2x(x)) per output strip, reading only the source rows each strip needs."""
    if not up.with_conv:
        y = F.interpolate(x, scale_factor=2.0, mode="nearest")
        if stats is not None:
            stats.add(y)
        return y
    conv = up.conv
    b, c, h, w = x.shape
    out = x.new_empty(b, conv.out_channels, 2 * h, 2 * w)
    rows = max(2, _rows(out, max(c, conv.out_channels) * 3, strip_bytes))
    for r0, r1 in _spans(2 * h, rows):
        y = _upconv_rows(conv, x, r0, r1)
        out[:, :, r0:r1] = y
        if stats is not None:
            stats.add(y)
    return out


def resnet_block(
    block: ResnetBlock, x: torch.Tensor, strip_bytes: int, stats_in: GroupStats | None = None
) -> torch.Tensor:
    """x + conv2(SiLU(GN2(conv1(SiLU(GN1(x)))))) with the shortcut: input + one output activation."""
    if getattr(block, "temb_proj", None) is not None:
        raise ValueError(
            "tiled decoding: ResNet blocks with a timestep embedding are not supported"
        )
    s1 = stats_in or group_stats(x, block.norm1, strip_bytes)
    s2 = GroupStats(block.norm2, x.shape[0], x.device)
    h = conv_strips(block.conv1, x, strip_bytes, pre=s1.affine(silu=True), stats=s2)
    pre2 = s2.affine(silu=True)
    if block.training and block.dropout.p > 0:
        raise ValueError("tiled decoding runs in eval mode (dropout would differ per strip)")
    if block.in_channels == block.out_channels:

        def shortcut(r0: int, r1: int) -> torch.Tensor:
            return x[:, :, r0:r1]

    elif block.use_conv_shortcut:
        sc = block.conv_shortcut
        p = sc.padding[0]

        def shortcut(r0: int, r1: int) -> torch.Tensor:
            lo, hi = max(r0 - p, 0), min(r1 + p, x.shape[2])
            return _conv_rows(sc, x[:, :, lo:hi], r0 - p < 0, r1 + p > x.shape[2], None)

    else:
        nin = block.nin_shortcut

        def shortcut(r0: int, r1: int) -> torch.Tensor:
            return F.conv2d(x[:, :, r0:r1], nin.weight, nin.bias)

    return conv_strips(
        block.conv2, h, strip_bytes, pre=pre2, post=lambda y, r0, r1: shortcut(r0, r1) + y, out=h
    )


def attn_block(block: AttnBlock, x: torch.Tensor, strip_bytes: int) -> torch.Tensor:
    """x + proj_out(softmax(q k^T / sqrt(C)) v), exact: full keys/values, query chunks, in place."""
    b, c, height, width = x.shape
    norm = group_stats(x, block.norm, strip_bytes).affine(silu=False)
    k = x.new_empty(b, 1, height * width, c)  # [B, 1, HW, C]
    v = torch.empty_like(k)
    rows = _rows(x, 3 * c, strip_bytes)
    for r0, r1 in _spans(height, rows):
        hn = norm(x[:, :, r0:r1])
        sl = slice(r0 * width, r1 * width)
        k[:, 0, sl] = F.conv2d(hn, block.k.weight, block.k.bias).flatten(2).transpose(1, 2)
        v[:, 0, sl] = F.conv2d(hn, block.v.weight, block.v.bias).flatten(2).transpose(1, 2)
    for r0, r1 in _spans(height, rows):
        hn = norm(x[:, :, r0:r1])
        q = F.conv2d(hn, block.q.weight, block.q.bias).flatten(2).transpose(1, 2)[:, None]
        o = attention(q, k, v, backend=block.backend)  # [B, 1, n, C]
        o = o[:, 0].transpose(1, 2).reshape(b, c, r1 - r0, width)
        x[:, :, r0:r1] += F.conv2d(o, block.proj_out.weight, block.proj_out.bias)
    return x


def _attn(module: nn.Module, x: torch.Tensor, strip_bytes: int) -> torch.Tensor:
    if isinstance(module, nn.Identity):
        return x
    if isinstance(module, AttnBlock):
        return attn_block(module, x, strip_bytes)
    return module(x)  # LinAttnBlock and others: untiled


@torch.no_grad()
def decoder_forward_tiled(
    decoder: Any,
    z: torch.Tensor,
    strip_bytes: int = STRIP_BYTES,
    recompute_last_upsample: bool = True,
) -> torch.Tensor:
    """``Decoder.forward`` computed in strips; equal to it to float tolerance (module docstring).

    ``recompute_last_upsample``: the last upsampling conv's output (the decoder's largest
    activation: SD's 256 channels at full resolution) is not stored but computed in row ranges
    where the next ResNet block reads it, three times over (about a third more compute)."""
    h = conv_strips(decoder.conv_in, z, strip_bytes)
    h = resnet_block(decoder.mid.block_1, h, strip_bytes)
    h = _attn(decoder.mid.attn_1, h, strip_bytes)
    h = resnet_block(decoder.mid.block_2, h, strip_bytes)
    stats: GroupStats | None = None  # norm1 statistics of the next block, taken while upsampling
    for i_level in reversed(range(decoder.num_resolutions)):
        up = decoder.up[i_level]
        for i_block in range(decoder.num_res_blocks + 1):
            h = resnet_block(up.block[i_block], h, strip_bytes, stats)
            stats = None
            if len(up.attn) > 0:
                h = _attn(up.attn[i_block], h, strip_bytes)
        if i_level == 1 and up.upsample.with_conv and recompute_last_upsample:
            h = UpsampledRows(up.upsample, h)  # read by the next ResNet block in row ranges
        elif i_level != 0:
            nxt = decoder.up[i_level - 1].block[0].norm1
            stats = GroupStats(nxt, h.shape[0], h.device)
            h = upsample_conv_strips(up.upsample, h, strip_bytes, stats)
    if decoder.give_pre_end:
        return h
    pre = group_stats(h, decoder.norm_out, strip_bytes).affine(silu=True)
    post = (lambda y, r0, r1: torch.tanh(y)) if decoder.tanh_out else None
    return conv_strips(decoder.conv_out, h, strip_bytes, pre=pre, post=post)


@contextlib.contextmanager
def tiled_decoding(decoder: nn.Module, strip_bytes: int = STRIP_BYTES) -> Iterator[None]:
    """Within the block ``decoder(z)`` runs :func:`decoder_forward_tiled` (same output)."""
    previous = getattr(decoder, "tiled_strip_bytes", None)
    decoder.tiled_strip_bytes = int(strip_bytes)
    try:
        yield
    finally:
        decoder.tiled_strip_bytes = previous
