"""conv3x3(nearest_2x(x)) as four 2x2 convs at the source resolution (ldm.modules.upsample_conv)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ldm.modules.autoencoder_blocks as ae_blocks
import ldm.modules.unet_layers as unet_layers
from ldm.modules.autoencoder import Decoder, Encoder
from ldm.modules.autoencoder_tiled import _upconv_rows
from ldm.modules.upsample_conv import (
    fusable,
    subpixel_kernels,
    upsample_conv2d,
    worth_fusing,
)


def two_step(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), w, b, padding=1)


@pytest.mark.parametrize(
    ("shape", "out_ch", "bias"),
    [((1, 3, 4, 6), 5, True), ((2, 8, 7, 5), 8, True), ((3, 2, 1, 1), 4, False)],
)
def test_equals_two_step_form_float64(shape, out_ch, bias) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    w = torch.randn(out_ch, shape[1], 3, 3, generator=g, dtype=torch.float64)
    b = torch.randn(out_ch, generator=g, dtype=torch.float64) if bias else None
    out = upsample_conv2d(x, w, b)
    ref = two_step(x, w, b)
    assert out.shape == (shape[0], out_ch, 2 * shape[2], 2 * shape[3])
    assert out.is_contiguous()
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)


def test_channels_last_in_channels_last_out() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 6, 5, 7, generator=g, dtype=torch.float64)
    w = torch.randn(4, 6, 3, 3, generator=g, dtype=torch.float64)
    b = torch.randn(4, generator=g, dtype=torch.float64)
    out = upsample_conv2d(x.contiguous(memory_format=torch.channels_last), w, b)
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    torch.testing.assert_close(out, two_step(x, w, b), rtol=0, atol=1e-12)


def test_gradients_equal_two_step_form() -> None:
    g = torch.Generator().manual_seed(2)
    args = [
        torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64),
        torch.randn(6, 3, 3, 3, generator=g, dtype=torch.float64),
        torch.randn(6, generator=g, dtype=torch.float64),
    ]
    seed = torch.randn(2, 6, 8, 10, generator=g, dtype=torch.float64)
    grads = []
    for fn in (upsample_conv2d, two_step):
        leaves = [a.clone().requires_grad_(True) for a in args]
        (fn(*leaves) * seed).sum().backward()
        grads.append([leaf.grad for leaf in leaves])
    for ours, ref in zip(*grads, strict=True):
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-11)


def test_subpixel_kernels_by_hand() -> None:
    w = torch.arange(9, dtype=torch.float64).view(1, 1, 3, 3)  # rows [0 1 2], [3 4 5], [6 7 8]
    k = subpixel_kernels(w)
    # phase (0, 0): rows (0 | 1+2), columns (0 | 1+2)
    assert k[0, 0].tolist() == [[0.0, 1 + 2], [3 + 6, 4 + 5 + 7 + 8]]
    # phase (0, 1): rows (0 | 1+2), columns (0+1 | 2)
    assert k[1, 0].tolist() == [[0 + 1, 2], [3 + 4 + 6 + 7, 5 + 8]]
    # phase (1, 0): rows (0+1 | 2), columns (0 | 1+2)
    assert k[2, 0].tolist() == [[0 + 3, 1 + 2 + 4 + 5], [6, 7 + 8]]
    # phase (1, 1): rows (0+1 | 2), columns (0+1 | 2)
    assert k[3, 0].tolist() == [[0 + 1 + 3 + 4, 2 + 5], [6 + 7, 8]]


def test_half_precision_taps_are_summed_in_float32() -> None:
    w = torch.zeros(9)
    w[4] = 1.0  # tap (1, 1)
    w[[5, 7, 8]] = 2**-9  # taps (1, 2), (2, 1), (2, 2)
    w = w.view(1, 1, 3, 3).bfloat16()
    k = subpixel_kernels(w)
    assert k.dtype == torch.bfloat16
    # phase (0, 0)'s tap (1, 1) sums all four. bf16 has a spacing of 2^-7 at 1: added one by one
    # in bf16 each 2^-9 is lost, while 1 + 3 * 2^-9 summed in float32 rounds up to 1 + 2^-7
    assert k[0, 0, 1, 1].item() == 1 + 2**-7
    naive = ((w[0, 0, 1, 1] + w[0, 0, 1, 2]) + w[0, 0, 2, 1]) + w[0, 0, 2, 2]
    assert naive.item() == 1.0


def test_bad_inputs_are_named() -> None:
    with pytest.raises(ValueError, match=r"3x3 kernel.*\(2, 2, 1, 1\)"):
        upsample_conv2d(torch.zeros(1, 2, 3, 3), torch.zeros(2, 2, 1, 1))


def test_fusable_only_for_plain_3x3_same_convs() -> None:
    assert fusable(nn.Conv2d(4, 4, 3, padding=1))
    assert fusable(nn.Conv2d(4, 6, 3, padding=1, bias=False))
    assert not fusable(nn.Conv2d(4, 4, 3, padding=0))
    assert not fusable(nn.Conv2d(4, 4, 3, padding=1, stride=2))
    assert not fusable(nn.Conv2d(4, 4, 3, padding=1, groups=2))
    assert not fusable(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"))
    assert not fusable(nn.Conv2d(4, 4, 3, padding=2, dilation=2))
    assert not fusable(nn.Conv2d(4, 4, 1))

    class Wrapped(nn.Conv2d):  # e.g. a PEFT / LoRA layer that changes forward
        pass

    assert not fusable(Wrapped(4, 4, 3, padding=1))
    conv = nn.Conv2d(4, 4, 3, padding=1)
    handle = conv.register_forward_hook(lambda *a: None)
    assert not fusable(conv)
    handle.remove()
    assert fusable(conv)
    handle = nn.modules.module.register_module_forward_pre_hook(lambda *a: None)
    try:
        assert not fusable(conv)
    finally:
        handle.remove()


def test_worth_fusing_thresholds() -> None:
    conv = nn.Conv2d(4, 4, 3, padding=1)
    assert worth_fusing(conv, torch.zeros(2, 4, 16, 16))  # 512 source pixels, float32
    assert not worth_fusing(conv, torch.zeros(1, 4, 16, 31))  # 496
    assert not worth_fusing(conv, torch.zeros(2, 4, 16, 16, dtype=torch.bfloat16))
    assert worth_fusing(conv, torch.zeros(2, 4, 32, 32, dtype=torch.bfloat16))  # 2048
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not worth_fusing(conv, torch.zeros(1, 4, 32, 63))
        assert worth_fusing(conv, torch.zeros(1, 4, 32, 64))
    assert not worth_fusing(conv, torch.zeros(2, 4, 16, 16, device="meta"))
    assert not worth_fusing(nn.Conv2d(4, 4, 3, padding=1, stride=2), torch.zeros(2, 4, 32, 32))


def test_training_with_freed_memory_kept_upsamples_for_the_winograd_form(monkeypatch) -> None:
    """fp32 training with ``ldm.malloc_policy`` in force: where the conv would take a training
    form at the upsampled size (Winograd F(4x4): 0.69-0.86 of the fused form's forward+backward),
    ``Upsample`` upsamples and convolves; under glibc's defaults, without a graph, or past the
    form's batch pixels the fused form stays."""
    from ldm import malloc_policy
    from ldm.modules.conv2d import WinogradConv2d
    from ldm.modules.conv_training import training_form

    conv = WinogradConv2d(640, 640, 3, padding=1)
    x = torch.zeros(2, 640, 32, 32, requires_grad=True)
    monkeypatch.setattr(malloc_policy, "_applied", True)
    assert training_form(conv, x, torch.float32, upsampled=True) == "winograd4"
    assert not worth_fusing(conv, x)  # training at 64x64: Winograd
    with torch.no_grad():  # inference: the cached Winograd weight at 64x64
        assert not worth_fusing(conv, x)
    big = torch.zeros(4, 640, 128, 128, requires_grad=True)  # 4 x 256 x 256 upsampled: too many
    assert training_form(conv, big, torch.float32, upsampled=True) is None
    assert worth_fusing(conv, big)
    assert worth_fusing(nn.Conv2d(640, 640, 3, padding=1), x)  # a plain conv has no such form
    monkeypatch.setattr(malloc_policy, "_applied", False)
    assert worth_fusing(conv, x)  # glibc defaults: fused (it won at 640 channels there)
    down = WinogradConv2d(640, 640, 3, padding=1, stride=2)
    monkeypatch.setattr(malloc_policy, "_applied", True)
    for side, form in ((8, "im2col"), (7, "im2col"), (17, None)):  # outputs 8, 7 and 17 wide
        odd = torch.zeros(1, 640, side, side, requires_grad=True)
        assert training_form(down, odd, torch.float32, upsampled=True) == form, side


@pytest.mark.parametrize("kind", ["autoencoder", "unet"])
def test_upsample_modules_take_the_fused_path(kind, monkeypatch) -> None:
    torch.manual_seed(0)
    if kind == "autoencoder":
        up, module = ae_blocks.Upsample(4, with_conv=True).double(), ae_blocks
    else:
        up, module = unet_layers.Upsample(4, use_conv=True, out_channels=6).double(), unet_layers
    calls = []

    def spy(*args):
        calls.append(args[0].shape)
        return upsample_conv2d(*args)

    monkeypatch.setattr(module, "upsample_conv2d", spy)
    big = torch.randn(2, 4, 16, 16, dtype=torch.float64)
    torch.testing.assert_close(up(big), two_step(big, up.conv.weight, up.conv.bias))
    assert calls == [big.shape]
    small = torch.randn(1, 4, 4, 4, dtype=torch.float64)  # below the threshold: two-step form
    torch.testing.assert_close(up(small), two_step(small, up.conv.weight, up.conv.bias))
    assert len(calls) == 1
    seen = []
    up.conv.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    up(big)  # a hooked conv is called as a module, so its hook runs
    assert len(calls) == 1 and seen == [(2, up.conv.out_channels, 32, 32)]


@pytest.mark.parametrize(("r0", "r1"), [(0, 14), (0, 1), (1, 2), (3, 8), (5, 6), (8, 14), (13, 14)])
def test_tiled_rows_equal_the_full_result(r0, r1) -> None:
    torch.manual_seed(3)
    conv = nn.Conv2d(3, 5, 3, padding=1).double()
    x = torch.randn(2, 3, 7, 4, dtype=torch.float64)
    full = two_step(x, conv.weight, conv.bias)
    torch.testing.assert_close(_upconv_rows(conv, x, r0, r1), full[:, :, r0:r1], rtol=0, atol=1e-12)


def test_autoencoder_runs_channels_last_inside_and_returns_nchw(monkeypatch) -> None:
    cfg = dict(
        ch=8, out_ch=3, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), in_channels=3,
        resolution=16, z_channels=4, norm_num_groups=4,
    )  # fmt: skip
    torch.manual_seed(0)
    enc, dec = Encoder(**cfg).double().eval(), Decoder(**cfg).double().eval()
    x = torch.randn(2, 3, 96, 96, dtype=torch.float64)  # 18432 pixels: at least 128 x 128
    z = torch.randn(2, 4, 48, 48, dtype=torch.float64)  # decodes to 2 x 96 x 96
    layouts = []
    hook = lambda m, i, o: layouts.append(i[0].is_contiguous(memory_format=torch.channels_last))  # noqa: E731
    for m in (*enc.modules(), *dec.modules()):
        if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3):
            m.register_forward_hook(hook)
    with torch.no_grad():
        moments, image = enc(x), dec(z)
    assert moments.is_contiguous() and image.is_contiguous()
    assert layouts and all(layouts)  # every 3x3 conv read NHWC
    layouts.clear()
    with torch.no_grad():
        enc(x[:1, :, :64, :64]), dec(z[:1, :, :32, :32])  # 4096 pixels: too small to pay
    assert layouts and not any(layouts)
    import ldm.modules.autoencoder as ae_module

    monkeypatch.setattr(ae_module, "_cpu_channels_last", lambda t, upscale=1, widest=0: t)
    layouts.clear()
    with torch.no_grad():
        torch.testing.assert_close(enc(x), moments, rtol=0, atol=1e-12)
        torch.testing.assert_close(dec(z), image, rtol=0, atol=1e-12)
    assert layouts and not any(layouts)
    monkeypatch.undo()
    layouts.clear()
    enc(x.requires_grad_(True)).sum().backward()  # with a graph recorded, the layout is left alone
    assert layouts and not any(layouts)
