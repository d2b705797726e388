"""U-Net building blocks of guided-diffusion / LDM: ResBlock, Upsample, Downsample, helpers.

Dhariwal & Nichol 2021 ("Diffusion Models Beat GANs", Sec. 3) with the key names of CompVis
`openaimodel.py` so SD checkpoints load unchanged.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.activation_recompute import checkpoint
from ldm.modules.attention import SpatialTransformer
from ldm.modules.conv2d import WinogradConv2d
from ldm.modules.norm_act import add_skip, norm_silu
from ldm.modules.upsample_conv import upsample_conv2d, worth_fusing


def conv_nd(dims: int, *args, **kwargs) -> nn.Module:
    """A 1-D, 2-D or 3-D convolution (2-D: ``WinogradConv2d``, an ``nn.Conv2d`` that runs 3x3
    inference on the CPU in the Winograd form where that is faster)."""
    convs = {1: nn.Conv1d, 2: WinogradConv2d, 3: nn.Conv3d}
    if dims not in convs:
        raise ValueError(f"unsupported dims {dims!r}; expected 1, 2 or 3")
    return convs[dims](*args, **kwargs)


def avg_pool_nd(dims: int, *args, **kwargs) -> nn.Module:
    """A 1-D, 2-D or 3-D average pooling."""
    pools = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}
    if dims not in pools:
        raise ValueError(f"unsupported dims {dims!r}; expected 1, 2 or 3")
    return pools[dims](*args, **kwargs)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero the parameters of a module and return it (residual branches start as identity)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in fp32 for half-precision inputs (guided-diffusion `GroupNorm32`).

    On CPU, bf16 goes through the native kernel, which already accumulates the statistics and
    normalizes in fp32 (opmath) and rounds once; the explicit upcast would only add two copies.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.bfloat16 and x.device.type == "cpu":
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        if x.dtype in (torch.float16, torch.bfloat16):
            weight = None if self.weight is None else self.weight.float()
            bias = None if self.bias is None else self.bias.float()
            out = F.group_norm(x.float(), self.num_groups, weight, bias, self.eps)
            return out.to(x.dtype)
        return super().forward(x)


def normalization(channels: int) -> nn.Module:
    """GroupNorm with 32 groups (eps 1e-5), as in guided-diffusion."""
    return GroupNorm32(32, channels)


class TimestepBlock(nn.Module):
    """A module whose forward takes the timestep embedding as a second argument."""

    @abstractmethod
    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """Apply the module to x given the timestep embedding emb."""


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    """Sequential that passes emb to TimestepBlocks and context to SpatialTransformers."""

    def forward(
        self,
        x: torch.Tensor,
        emb: torch.Tensor,
        context: torch.Tensor | None = None,
        output_size: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """``output_size``: the spatial size an upsampling layer here produces (the skip
        connection's; see ``Upsample``); None: twice the input's."""
        for layer in self:
            if output_size is not None and isinstance(layer, (Upsample, ResBlock)):
                x = (
                    layer(x, emb, output_size)
                    if isinstance(layer, ResBlock)
                    else layer(x, output_size)
                )
            elif isinstance(layer, TimestepBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling (inner two dims for 3-D), optionally followed by a 3x3 conv.

    ``output_size`` (the spatial size of the skip connection the result is concatenated with)
    upsamples to that size instead, as diffusers' ``Upsample2D`` does for inputs whose side is not
    a multiple of 2 ** (number of downsamplings); twice the input's size takes the usual path.
    """

    def __init__(
        self,
        channels: int,
        use_conv: bool,
        dims: int = 2,
        out_channels: int | None = None,
        padding: int = 1,
    ) -> None:
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        if use_conv:
            self.conv = conv_nd(dims, channels, self.out_channels, 3, padding=padding)

    def forward(self, x: torch.Tensor, output_size: Sequence[int] | None = None) -> torch.Tensor:
        if x.shape[1] != self.channels:
            raise ValueError(f"Upsample expected {self.channels} channels, got {x.shape[1]}")
        if output_size is not None:
            size = tuple(int(s) for s in output_size)[-2:]
            if size == (2 * x.shape[-2], 2 * x.shape[-1]):
                output_size = None  # the usual 2x: keep the fast paths below
        if output_size is not None:  # an odd skip size: nearest to exactly that size
            size = size if self.dims != 3 else (x.shape[2], *size)
            x = F.interpolate(x, size=size, mode="nearest")
        elif self.dims == 2 and self.use_conv and worth_fusing(self.conv, x):
            return upsample_conv2d(x, self.conv.weight, self.conv.bias)
        elif self.dims == 3:
            x = F.interpolate(x, (x.shape[2], x.shape[3] * 2, x.shape[4] * 2), mode="nearest")
        else:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """2x downsampling by a strided 3x3 conv or average pooling (inner two dims for 3-D)."""

    def __init__(
        self,
        channels: int,
        use_conv: bool,
        dims: int = 2,
        out_channels: int | None = None,
        padding: int = 1,
    ) -> None:
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        stride = 2 if dims != 3 else (1, 2, 2)
        if use_conv:
            self.op = conv_nd(dims, channels, self.out_channels, 3, stride=stride, padding=padding)
        else:
            if self.channels != self.out_channels:
                raise ValueError(
                    f"Downsample without conv keeps the channel count; got {channels} -> "
                    f"{self.out_channels}. Set conv_resample=True."
                )
            self.op = avg_pool_nd(dims, kernel_size=stride, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.channels:
            raise ValueError(f"Downsample expected {self.channels} channels, got {x.shape[1]}")
        return self.op(x)


class ResBlock(TimestepBlock):
    """Residual block conditioned on the timestep embedding (additive or scale-shift/AdaGN)."""

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int | None = None,
        use_conv: bool = False,
        use_scale_shift_norm: bool = False,
        dims: int = 2,
        use_checkpoint: bool = False,
        up: bool = False,
        down: bool = False,
    ) -> None:
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_checkpoint = use_checkpoint
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(
            normalization(channels),
            nn.SiLU(),
            conv_nd(dims, channels, self.out_channels, 3, padding=1),
        )
        self.updown = up or down
        if up:
            self.h_upd = Upsample(channels, False, dims)
            self.x_upd = Upsample(channels, False, dims)
        elif down:
            self.h_upd = Downsample(channels, False, dims)
            self.x_upd = Downsample(channels, False, dims)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        emb_out = 2 * self.out_channels if use_scale_shift_norm else self.out_channels
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, emb_out))
        self.out_layers = nn.Sequential(
            normalization(self.out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(conv_nd(dims, self.out_channels, self.out_channels, 3, padding=1)),
        )
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 1)

    def forward(
        self, x: torch.Tensor, emb: torch.Tensor, output_size: Sequence[int] | None = None
    ) -> torch.Tensor:
        """x: [B, C, *spatial], emb: [B, emb_channels] -> [B, out_channels, *spatial'];
        ``output_size``: the size an up block produces (see ``Upsample``)."""
        if output_size is not None and isinstance(self.h_upd, Upsample):
            return checkpoint(
                self._forward, x, emb, tuple(output_size), enabled=self.use_checkpoint
            )
        return checkpoint(self._forward, x, emb, enabled=self.use_checkpoint)

    def _forward(
        self, x: torch.Tensor, emb: torch.Tensor, output_size: tuple[int, ...] | None = None
    ) -> torch.Tensor:
        in_norm, in_conv = self.in_layers[0], self.in_layers[-1]
        if self.updown and output_size is not None:
            h = self.h_upd(norm_silu(in_norm, x), output_size)
            x = self.x_upd(x, output_size)
            h = in_conv(h)
        elif self.updown:
            h = self.h_upd(norm_silu(in_norm, x))
            x = self.x_upd(x)
            h = in_conv(h)
        else:
            h = in_conv(norm_silu(in_norm, x))
        emb_out = self.emb_layers(emb).type(h.dtype)
        emb_out = emb_out.reshape(*emb_out.shape, *([1] * (h.ndim - 2)))  # [B, C] -> [B, C, 1, ...]
        out_norm, out_rest = self.out_layers[0], self.out_layers[2:]  # [1] is the SiLU
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = out_rest(F.silu(torch.addcmul(shift, out_norm(h), 1 + scale)))
        else:
            h = out_rest(norm_silu(out_norm, h + emb_out))
        return add_skip(h, self.skip_connection(x))
