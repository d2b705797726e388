"""Winograd F(2x2, 3x3) / F(4x4, 3x3) convolution: exactness, policy, weight cache, U-Net use."""

from __future__ import annotations

import copy
import gc

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ldm import malloc_policy
from ldm.modules import winograd
from ldm.modules.conv2d import WinogradConv2d
from ldm.modules.unet import UNetModel
from ldm.modules.unet_layers import conv_nd
from ldm.modules.winograd import (
    MIN_CHANNELS,
    cache_bytes,
    clear_cache,
    tile_size,
    winograd_conv3x3,
    winograd_enabled,
    winograd_weight,
)

WIDE = MIN_CHANNELS  # narrowest layer the policy converts


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize("size", [(8, 8), (5, 7), (1, 1), (12, 6)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_winograd_equals_direct_convolution_in_float64(m, size, with_bias) -> None:
    """The algorithm is exact: in float64 it equals the direct convolution to rounding, for sizes
    that are not multiples of the tile (padded tiles, cropped output) and a channels-last input."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, *size, dtype=torch.float64, generator=g)
    w = torch.randn(7, 5, 3, 3, dtype=torch.float64, generator=g)
    b = torch.randn(7, dtype=torch.float64, generator=g) if with_bias else None
    ref = F.conv2d(x, w, b, padding=1)
    y = winograd_conv3x3(x, winograd_weight(w, m), b, m)
    assert y.shape == ref.shape
    assert (y - ref).abs().max().item() < 1e-12 * ref.abs().max().item()
    xcl = x.contiguous(memory_format=torch.channels_last)
    assert torch.allclose(winograd_conv3x3(xcl, winograd_weight(w, m), b, m), ref, atol=1e-12)


def test_fp32_error_against_float64_is_that_of_the_direct_kernel() -> None:
    """F(2x2) rounds like the direct convolution; F(4x4)'s larger transform coefficients cost
    about 20x that, still ~1e-5 relative."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 64, 16, 16, dtype=torch.float64, generator=g)
    w = torch.randn(96, 64, 3, 3, dtype=torch.float64, generator=g) / 24
    ref = F.conv2d(x, w, padding=1)
    direct = _rel(F.conv2d(x.float(), w.float(), padding=1), ref)
    f2 = _rel(winograd_conv3x3(x.float(), winograd_weight(w.float(), 2), None, 2), ref)
    f4 = _rel(winograd_conv3x3(x.float(), winograd_weight(w.float(), 4), None, 4), ref)
    assert direct < 1e-6
    assert f2 < 3 * direct
    assert f4 < 5e-5


def test_bf16_f2_error_is_close_to_the_direct_bf16_kernel() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 64, 16, 16, dtype=torch.float64, generator=g)
    w = torch.randn(96, 64, 3, 3, dtype=torch.float64, generator=g) / 24
    ref = F.conv2d(x, w, padding=1)
    xb, wb = x.bfloat16(), w.bfloat16()
    direct = _rel(F.conv2d(xb, wb, padding=1), ref)
    f2 = _rel(winograd_conv3x3(xb, winograd_weight(wb, 2, torch.bfloat16), None, 2), ref)
    assert f2 < 2.5 * direct < 2.5e-2


@pytest.mark.parametrize("m", [2, 4])
def test_transposed_weight_is_the_flipped_swapped_kernels_transform(m: int) -> None:
    """The input gradient's transform: the kernel flipped and its channel axes swapped, then
    transformed, to float64 rounding; the transposed convolution it gives is conv_transpose2d."""
    torch.manual_seed(0)
    w = torch.randn(5, 3, 3, 3, dtype=torch.float64)
    got = winograd_weight(w, m, transposed=True)
    assert got.shape == ((m + 2) ** 2, 3, 5)
    assert torch.allclose(got, winograd_weight(w.flip(2, 3).transpose(0, 1), m), atol=1e-13)
    g = torch.randn(2, 5, 7, 6, dtype=torch.float64)
    ref = F.conv_transpose2d(g, w, padding=1)
    assert torch.allclose(winograd_conv3x3(g, got, None, m), ref, atol=1e-10)


def test_bad_inputs_are_named() -> None:
    with pytest.raises(ValueError, match="tile size 3"):
        winograd_weight(torch.randn(4, 4, 3, 3), 3)
    with pytest.raises(ValueError, match=r"\[C_out, C_in, 3, 3\]"):
        winograd_weight(torch.randn(4, 4, 5, 5), 2)
    with pytest.raises(ValueError, match="8 channels"):
        winograd_conv3x3(
            torch.randn(1, 8, 4, 4), winograd_weight(torch.randn(4, 6, 3, 3), 2), None, 2
        )


def _wide_conv(seed: int = 0) -> WinogradConv2d:
    torch.manual_seed(seed)
    return WinogradConv2d(WIDE, WIDE, 3, padding=1)


def _plain(conv: nn.Conv2d) -> nn.Conv2d:
    plain = nn.Conv2d(conv.in_channels, conv.out_channels, 3, padding=1)
    plain.load_state_dict(conv.state_dict())
    return plain


@pytest.mark.parametrize(
    ("pixels", "fp32", "bf16"), [((8, 8), 2, 2), ((16, 16), 2, 2), ((32, 32), 4, 0)]
)
def test_policy_in_inference(pixels, fp32, bf16) -> None:
    conv = _wide_conv()
    x = torch.randn(1, WIDE, *pixels)
    with torch.no_grad():
        assert tile_size(conv, x, torch.float32) == fp32
        assert tile_size(conv, x, torch.bfloat16) == bf16
        assert tile_size(conv, x, torch.float16) == 0


def test_policy_drops_f4_for_large_batches_of_large_images() -> None:
    """F(4x4) pays only while its transformed input stays in cache (2 x 64 x 64 pixels)."""
    conv = _wide_conv().requires_grad_(False)
    meta = {"device": "cpu", "dtype": torch.float32}
    assert tile_size(conv, torch.empty(2, WIDE, 64, 64, **meta), torch.float32) == 4
    assert tile_size(conv, torch.empty(4, WIDE, 64, 64, **meta), torch.float32) == 0
    assert tile_size(conv, torch.empty(2, WIDE, 96, 96, **meta), torch.float32) == 0
    assert tile_size(conv, torch.empty(64, WIDE, 16, 16, **meta), torch.float32) == 2


def test_policy_with_freed_memory_kept_covers_wider_and_larger_layers(monkeypatch) -> None:
    """With ``ldm.malloc_policy`` in force (the commands' setting) fp32 F(4x4) runs from 256
    channels and up to 256 x 256 batch pixels; under glibc's defaults those layers stay direct;
    bf16 keeps its policy either way."""
    meta = {"device": "cpu", "dtype": torch.float32}

    def conv(c: int) -> nn.Conv2d:
        return WinogradConv2d(c, c, 3, padding=1).requires_grad_(False)

    cases = [  # (channels, batch, side): (defaults, freed memory kept)
        ((256, 1, 128), (0, 4)),
        ((256, 1, 256), (0, 4)),
        ((WIDE, 4, 64), (0, 4)),
        ((WIDE, 2, 64), (4, 4)),
        ((WIDE, 2, 256), (0, 0)),
        ((255, 1, 64), (0, 0)),
        ((256, 1, 16), (0, 0)),  # F(2x2) sizes: from MIN_CHANNELS only
        ((256, 1, 24), (0, 4)),
    ]
    for retained in (False, True):
        monkeypatch.setattr(malloc_policy, "_applied", retained)
        assert malloc_policy.retained() is retained
        for (c, b, side), want in cases:
            x = torch.empty(b, c, side, side, **meta)
            assert tile_size(conv(c), x, torch.float32) == want[retained], (c, b, side)
            bf16 = 2 if side <= 16 and c >= MIN_CHANNELS else 0  # bf16 keeps its policy
            assert tile_size(conv(c), x, torch.bfloat16) == bf16


@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize("size", [(16, 8), (13, 10)])
def test_channels_last_input_gives_a_channels_last_output(m, size) -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 24, *size, generator=g).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(16, 24, 3, 3, generator=g), torch.randn(16, generator=g)
    y = winograd_conv3x3(x, winograd_weight(w, m), b, m)
    assert y.stride(1) == 1  # NHWC strides (a cropped view when the tiles overhang)
    ref = F.conv2d(x, w, b, padding=1)
    assert ((y - ref).abs().max() / ref.abs().max()).item() < 2e-5


