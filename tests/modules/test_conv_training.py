"""fp32 CPU training forms of the 3x3 convolution (Winograd F(4x4), im2col): exact gradients,
rounding, the shape policy, and their use by the U-Net's WinogradConv2d."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import ldm.modules.conv2d as conv2d
import ldm.modules.conv_training as conv_training
from ldm.modules.conv2d import WinogradConv2d
from ldm.modules.conv_training import (
    FORMS,
    IM2COL_MIN_CHANNELS,
    RETAINED_SMALL_F4_MIN_CHANNELS,
    conv3x3_for_training,
    training_form,
)
from ldm.modules.winograd import MIN_CHANNELS, winograd_enabled
from tests.modules.test_winograd import wide_unet


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("size", [(5, 7), (8, 8), (1, 1), (9, 4)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_gradients_are_exact_in_float64(form, size, with_bias) -> None:
    """gradcheck: the hand-written backward is the derivative of the forward, for sizes that are
    not multiples of the Winograd tile and for a 1x1 image."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, *size, dtype=torch.float64, generator=g).requires_grad_()
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, generator=g).requires_grad_()
    b = torch.randn(4, dtype=torch.float64, generator=g).requires_grad_() if with_bias else None
    assert torch.autograd.gradcheck(lambda *a: conv3x3_for_training(form, *a), (x, w, b))
    y = conv3x3_for_training(form, x, w, b)
    torch.testing.assert_close(y, F.conv2d(x, w, b, padding=1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("size", [(65, 64), (66, 67)])
def test_winograd_gradients_above_the_tile_count_limit(size) -> None:
    """Above ``INPUT_GRAD_UT_V_MIN_TILES`` tiles the input gradient runs its other product order
    (U^T V): gradients equal the direct convolution's in float64 (gradcheck is too slow there),
    for sizes that are not multiples of the tile."""
    assert -(-size[0] // 4) * -(-size[1] // 4) > conv_training.INPUT_GRAD_UT_V_MIN_TILES
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 3, *size, dtype=torch.float64, generator=g).requires_grad_()
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, generator=g).requires_grad_()
    b = torch.randn(4, dtype=torch.float64, generator=g).requires_grad_()
    gy = torch.randn(1, 4, *size, dtype=torch.float64, generator=g)
    got = torch.autograd.grad(conv3x3_for_training("winograd4", x, w, b), (x, w, b), gy)
    want = torch.autograd.grad(F.conv2d(x, w, b, padding=1), (x, w, b), gy)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("size", [(8, 8), (5, 7), (1, 1), (2, 9)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_strided_im2col_gradients_are_exact_in_float64(size, with_bias) -> None:
    """The downsampling conv (stride 2, padding 1) in the im2col form: gradcheck, gradgradcheck,
    and the direct convolution's output, odd sizes included."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, *size, dtype=torch.float64, generator=g).requires_grad_()
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, generator=g).requires_grad_()
    b = torch.randn(4, dtype=torch.float64, generator=g).requires_grad_() if with_bias else None

    def f(*a):
        return conv3x3_for_training("im2col", *a, stride=2)

    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))
    want = F.conv2d(x, w, b, padding=1, stride=2)
    torch.testing.assert_close(f(x, w, b), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("form", "bound"), [("winograd4", 5e-5), ("im2col", 4e-6)])
def test_fp32_rounding_against_float64(form, bound) -> None:
    """Output and gradients in fp32 against float64: F(4x4) ~1e-5 relative (its transform
    coefficients), im2col that of the direct kernel (~1e-6)."""
    g = torch.Generator().manual_seed(1)
    x64 = torch.randn(2, 64, 12, 12, dtype=torch.float64, generator=g).requires_grad_()
    w64 = (torch.randn(96, 64, 3, 3, dtype=torch.float64, generator=g) / 24).requires_grad_()
    b64 = torch.randn(96, dtype=torch.float64, generator=g).requires_grad_()
    dy = torch.randn(2, 96, 12, 12, dtype=torch.float64, generator=g)
    ref = F.conv2d(x64, w64, b64, padding=1)
    ref.backward(dy)
    x, w, b = (t.detach().float().requires_grad_() for t in (x64, w64, b64))
    y = conv3x3_for_training(form, x, w, b)
    y.backward(dy.float())
    direct = F.conv2d(x.detach(), w.detach(), b.detach(), padding=1)
    assert _rel(direct, ref) < 2e-6
    for got, want in ((y, ref), (x.grad, x64.grad), (w.grad, w64.grad), (b.grad, b64.grad)):
        assert got.dtype == torch.float32
        assert _rel(got, want) < bound


@pytest.mark.parametrize("form", FORMS)
def test_only_the_gradients_asked_for(form) -> None:
    """A frozen weight (LoRA on a conv, a frozen first layer) or an input without a gradient:
    only the other gradient is computed, and it is the direct convolution's."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 5, 6, 6, generator=g, dtype=torch.float64)
    w = torch.randn(7, 5, 3, 3, generator=g, dtype=torch.float64)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    F.conv2d(xr, wr, padding=1).square().sum().backward()
    xg = x.clone().requires_grad_()
    conv3x3_for_training(form, xg, w, None).square().sum().backward()
    torch.testing.assert_close(xg.grad, xr.grad)
    wg = w.clone().requires_grad_()
    conv3x3_for_training(form, x, wg, None).square().sum().backward()
    torch.testing.assert_close(wg.grad, wr.grad)


@pytest.mark.parametrize("form", FORMS)
def test_double_backward_is_exact(form) -> None:
    """The backward is made of differentiable operations: gradient penalties (create_graph=True)
    get exact second derivatives (gradgradcheck in float64)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 2, 5, 6, dtype=torch.float64, generator=g).requires_grad_()
    w = torch.randn(3, 2, 3, 3, dtype=torch.float64, generator=g).requires_grad_()
    b = torch.randn(3, dtype=torch.float64, generator=g).requires_grad_()
    assert torch.autograd.gradgradcheck(lambda *a: conv3x3_for_training(form, *a), (x, w, b))


def test_forward_mode_and_torch_func_use_the_direct_convolution() -> None:
    """jvp and torch.func transforms have no rule for the custom functions: the policy steps
    aside and the results are the direct convolution's."""
    conv = WinogradConv2d(MIN_CHANNELS, MIN_CHANNELS, 3, padding=1)
    x = torch.randn(1, MIN_CHANNELS, 32, 32)
    tangent = torch.randn_like(x)
    with torch.no_grad():
        want = F.conv2d(tangent, conv.weight, padding=1)
    _, jvp = torch.func.jvp(lambda x: conv(x), (x,), (tangent,))
    assert _rel(jvp, want) < 1e-5
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        assert training_form(conv, fwAD.make_dual(x, tangent), torch.float32) is None
    params = dict(conv.named_parameters())
    grads = torch.func.grad(lambda p: torch.func.functional_call(conv, p, (x,)).sum())(params)
    conv(x).sum().backward()
    assert _rel(grads["weight"], conv.weight.grad) < 1e-4


def test_bad_arguments_are_named() -> None:
    x, w = torch.randn(1, 2, 4, 4), torch.randn(3, 2, 3, 3)
    with pytest.raises(ValueError, match="unknown training convolution form 'fft'"):
        conv3x3_for_training("fft", x, w, None)
    with pytest.raises(ValueError, match=r"\[C_out, C, 3, 3\] weight"):
        conv3x3_for_training("im2col", x, torch.randn(3, 2, 5, 5), None)
    with pytest.raises(ValueError, match="stride 2 with form 'winograd4'"):
        conv3x3_for_training("winograd4", x, w, None, stride=2)
    with pytest.raises(ValueError, match="stride 3"):
        conv3x3_for_training("im2col", x, w, None, stride=3)


def _needs_grad(*shape: int) -> torch.Tensor:
    return torch.zeros(*shape, requires_grad=True)


def test_policy_picks_the_form_by_shape_dtype_and_graph(monkeypatch) -> None:
    wide = WinogradConv2d(MIN_CHANNELS, MIN_CHANNELS, 3, padding=1)
    wider = WinogradConv2d(IM2COL_MIN_CHANNELS, IM2COL_MIN_CHANNELS, 3, padding=1)
    fp32 = torch.float32
    assert training_form(wide, _needs_grad(2, MIN_CHANNELS, 64, 64), fp32) == "winograd4"
    assert training_form(wide, _needs_grad(1, MIN_CHANNELS, 32, 32), fp32) == "winograd4"
    assert training_form(wider, _needs_grad(2, IM2COL_MIN_CHANNELS, 8, 8), fp32) == "im2col"
    assert training_form(wider, _needs_grad(1, IM2COL_MIN_CHANNELS, 16, 16), fp32) == "im2col"
    # the direct convolution: 16x16 at batch 2, too many batch pixels, narrow, im2col's width
    assert training_form(wider, _needs_grad(2, IM2COL_MIN_CHANNELS, 16, 16), fp32) is None
    assert training_form(wide, _needs_grad(4, MIN_CHANNELS, 64, 64), fp32) is None
    assert training_form(wide, _needs_grad(2, MIN_CHANNELS, 8, 8), fp32) is None
    narrow = WinogradConv2d(MIN_CHANNELS - 1, MIN_CHANNELS, 3, padding=1)
    assert training_form(narrow, _needs_grad(2, MIN_CHANNELS - 1, 64, 64), fp32) is None
    x = _needs_grad(2, MIN_CHANNELS, 32, 32)
    assert training_form(wide, x, torch.bfloat16) is None  # autocast: the conv runs in bf16
    assert training_form(wide, x.detach(), fp32) == "winograd4"  # the weight needs a gradient
    wide.weight.requires_grad_(False)
    assert training_form(wide, x.detach(), fp32) is None  # no graph to record
    with torch.no_grad():
        assert training_form(wide, x, fp32) is None
    wide.weight.requires_grad_(True)
    channels_last = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    assert training_form(wide, channels_last, fp32) is None
    # the downsampling conv: im2col up to 256 output batch pixels with im2col's width
    strided = WinogradConv2d(MIN_CHANNELS, MIN_CHANNELS, 3, padding=1, stride=2)
    assert training_form(strided, x, fp32) is None  # narrower than im2col's width
    down = WinogradConv2d(IM2COL_MIN_CHANNELS, IM2COL_MIN_CHANNELS, 3, padding=1, stride=2)
    assert training_form(down, _needs_grad(2, IM2COL_MIN_CHANNELS, 16, 16), fp32) == "im2col"
    assert training_form(down, _needs_grad(4, IM2COL_MIN_CHANNELS, 15, 15), fp32) == "im2col"
    assert training_form(down, _needs_grad(2, IM2COL_MIN_CHANNELS, 32, 32), fp32) is None
    wide_stride3 = WinogradConv2d(IM2COL_MIN_CHANNELS, IM2COL_MIN_CHANNELS, 3, padding=1, stride=3)
    assert training_form(wide_stride3, _needs_grad(1, IM2COL_MIN_CHANNELS, 9, 9), fp32) is None
    assert training_form(WinogradConv2d(MIN_CHANNELS, MIN_CHANNELS, 1), x, fp32) is None
    with winograd_enabled(False):
        assert training_form(wide, x, fp32) is None
    monkeypatch.setenv("LDM_WINOGRAD", "0")
    assert training_form(wide, x, fp32) is None


def _spy(monkeypatch) -> list[str]:
    calls: list[str] = []
    real = conv2d.conv3x3_for_training

    def spy(form, *args, **kwargs):
        calls.append(form)
        return real(form, *args, **kwargs)

    monkeypatch.setattr(conv2d, "conv3x3_for_training", spy)
    return calls


@pytest.mark.parametrize(
    ("channels", "size", "stride", "form"),
    [
        (MIN_CHANNELS, 32, 1, "winograd4"),
        (IM2COL_MIN_CHANNELS, 4, 1, "im2col"),
        (IM2COL_MIN_CHANNELS, 7, 2, "im2col"),
    ],
)
def test_conv_module_trains_through_the_form(monkeypatch, channels, size, stride, form) -> None:
    """WinogradConv2d with a graph recorded: the picked form, the direct convolution's values and
    gradients to fp32 tolerance; in inference the Winograd (cached) path as before."""
    calls = _spy(monkeypatch)
    torch.manual_seed(0)
    conv = WinogradConv2d(channels, channels, 3, padding=1, stride=stride)
    ref = torch.nn.Conv2d(channels, channels, 3, padding=1, stride=stride)
    ref.load_state_dict(conv.state_dict())
    x = torch.randn(1, channels, size, size)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = conv(xa), ref(xb)
    assert calls == [form]
    ya.square().mean().backward()
    yb.square().mean().backward()
    bound = 5e-5 if form == "winograd4" else 5e-6
    for got, want in ((ya, yb), (xa.grad, xb.grad), (conv.weight.grad, ref.weight.grad)):
        assert _rel(got, want) < bound
    assert _rel(conv.bias.grad, ref.bias.grad) < 1e-5
    with torch.no_grad():
        conv(x)
    assert calls == [form]  # inference does not go through the training forms


def test_unet_training_step_matches_the_direct_convolution(monkeypatch) -> None:
    """A U-Net wide enough for the policy: one training loss's gradients through the Winograd
    training form equal those of the direct convolution (LDM_WINOGRAD off) to fp32 tolerance."""
    calls = _spy(monkeypatch)
    torch.manual_seed(0)
    unet = wide_unet(32)
    x, t = torch.randn(1, 4, 32, 32), torch.tensor([500])

    def grads() -> dict[str, torch.Tensor]:
        unet.zero_grad(set_to_none=True)
        unet(x, t).square().mean().backward()
        return {n: p.grad.clone() for n, p in unet.named_parameters()}

    fast = grads()
    assert calls.count("winograd4") >= 2  # the ResBlock's two 320-channel convs
    with winograd_enabled(False):
        direct = grads()
    assert len(calls) == calls.count("winograd4") >= 2
    worst = max(_rel(fast[n], direct[n]) for n in direct if direct[n].abs().max() > 0)
    assert worst < 1e-4
    assert not all(torch.equal(fast[n], direct[n]) for n in direct)


def test_policy_with_freed_memory_kept_takes_winograd_wider(monkeypatch) -> None:
    """With ``ldm.malloc_policy`` in force F(4x4) training covers 256 channels and up to 256 x 256
    batch pixels (forward+backward 0.49-0.70 of oneDNN's there), and 16x16 and below from 640
    channels past im2col's batch pixels (0.65-0.92); im2col keeps its limits."""
    from ldm import malloc_policy

    fp32 = torch.float32

    def form(c: int, b: int, side: int) -> str | None:
        return training_form(
            WinogradConv2d(c, c, 3, padding=1), _needs_grad(b, c, side, side), fp32
        )

    cases = [  # (channels, batch, side): (defaults, freed memory kept)
        ((MIN_CHANNELS, 4, 64), (None, "winograd4")),
        ((IM2COL_MIN_CHANNELS, 16, 32), (None, "winograd4")),
        ((256, 2, 64), (None, "winograd4")),
        ((255, 2, 64), (None, None)),
        ((MIN_CHANNELS, 2, 256), (None, None)),
        ((256, 2, 8), (None, None)),
        ((IM2COL_MIN_CHANNELS, 2, 8), ("im2col", "im2col")),
        ((MIN_CHANNELS, 2, 64), ("winograd4", "winograd4")),
        # 16x16 and below past im2col's batch pixels, 640 channels and wider
        ((RETAINED_SMALL_F4_MIN_CHANNELS, 2, 16), (None, "winograd4")),
        ((1280, 8, 8), (None, "winograd4")),
        ((1280, 96, 4), (None, None)),  # 4x4 images: not measured, direct
        ((1280, 4, 8), ("im2col", "im2col")),
        ((1280, 1, 16), ("im2col", "im2col")),
        ((RETAINED_SMALL_F4_MIN_CHANNELS - 1, 2, 16), (None, None)),
    ]
    for retained in (False, True):
        monkeypatch.setattr(malloc_policy, "_applied", retained)
        for (c, b, side), want in cases:
            assert form(c, b, side) == want[retained], (c, b, side, retained)
