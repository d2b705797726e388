"""Convolutional Encoder E and Decoder D of the LDM first stage (Rombach et al. 2022, Sec. 3.1).

Constructor arguments are the CompVis `ddconfig` keys; module names match
`ldm.modules.diffusionmodules.model` so SD checkpoints load key for key. One addition:
`norm_num_groups` (default 32 as CompVis; diffusers has the same knob). Narrow networks need
fewer groups: with ch=32 and 32 groups every GroupNorm is an instance norm, and the decoder's
`norm_out` then erases each image's mean colour, which caps reconstruction quality.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ldm import malloc_policy
from ldm.modules.autoencoder_blocks import (
    Downsample,
    Normalize,
    ResnetBlock,
    Upsample,
    make_attn,
    nonlinearity,
)
from ldm.modules.winograd import RETAINED_MIN_CHANNELS

__all__ = ["Decoder", "Encoder"]


def _attn_type(attn_type: str, use_linear_attn: bool) -> str:
    return "linear" if use_linear_attn else attn_type


class _Mid(nn.Module):
    """Middle section: ResNet block, attention, ResNet block."""

    def __init__(self, channels: int, dropout: float, attn_type: str, groups: int) -> None:
        super().__init__()
        kw = dict(
            in_channels=channels, out_channels=channels, dropout=dropout, norm_num_groups=groups
        )
        self.block_1 = ResnetBlock(**kw)
        self.attn_1 = make_attn(channels, attn_type=attn_type, norm_num_groups=groups)
        self.block_2 = ResnetBlock(**kw)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


def _cpu_channels_last(x: torch.Tensor, upscale: int = 1, widest: int = 0) -> torch.Tensor:
    """``x`` in channels-last layout for CPU inference at 128x128 pixels and up (batch x height x
    width of ``x`` times ``upscale``, the decoder's pixels per latent), where oneDNN's
    convolutions read and write NHWC directly (no reorder of the large activations around each
    conv); below that the weights' per-call reorder costs more than it saves. Measured in
    ``benchmarks/bench_vae.py``. The forward returns a contiguous (NCHW) tensor either way; with
    a graph recorded (training) the layout is left alone. With freed memory kept in the process
    (``ldm.malloc_policy``, the commands' setting) NCHW is kept for an autoencoder whose
    ``widest`` level reaches the Winograd convolution's channels (``RETAINED_MIN_CHANNELS``): it
    then covers the 256-512 channel levels (``ldm.modules.winograd``) and reads NCHW faster (SD
    decode at 512x512: 5.5 s NCHW against 6.7 s channels-last, encode 2.8 against 3.4 s); a narrow
    one (the default run's 32-64 channels) keeps channels-last. Where NCHW is the pick, a
    channels-last input is made NCHW: a training batch of images arrives [B, H, W, C] and
    ``get_input``'s permute to [B, C, H, W] is a channels-last view, which the convolutions would
    otherwise carry through the whole encoder (SD encode at 512x512 with memory kept: 3.3 s from
    that view, 2.9 s from NCHW)."""
    if x.device.type != "cpu" or x.dim() != 4 or torch.is_grad_enabled():
        return x
    winograd_nchw = malloc_policy.retained() and widest >= RETAINED_MIN_CHANNELS
    if not winograd_nchw and x.shape[0] * x.shape[2] * x.shape[3] * upscale >= 128 * 128:
        return x.contiguous(memory_format=torch.channels_last)
    return x.contiguous()


class Encoder(nn.Module):
    """E: x [B, in_channels, H, W] -> [B, (2 if double_z else 1) * z_channels, H/f, W/f], f = 2^(len(ch_mult)-1)."""

    def __init__(
        self,
        *,
        ch: int,
        out_ch: int,
        ch_mult: Sequence[int] = (1, 2, 4, 8),
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        dropout: float = 0.0,
        resamp_with_conv: bool = True,
        in_channels: int,
        resolution: int,
        z_channels: int,
        double_z: bool = True,
        use_linear_attn: bool = False,
        attn_type: str = "vanilla",
        norm_num_groups: int = 32,
        **ignore_kwargs,
    ) -> None:
        super().__init__()
        attn_type = _attn_type(attn_type, use_linear_attn)
        self.ch = ch
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.resolution = resolution
        self.widest = ch * max(ch_mult)  # the layout policy's width (``_cpu_channels_last``)
        self.in_channels = in_channels
        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)

        curr_res = resolution
        in_ch_mult = (1, *tuple(ch_mult))
        self.in_ch_mult = in_ch_mult
        self.down = nn.ModuleList()
        block_in = ch
        for i_level in range(self.num_resolutions):
            block = nn.ModuleList()
            attn = nn.ModuleList()
            block_in = ch * in_ch_mult[i_level]
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks):
                block.append(
                    ResnetBlock(
                        in_channels=block_in,
                        out_channels=block_out,
                        dropout=dropout,
                        norm_num_groups=norm_num_groups,
                    )
                )
                block_in = block_out
                if curr_res in attn_resolutions:
                    attn.append(make_attn(block_in, attn_type, norm_num_groups))
            down = nn.Module()
            down.block = block
            down.attn = attn
            if i_level != self.num_resolutions - 1:
                down.downsample = Downsample(block_in, resamp_with_conv)
                curr_res = curr_res // 2
            self.down.append(down)

        self.mid = _Mid(block_in, dropout, attn_type, norm_num_groups)
        self.norm_out = Normalize(block_in, norm_num_groups)
        self.conv_out = nn.Conv2d(
            block_in, 2 * z_channels if double_z else z_channels, kernel_size=3, stride=1, padding=1
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C_in, H, W] -> moments or z [B, (2) z_channels, H/f, W/f]."""
        h = self.conv_in(_cpu_channels_last(x, widest=self.widest))
        for i_level, down in enumerate(self.down):
            for i_block in range(self.num_res_blocks):
                h = down.block[i_block](h)
                if len(down.attn) > 0:
                    h = down.attn[i_block](h)
            if i_level != self.num_resolutions - 1:
                h = down.downsample(h)
        h = self.mid(h)
        return self.conv_out(nonlinearity(self.norm_out(h))).contiguous()


class Decoder(nn.Module):
    """D: z [B, z_channels, h, w] -> image [B, out_ch, h*f, w*f]; optional tanh output (tanh_out)."""

    def __init__(
        self,
        *,
        ch: int,
        out_ch: int,
        ch_mult: Sequence[int] = (1, 2, 4, 8),
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        dropout: float = 0.0,
        resamp_with_conv: bool = True,
        in_channels: int,
        resolution: int,
        z_channels: int,
        give_pre_end: bool = False,
        tanh_out: bool = False,
        use_linear_attn: bool = False,
        attn_type: str = "vanilla",
        norm_num_groups: int = 32,
        **ignore_kwargs,
    ) -> None:
        super().__init__()
        attn_type = _attn_type(attn_type, use_linear_attn)
        self.ch = ch
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.resolution = resolution
        self.widest = ch * max(ch_mult)  # the layout policy's width (``_cpu_channels_last``)
        self.in_channels = in_channels
        self.give_pre_end = give_pre_end
        self.tanh_out = tanh_out

        block_in = ch * ch_mult[self.num_resolutions - 1]
        curr_res = resolution // 2 ** (self.num_resolutions - 1)
        self.z_shape = (1, z_channels, curr_res, curr_res)
        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = _Mid(block_in, dropout, attn_type, norm_num_groups)

        self.up = nn.ModuleList()
        for i_level in reversed(range(self.num_resolutions)):
            block = nn.ModuleList()
            attn = nn.ModuleList()
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks + 1):
                block.append(
                    ResnetBlock(
                        in_channels=block_in,
                        out_channels=block_out,
                        dropout=dropout,
                        norm_num_groups=norm_num_groups,
                    )
                )
                block_in = block_out
                if curr_res in attn_resolutions:
                    attn.append(make_attn(block_in, attn_type, norm_num_groups))
            up = nn.Module()
            up.block = block
            up.attn = attn
            if i_level != 0:
                up.upsample = Upsample(block_in, resamp_with_conv)
                curr_res = curr_res * 2
            self.up.insert(0, up)  # keep indices in resolution order, as the checkpoints do

        self.norm_out = Normalize(block_in, norm_num_groups)
        self.conv_out = nn.Conv2d(block_in, out_ch, kernel_size=3, stride=1, padding=1)

    #: set by ``ldm.modules.autoencoder_tiled.tiled_decoding``: forward runs the exact tiled walk
    tiled_strip_bytes: int | None = None

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """[B, z_channels, h, w] -> [B, out_ch, h*f, w*f]."""
        self.last_z_shape = z.shape
        if self.tiled_strip_bytes:
            from ldm.modules.autoencoder_tiled import decoder_forward_tiled

            return decoder_forward_tiled(self, z, self.tiled_strip_bytes)
        upscale = 4 ** (self.num_resolutions - 1)
        h = self.mid(self.conv_in(_cpu_channels_last(z, upscale, widest=self.widest)))
        for i_level in reversed(range(self.num_resolutions)):
            up = self.up[i_level]
            for i_block in range(self.num_res_blocks + 1):
                h = up.block[i_block](h)
                if len(up.attn) > 0:
                    h = up.attn[i_block](h)
            if i_level != 0:
                h = up.upsample(h)
        if self.give_pre_end:
            return h.contiguous()
        h = self.conv_out(nonlinearity(self.norm_out(h)))
        return (torch.tanh(h) if self.tanh_out else h).contiguous()