def test_policy_keeps_the_direct_convolution_where_it_does_not_pay_or_cannot_apply() -> None:
    conv = _wide_conv()
    x = torch.randn(1, WIDE, 8, 8)
    assert tile_size(conv, x, torch.float32) == 0  # autograd graph (weights require grad)
    with torch.no_grad():
        assert tile_size(conv, torch.randn(1, WIDE, 8, 8, device="meta"), torch.float32) == 0
        narrow = WinogradConv2d(WIDE - 1, WIDE, 3, padding=1)
        assert tile_size(narrow, torch.randn(1, WIDE - 1, 8, 8), torch.float32) == 0
        strided = WinogradConv2d(WIDE, WIDE, 3, padding=1, stride=2)
        assert tile_size(strided, x, torch.float32) == 0
        assert tile_size(WinogradConv2d(WIDE, WIDE, 1), x, torch.float32) == 0
        with winograd_enabled(False):
            assert tile_size(conv, x, torch.float32) == 0
    conv.requires_grad_(False)
    assert tile_size(conv, x, torch.float32) == 2  # frozen weights, input without grad
    assert tile_size(conv, x.requires_grad_(), torch.float32) == 0


def test_env_switch(monkeypatch) -> None:
    conv = _wide_conv()
    x = torch.randn(1, WIDE, 8, 8)
    monkeypatch.setenv("LDM_WINOGRAD", "0")
    with torch.no_grad():
        assert tile_size(conv, x, torch.float32) == 0
        with winograd_enabled(True):
            assert tile_size(conv, x, torch.float32) == 2
        monkeypatch.setenv("LDM_WINOGRAD", "maybe")
        with pytest.raises(ValueError, match="LDM_WINOGRAD='maybe' is not a switch"):
            tile_size(conv, x, torch.float32)


