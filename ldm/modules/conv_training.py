"""Faster forms of the 3x3 'same' convolution's forward+backward for fp32 CPU training.

oneDNN's direct convolution runs the U-Net's forward+backward at 300-340 GFLOP/s at 32x32 and
64x64 on this project's CPUs, but only ~110 GFLOP/s on 8x8 images with 1280 channels. Two exact
reformulations, each an autograd function with its own backward (the backward is built from
differentiable operations, so double backward works too; under forward-mode AD and
``torch.func`` transforms the direct convolution runs):

- ``winograd4``: Winograd F(4x4, 3x3) (``ldm.modules.winograd``) for images above 16x16. Forward
  Y = A^T [U . V] A with U = G g G^T, V = B^T d B; the input gradient is the same Winograd
  convolution of dY with the flipped, transposed kernel (``_winograd_input_grad``); the weight
  gradient is G^T [sum over tiles of (A dY A^T) V^T] G. 4x fewer multiplications, at the cost of
  transforming the weights every step (no cache: they change) and ~1e-5 relative rounding
  (direct: ~5e-7). It saves the transformed input V (2.25x the input) instead of the input, so
  the weight gradient does not transform it again: forward+backward 71 vs 78 ms at (2, 320, 64 x
  64), 110 vs 114 ms at (2, 1280, 16 x 16); the SD v1 U-Net's saved activations grow by 256 MiB
  to 3577 MiB at batch 2 x 64 x 64, where diffusers' are 3569 MiB (and the feature-major
  feed-forward, ``ldm.modules.geglu_feed_forward``, saves 353 MiB of them again).
- ``im2col``: the convolution as one GEMM over the unfolded input (and two in the backward, the
  input gradient folded back with ``F.fold``) where the batch's pixels are few and the channels
  wide: oneDNN's convolution runs SD v1's 8x8 level at ~110 GFLOP/s, MKL's GEMM at ~300. Same
  rounding as the direct form. Also the stride-2 downsampling conv into 8x8 (1280 channels),
  whose oneDNN backward ran at ~40 GFLOP/s in a training step: forward+backward 0.43-0.64 of
  oneDNN's at batch 1-4 (0.77-0.85 with ``ldm.malloc_policy``'s allocator setting), 0.92-0.96 at
  640 channels, 1.2-1.6 at 32x32 and 64x64 (left direct).

Per layer, fp32 forward+backward against oneDNN's, 2 threads, Xeon (AVX-512), torch 2.14.1
(``benchmarks/bench_winograd.py --training``, table in ``benchmarks/README.md``): winograd4
0.58-0.81 at 32x32 and 64x64 with batch 1-2 (the wider the layer, the smaller the gain), 0.95 at
batch 4 x 64x64, 1.6-4.4 at 16x16 and below under glibc's allocator defaults (the per-step weight
transforms dominate; with freed memory kept, ``ldm.malloc_policy``: 0.81-0.90 at batch 2 x 16x16
from 640 channels, see ``RETAINED_SMALL_F4_MIN_CHANNELS``); im2col 0.54-0.96 up to 256 batch
pixels with 1280-2560 channels, 0.92-1.10 at 512 (16x16 batch 2), 1.06 at 8x8 batch 8, 1.24 for
320 channels. ``training_form`` holds that policy; ``LDM_WINOGRAD=0`` turns both off.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldm import malloc_policy
from ldm.modules.custom_autograd import custom_backward_allowed
from ldm.modules.winograd import (
    FP32_F2_MAX_PIXELS,
    fp32_f4_limits,
    input_transform,
    kron_matrices,
    same_3x3,
    winograd_conv3x3,
    winograd_is_on,
    winograd_weight,
)

FORMS = ("winograd4", "im2col")
#: im2col: at most this many batch pixels (B * H * W): SD v1's 8x8 level at batch 1-4
IM2COL_MAX_BATCH_PIXELS = 256
#: im2col: at least this many input and output channels (a 320-channel layer at 8x8: 1.24x)
IM2COL_MIN_CHANNELS = 640
#: With freed memory kept (``ldm.malloc_policy``), winograd4 also at 16x16 and below from this
#: many channels once the batch has more than ``IM2COL_MAX_BATCH_PIXELS`` pixels: forward+backward
#: 0.81-0.90 of oneDNN's at batch 2 x 16x16 (640-2560 channels), 0.76 at batch 3, 0.65 at batch 4,
#: 0.92 at batch 8 x 8x8, 0.73 at batch 16 x 8x8; 512 channels 1.03, batch 1 x 16x16 1.21-1.32 and
#: batch 2-4 x 8x8 1.33-2.2 (the per-step weight transforms dominate: those stay im2col / direct).
RETAINED_SMALL_F4_MIN_CHANNELS = 640


def training_form(
    conv: nn.Conv2d, x: torch.Tensor, dtype: torch.dtype, upsampled: bool = False
) -> str | None:
    """The form (``FORMS``) to run ``conv`` on ``x`` with while an autograd graph is recorded, or
    None for the direct convolution (not fp32 on the CPU, no graph, an unsupported geometry,
    narrow channels, a channels-last input, compiling, or a size where the direct form is faster).
    ``dtype``: the dtype the convolution runs in (the autocast dtype under autocast).
    ``upsampled``: the form for ``x`` upsampled 2x (nearest) instead, what ``Upsample`` asks."""
    if (
        dtype != torch.float32
        or x.dtype != torch.float32
        or conv.weight.dtype != torch.float32
        or x.device.type != "cpu"
        or x.dim() != 4
        or not (torch.is_grad_enabled() and (x.requires_grad or conv.weight.requires_grad))
        or not (same_3x3(conv) or same_3x3(conv, stride=2))
        or not x.is_contiguous()
        or not custom_backward_allowed()  # compiling, torch.func, forward-mode AD
        or not winograd_is_on()
    ):
        return None
    channels = min(conv.in_channels, conv.out_channels)
    f4_min_channels, f4_max = fp32_f4_limits()  # wider with freed memory kept
    wide_for_im2col = channels >= IM2COL_MIN_CHANNELS
    scale = 2 if upsampled else 1
    h, w = scale * x.shape[2], scale * x.shape[3]
    if conv.stride == (2, 2):  # the downsampling conv: im2col by its output's batch pixels
        ho, wo = _output_size(h, w, 2)
        return (
            "im2col"
            if wide_for_im2col and x.shape[0] * ho * wo <= IM2COL_MAX_BATCH_PIXELS
            else None
        )
    pixels = h * w
    batch_pixels = x.shape[0] * pixels
    if pixels > FP32_F2_MAX_PIXELS and batch_pixels <= f4_max and channels >= f4_min_channels:
        return "winograd4"
    if (
        malloc_policy.retained()
        and IM2COL_MAX_BATCH_PIXELS < batch_pixels <= f4_max
        and channels >= RETAINED_SMALL_F4_MIN_CHANNELS
        and min(h, w) >= 8  # measured at 8x8 and 16x16; smaller images leave most tiles padded
    ):
        return "winograd4"
    if batch_pixels <= IM2COL_MAX_BATCH_PIXELS and wide_for_im2col:
        return "im2col"
    return None


class _InputTransform(torch.autograd.Function):
    """V = B^T d B of every F(m x m) input tile (``input_transform``): linear in x, so it saves
    nothing; its backward (the adjoint: B dV B^T summed back over the overlapping tiles) runs
    only in a double backward through the weight gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, m: int) -> torch.Tensor:
        ctx.shape, ctx.m = x.shape, m
        ctx.set_materialize_grads(False)  # no gradient reaches v in a plain backward: no work
        return input_transform(x, m)[0]

    @staticmethod
    def backward(ctx, grad_v: torch.Tensor | None):
        if grad_v is None:
            return None, None
        b, c, h, w = ctx.shape
        m, t = ctx.m, ctx.m + 2
        nh, nw = -(-h // m), -(-w // m)
        kb, _, _ = kron_matrices(m, grad_v.dtype)
        planes = grad_v.reshape(t * t, c, b, nh * nw).permute(2, 1, 0, 3)
        planes = planes.reshape(b * c, t * t, nh, nw)
        full = F.conv_transpose2d(planes, kb.to(grad_v.device).view(t * t, 1, t, t), stride=m)
        # the padded image [nH m + 2, nW m + 2] -> the input's [H, W]
        return full.view(b, c, nh * m + 2, nw * m + 2)[:, :, 1 : h + 1, 1 : w + 1], None


class _Winograd4Conv(torch.autograd.Function):
    """3x3 'same' convolution in the F(4x4, 3x3) form, forward and backward, from the input ``x``
    and its transformed tiles ``v`` (``_InputTransform``): ``v`` is saved for the weight gradient
    in place of ``x`` (2.25x its size), so the backward does not transform ``x`` again; the
    gradient flows to ``x`` directly, and to ``v`` (hence ``x``) only in a double backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, v: torch.Tensor, weight: torch.Tensor, bias):
        ctx.save_for_backward(v, weight)
        return winograd_conv3x3(x, winograd_weight(weight, 4), bias, 4, v=v)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        v, weight = ctx.saved_tensors
        need_x, _, need_w, need_b = ctx.needs_input_grad
        grad_x = grad_w = grad_b = None
        if need_x:  # the transposed convolution (kernel flipped, channel axes swapped)
            grad_x = _winograd_input_grad(grad, weight, 4)
        if need_w:
            grad_w = _winograd_weight_grad(v, grad, 4)
        if need_b:  # False for a None bias
            grad_b = grad.sum((0, 2, 3))
        return grad_x, None, grad_w, grad_b


#: ``_winograd_input_grad``: above this many tiles (B nH nW) the products run as U^T V
INPUT_GRAD_UT_V_MIN_TILES = 256


def _winograd_input_grad(grad: torch.Tensor, weight: torch.Tensor, m: int) -> torch.Tensor:
    """dL/dx: ``grad`` [B, C_out, H, W] convolved in F(m x m) with the flipped kernel, channel axes
    swapped, from U's untransposed [t^2, C_out, C_in] layout (the transposed weight a view; a
    transposed copy of the weight cost 25 ms per 1280 x 1280 kernel). Up to
    ``INPUT_GRAD_UT_V_MIN_TILES`` tiles the products run as V^T U per tile position ([P, C_out] x
    [C_out, C_in]): 0.71-0.74 of U^T V's time for 1280-2560 channels at 16x16 (batch 1-4), 0.84-0.87
    at 32x32. Above (SD's 64x64 level at batch 2: 512 tiles) as U^T V, whose output scatters into
    the image in runs of 4 values instead of single ones: 0.73-0.81 of V^T U's time for 640-960
    input channels there, level at 320."""
    t = m + 2
    b, _, h, w = grad.shape
    c_in = weight.shape[1]
    u_t = winograd_weight(weight, m, transposed=True)  # [t^2, C_in, C_out], a transposed view
    v, nh, nw = input_transform(grad, m)  # [t^2, C_out, P]
    p = b * nh * nw
    if p > INPUT_GRAD_UT_V_MIN_TILES:
        return winograd_conv3x3(grad, u_t, None, m, v=v)
    _, _, ka = kron_matrices(m, grad.dtype)
    prod = torch.bmm(v.transpose(1, 2), u_t.transpose(1, 2))  # [t^2, P, C_in]
    y = (ka.to(grad.device) @ prod.view(t * t, p * c_in)).view(m, m, b, nh, nw, c_in)  # A^T M A
    y = y.permute(2, 5, 3, 0, 4, 1).reshape(b, c_in, nh * m, nw * m)
    return y[:, :, :h, :w] if nh * m != h or nw * m != w else y


def _winograd_weight_grad(v: torch.Tensor, grad: torch.Tensor, m: int) -> torch.Tensor:
    """dL/dg for Y = A^T [(G g G^T) . V] A summed over tiles: G^T [sum_P (A dY A^T) V^T] G, from
    the input's transformed tiles ``v`` [t^2, C, P]."""
    t = m + 2
    b, c_out, h, w = grad.shape
    c = v.shape[1]
    _, kg, ka = kron_matrices(m, grad.dtype)
    nh, nw = -(-h // m), -(-w // m)
    gp = grad
    if nh * m != h or nw * m != w:  # whole output tiles (zeros past the edge)
        gp = F.pad(grad, (0, nw * m - w, 0, nh * m - h))
    tiles = gp.reshape(b, c_out, nh, m, nw, m).permute(3, 5, 1, 0, 2, 4).reshape(m * m, -1)
    g_prod = (ka.t().to(grad.device) @ tiles).view(t * t, c_out, b * nh * nw)  # A dY A^T per tile
    g_u = torch.bmm(g_prod, v.transpose(1, 2))  # [t^2, C_out, C]
    # G^T dU G per output channel: [9, t^2] x [t^2, C], then one copy into [C_out, C, 3, 3].
    # 0.5-0.7 of one [9, t^2] x [t^2, C_out * C] product and its permuted copy (12 vs 17 ms at
    # 1280 x 1280, 24 vs 35 ms at 1280 x 2560)
    g = torch.bmm(kg.t().to(grad.device).expand(c_out, 9, t * t), g_u.transpose(0, 1))
    return g.transpose(1, 2).reshape(c_out, c, 3, 3)


class _Im2colConv(torch.autograd.Function):
    """3x3 convolution (padding 1, stride 1 or 2) as one GEMM over the unfolded input, forward
    and backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int):
        ctx.save_for_backward(x, weight)
        ctx.stride = stride
        b = x.shape[0]
        ho, wo = _output_size(x.shape[2], x.shape[3], stride)
        c_out = weight.shape[0]
        w2 = weight.reshape(c_out, -1)
        cols = _columns(x, stride)
        y = torch.mm(w2, cols) if bias is None else torch.addmm(bias.unsqueeze(1), w2, cols)
        return y.view(c_out, b, ho, wo).permute(1, 0, 2, 3).contiguous()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b, _ = ctx.needs_input_grad
        stride = ctx.stride
        b, c, h, w = x.shape
        c_out = weight.shape[0]
        g2 = grad.permute(1, 0, 2, 3).reshape(c_out, -1)  # [C_out, B * H_out * W_out]
        grad_x = grad_w = grad_b = None
        if need_x:
            g_cols = torch.mm(weight.reshape(c_out, -1).t(), g2)  # [C * 9, B * H_out * W_out]
            g_cols = g_cols.view(c * 9, b, -1).permute(1, 0, 2)
            grad_x = F.fold(g_cols, (h, w), 3, padding=1, stride=stride)
        if need_w:
            grad_w = torch.mm(g2, _columns(x, stride).t()).view_as(weight)
        if need_b:  # False for a None bias
            grad_b = g2.sum(1)
        return grad_x, grad_w, grad_b, None


def _output_size(h: int, w: int, stride: int) -> tuple[int, int]:
    """The output height and width of a 3x3, padding-1 convolution of an h x w image at
    ``stride``."""
    return (h - 1) // stride + 1, (w - 1) // stride + 1


def _columns(x: torch.Tensor, stride: int = 1) -> torch.Tensor:
    """The 3x3 patches (padding 1) of ``x`` [B, C, H, W] at ``stride`` as
    [C * 9, B * H_out * W_out]."""
    return F.unfold(x, 3, padding=1, stride=stride).permute(1, 0, 2).reshape(x.shape[1] * 9, -1)


def conv3x3_for_training(
    form: str,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: int = 1,
) -> torch.Tensor:
    """The padding-1 3x3 convolution of ``x`` in ``form`` (``FORMS``; stride 2 only for
    "im2col"), differentiable in ``x``, ``weight`` and ``bias`` (twice too: the backward is made
    of differentiable ops)."""
    if form not in FORMS:
        raise ValueError(f"unknown training convolution form {form!r}; expected one of {FORMS}")
    if weight.shape[-2:] != (3, 3) or x.dim() != 4 or x.shape[1] != weight.shape[1]:
        raise ValueError(
            f"conv3x3_for_training needs x [B, C, H, W] and a [C_out, C, 3, 3] weight; got x "
            f"{tuple(x.shape)} and weight {tuple(weight.shape)}"
        )
    if stride not in (1, 2) or (stride == 2 and form != "im2col"):
        raise ValueError(
            f"conv3x3_for_training: stride {stride} with form {form!r}; expected stride 1, or 2 "
            f"with 'im2col'"
        )
    if form == "im2col":
        return _Im2colConv.apply(x, weight, bias, stride)
    return _Winograd4Conv.apply(x, _InputTransform.apply(x, 4), weight, bias)
