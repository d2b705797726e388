"""The U-Net's 2-D convolution: ``nn.Conv2d`` whose 3x3 'same' CPU calls take the fastest form.

Inference (no autograd graph): the Winograd form with cached transformed weights
(``ldm.modules.winograd``). fp32 training: Winograd F(4x4) or im2col forward+backward where they
beat oneDNN's direct convolution (``ldm.modules.conv_training``). Everything else, and
``LDM_WINOGRAD=0``: the direct convolution.
"""

from __future__ import annotations

import torch
from torch import nn

from ldm import malloc_policy
from ldm.modules.conv_training import conv3x3_for_training, training_form
from ldm.modules.winograd import (
    cached_weight,
    compute_dtype,
    drop_cached,
    tile_size,
    winograd_conv3x3,
)


def applies_after_upsampling(conv: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``conv`` would run in the Winograd form (cached, in inference) or a training form
    (``training_form``) on ``x`` upsampled 2x (nearest): then the fused upsampling conv, which
    rebuilds its kernels on every call, is the slower choice. The training forms count only with
    freed memory kept (``ldm.malloc_policy``). fp32 forward+backward, Xeon AVX-512, 2 threads:
    1280 channels 16x16 -> 32x32 batch 2 fused 395 ms, upsampled + Winograd 274 ms; 640 channels
    32x32 -> 64x64 337 vs 291 ms; batch 1 242 vs 182 and 177 vs 149 ms. Under glibc's defaults
    the fused form won at 640 channels (350 vs 408 ms, 176 vs 185 ms)."""
    if type(conv) is not WinogradConv2d or x.dim() != 4:
        return False
    dtype = compute_dtype(x)
    if tile_size(conv, x, dtype, pixels=4 * x.shape[2] * x.shape[3]) > 0:
        return True
    return malloc_policy.retained() and training_form(conv, x, dtype, upsampled=True) is not None


class WinogradConv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters, state-dict keys and behaviour) whose 3x3 'same' calls on
    the CPU run as a Winograd convolution without an autograd graph when ``tile_size`` picks one,
    and in fp32 training in the form ``training_form`` picks. Set ``LDM_WINOGRAD=0`` to always use
    the direct convolution."""

    def _conv_forward(
        self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        if weight is self.weight:
            dtype = compute_dtype(input)
            m = tile_size(self, input, dtype)
            if m:
                u = cached_weight(self, m, dtype)
                if u is not None:
                    b = bias if bias is None else bias.to(dtype)
                    return winograd_conv3x3(input.to(dtype), u, b, m)
            else:
                if weight.requires_grad and torch.is_grad_enabled():
                    # training again after sampling (image logging, evaluation): the weights are
                    # about to change, so free their transform instead of holding it in training
                    drop_cached(self)
                form = training_form(self, input, dtype)
                if form:
                    return conv3x3_for_training(form, input, weight, bias, self.stride[0])
        return super()._conv_forward(input, weight, bias)