def test_inference_matches_nn_conv2d_and_uses_the_cache() -> None:
    clear_cache()
    conv = _wide_conv()
    plain = _plain(conv)
    x = torch.randn(2, WIDE, 8, 8)
    with torch.no_grad():
        y = conv(x)
        assert cache_bytes() == 16 * WIDE * WIDE * 4  # F(2x2): 16 transformed taps, fp32
        ref = plain(x)
        assert not torch.equal(y, ref)  # the Winograd path ran
        assert _rel(y, ref) < 1e-5
        with winograd_enabled(False):
            assert torch.equal(conv(x), ref)  # switched off: the direct kernel, bit for bit


def test_cache_follows_weight_changes() -> None:
    clear_cache()
    conv = _wide_conv()
    x = torch.randn(1, WIDE, 8, 8)
    with torch.no_grad():
        conv(x)
        conv.weight.mul_(-2.0)  # in-place edit (LoRA merge, EMA swap)
        assert _rel(conv(x), _plain(conv)(x)) < 1e-5
        conv.load_state_dict(_wide_conv(seed=3).state_dict())
        assert _rel(conv(x), _plain(conv)(x)) < 1e-5
        conv.weight = nn.Parameter(torch.randn_like(conv.weight) / 50)  # a new parameter
        assert _rel(conv(x), _plain(conv)(x)) < 1e-5
        conv.weight.data.copy_(_wide_conv(seed=4).weight)  # no version bump (EMA swap, PEFT)
        assert _rel(conv(x), _plain(conv)(x)) < 1e-5
        conv.weight.data[:1].mul_(3.0)  # one output channel, through .data
        assert _rel(conv(x), _plain(conv)(x)) < 1e-5
        conv.to(torch.bfloat16)
        y = conv(x.bfloat16())
        assert y.dtype == torch.bfloat16
        assert _rel(y, _plain(conv.float())(x)) < 2e-2
    assert cache_bytes() == 16 * WIDE * WIDE * 2  # one entry per module, the latest (bf16)


def test_copies_do_not_carry_the_cache() -> None:
    clear_cache()
    conv = _wide_conv()
    with torch.no_grad():
        conv(torch.randn(1, WIDE, 8, 8))
    before = cache_bytes()
    clone = copy.deepcopy(conv)
    assert cache_bytes() == before
    assert set(clone.state_dict()) == {"weight", "bias"}
    del conv
    gc.collect()
    assert cache_bytes() == 0  # freed with the module


def test_a_training_forward_frees_the_inference_cache() -> None:
    """Sampling during training (image logging) must not leave the transforms allocated."""
    clear_cache()
    conv = _wide_conv()
    x = torch.randn(1, WIDE, 8, 8)
    with torch.no_grad():
        conv(x)
    assert cache_bytes() > 0
    conv(x).sum().backward()
    assert cache_bytes() == 0


def test_training_keeps_the_direct_convolution_bit_for_bit() -> None:
    conv = _wide_conv()
    plain = _plain(conv)
    x = torch.randn(1, WIDE, 8, 8)
    y, ref = conv(x), plain(x)
    assert torch.equal(y, ref)
    y.square().sum().backward()
    ref.square().sum().backward()
    assert torch.equal(conv.weight.grad, plain.weight.grad)


def test_autocast_bf16_runs_the_transform_in_bf16() -> None:
    clear_cache()
    conv = _wide_conv()
    x = torch.randn(1, WIDE, 16, 16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv(x)
        with winograd_enabled(False):
            direct = conv(x)
    assert y.dtype == direct.dtype == torch.bfloat16
    assert cache_bytes() == 16 * WIDE * WIDE * 2
    ref = _plain(conv)(x)
    assert _rel(y, ref) < 2.5 * max(_rel(direct, ref), 4e-3)


def wide_unet(image_size: int) -> UNetModel:
    """One level of 320-channel ResBlocks (wide enough for the Winograd policy), N(0, 0.02)
    weights everywhere (the zero-initialised output layers too)."""
    unet = UNetModel(
        image_size=image_size,
        in_channels=4,
        out_channels=4,
        model_channels=WIDE,
        attention_resolutions=[],
        num_res_blocks=1,
        channel_mult=[1],
        num_heads=4,
    )
    with torch.no_grad():
        for p in unet.parameters():
            p.copy_(torch.randn_like(p) * 0.02)
    return unet


def test_unet_builds_winograd_convs_and_matches_the_direct_path() -> None:
    """The U-Net's 2-D convolutions are WinogradConv2d (same keys); a U-Net wide enough for the
    policy gives the direct path's output to float tolerance in inference."""
    assert type(conv_nd(2, 4, 4, 3, padding=1)) is WinogradConv2d
    assert type(conv_nd(1, 4, 4, 3)) is nn.Conv1d
    torch.manual_seed(0)
    unet = wide_unet(8).eval()
    assert sum(isinstance(m, WinogradConv2d) for m in unet.modules()) >= 3
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 500])
    clear_cache()
    with torch.no_grad():
        y = unet(x, t)
        assert cache_bytes() > 0
        with winograd_enabled(False):
            ref = unet(x, t)
    assert not torch.equal(y, ref)
    assert _rel(y, ref) < 1e-5
    assert winograd.MIN_CHANNELS == WIDE


def test_upsample_prefers_the_cached_winograd_conv_in_inference(monkeypatch) -> None:
    """A wide U-Net Upsample in inference interpolates and runs the Winograd conv (the fused
    upsampling conv rebuilds its kernels per call); with an autograd graph it still fuses."""
    import ldm.modules.unet_layers as layers
    from ldm.modules.conv2d import applies_after_upsampling
    from ldm.modules.upsample_conv import upsample_conv2d, worth_fusing

    fused: list[int] = []

    def counting(*args):
        fused.append(1)
        return upsample_conv2d(*args)

    monkeypatch.setattr(layers, "upsample_conv2d", counting)
    torch.manual_seed(0)
    up = layers.Upsample(WIDE, use_conv=True)
    assert type(up.conv) is WinogradConv2d
    x = torch.randn(2, WIDE, 16, 16)  # 512 source pixels: worth fusing without Winograd
    with torch.no_grad():
        assert applies_after_upsampling(up.conv, x) and not worth_fusing(up.conv, x)
        y = up(x)
        assert fused == []
        with winograd_enabled(False):
            assert worth_fusing(up.conv, x)
            ref = up(x)
        assert fused == [1]
    assert _rel(y, ref) < 5e-5  # 32x32 after upsampling: F(4x4)
    assert worth_fusing(up.conv, x)  # grad mode, weights require grad: fuse
    assert torch.allclose(up(x), ref, atol=1e-5 * ref.abs().max().item())
    assert fused == [1, 1]


def test_ema_swap_through_data_is_seen() -> None:
    """``LitEma`` swaps weights through ``.data`` (no version bump); sampling with the EMA
    weights and then with the trained ones must use each one's own transform."""
    from ldm.ema import LitEma

    clear_cache()
    model = nn.Sequential(_wide_conv())
    ema = LitEma(model)
    with torch.no_grad():
        model[0].weight.mul_(0.5)  # training moved the weights away from the shadow
    x = torch.randn(1, WIDE, 8, 8)
    with torch.no_grad():
        trained = model(x)
        ema.store(model.parameters())
        ema.copy_to(model)
        with winograd_enabled(False):
            ema_direct = model(x)
        assert _rel(model(x), ema_direct) < 1e-5
        ema.restore(model.parameters())
        assert _rel(model(x), trained) < 1e-5


def test_channels_last_weights_are_probed_without_a_copy() -> None:
    clear_cache()
    conv = _wide_conv().to(memory_format=torch.channels_last)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(1, WIDE, 8, 8)
    with torch.no_grad():
        conv(x)
        conv.weight.data.mul_(-1.0)
        assert _rel(conv(x), _plain(conv)(x)) < 1e-5


def test_autoencoder_resnet_convs_take_the_winograd_path(monkeypatch) -> None:
    """The autoencoder's ResNet convs are WinogradConv2d (same keys): with freed memory kept its
    256-channel level runs F(4x4) in NCHW (no channels-last), equal to the direct path to fp32
    rounding; with a graph recorded (autoencoder training) the direct path as before."""
    from ldm.modules import autoencoder as ae_module
    from ldm.modules.autoencoder import Decoder

    monkeypatch.setattr(malloc_policy, "_applied", True)
    torch.manual_seed(0)
    dec = Decoder(
        ch=64,
        out_ch=3,
        ch_mult=(1, 4),
        num_res_blocks=1,
        attn_resolutions=[],
        in_channels=3,
        resolution=40,
        z_channels=4,
    ).eval()
    assert type(dec.mid.block_1.conv1) is WinogradConv2d
    assert all(not k.endswith("_cache") for k in dec.state_dict())
    z = torch.randn(1, 4, 20, 20)
    assert ae_module._cpu_channels_last(z, 64) is z  # NCHW when freed memory is kept
    clear_cache()
    with torch.no_grad():
        fast = dec(z)
        assert cache_bytes() > 0  # the 256-channel convs ran in the Winograd form
        with winograd_enabled(False):
            direct = dec(z)
    assert _rel(fast, direct) < 1e-4
    assert not torch.equal(fast, direct)
    clear_cache()


def test_autoencoder_reads_a_permuted_image_batch_as_nchw(monkeypatch) -> None:
    """A [B, H, W, C] batch permuted to [B, C, H, W] (``get_input``) is a channels-last view; where
    the layout policy picks NCHW (freed memory kept, or below 128 x 128 pixels) the encoder makes it
    NCHW instead of carrying channels-last through every convolution; NCHW input is not copied."""
    from ldm.modules import autoencoder as ae_module
    from ldm.modules.autoencoder import Encoder

    images = torch.rand(1, 40, 40, 3).permute(0, 3, 1, 2)
    assert images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous()
    for retained in (True, False):
        monkeypatch.setattr(malloc_policy, "_applied", retained)
        with torch.no_grad():
            nchw = ae_module._cpu_channels_last(images)
            assert nchw.is_contiguous() and torch.equal(nchw, images)
            assert ae_module._cpu_channels_last(nchw) is nchw
    big = torch.rand(1, 128, 128, 3).permute(0, 3, 1, 2)
    with torch.no_grad():  # glibc defaults at 128 x 128: channels-last (oneDNN's NHWC kernels)
        assert ae_module._cpu_channels_last(big.contiguous()).is_contiguous(
            memory_format=torch.channels_last
        )
        monkeypatch.setattr(malloc_policy, "_applied", True)
        # memory kept: NCHW where the Winograd convolution covers the wide levels (SD: 512) ...
        assert ae_module._cpu_channels_last(big, widest=512).is_contiguous()
        # ... a narrow autoencoder (the default run's 64 channels) keeps channels-last
        assert ae_module._cpu_channels_last(big, widest=64) is big
        monkeypatch.setattr(malloc_policy, "_applied", False)
    assert ae_module._cpu_channels_last(images) is images  # a graph recorded: left alone
    monkeypatch.setattr(malloc_policy, "_applied", True)
    torch.manual_seed(0)
    enc = Encoder(
        ch=32, out_ch=3, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=[], in_channels=3,
        resolution=40, z_channels=4,
    ).eval()  # fmt: skip
    layouts = []
    enc.down[1].block[0].conv1.register_forward_hook(
        lambda m, i, o: layouts.append(i[0].is_contiguous())
    )
    with torch.no_grad():
        torch.testing.assert_close(enc(images), enc(images.contiguous()), rtol=0, atol=0)
    assert layouts == [True, True]
