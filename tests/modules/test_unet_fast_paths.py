"""The U-Net's speed paths (channels-last activations, 1x1 projections as matmuls, in-place ops
without autograd, native bf16 GroupNorm on CPU) give the reference results: diffusers within 1e-4
(fp32) and 1e-2 relative (bf16), gradients equal to the NCHW path, a wrapped (LoRA-style)
projection still runs its own forward."""

import pytest
import torch
from torch import nn

from ldm.modules.attention import _conv1x1_as_linear
from ldm.modules.unet import UNetModel

pytest.importorskip("diffusers")
from tests.modules.test_unet_parity import SD1_LIKE, SD2_LIKE, _randomize, _to_diffusers  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _inputs(params: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    t = torch.tensor([3.0, 917.25])
    ctx = torch.randn(2, 5, params["context_dim"], generator=gen)
    return x, t, ctx


@pytest.mark.parametrize("params", [SD1_LIKE, SD2_LIKE], ids=["sd1-like", "sd2-like"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels-last"])
def test_fast_paths_match_diffusers_fp32(params, channels_last):
    unet = UNetModel(**params, channels_last=channels_last).eval()
    _randomize(unet)
    ref = _to_diffusers(unet, params)
    x, t, ctx = _inputs(params)
    with torch.no_grad():
        ours = unet(x, t, context=ctx)
        theirs = ref(x, t, encoder_hidden_states=ctx).sample
    assert ours.is_contiguous()  # NCHW out, whatever the torso ran in
    assert theirs.abs().mean() > 1e-2
    err = (ours - theirs).abs().max().item()
    assert err <= 1e-4, f"max abs diff {err:.3g} vs diffusers"


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels-last"])
def test_bf16_within_1e2_of_fp32_diffusers(channels_last):
    params = SD1_LIKE
    unet = UNetModel(**params, channels_last=channels_last).eval()
    _randomize(unet)
    ref = _to_diffusers(unet, params)
    x, t, ctx = _inputs(params)
    with torch.no_grad():
        theirs = ref(x, t, encoder_hidden_states=ctx).sample
        ours = unet.to(torch.bfloat16)(x.bfloat16(), t, context=ctx.bfloat16())
    assert ours.dtype == torch.bfloat16
    rel = ((ours.float() - theirs).norm() / theirs.norm()).item()
    assert rel <= 1e-2, f"relative difference {rel:.3g} vs fp32 diffusers"


def test_grad_paths_equal_no_grad_paths_and_channels_last_gradients():
    """With autograd the in-place shortcuts are off: same output bits; channels-last gradients
    equal the NCHW ones to float tolerance."""
    params = SD1_LIKE
    unet = UNetModel(**params).eval()
    _randomize(unet)
    x, t, ctx = _inputs(params)
    with torch.no_grad():
        no_grad = unet(x, t, context=ctx)
    grads = {}
    for cl in (False, True):
        unet.channels_last = cl
        out = unet(x, t, context=ctx)
        if not cl:
            assert torch.equal(out, no_grad)
        out.square().mean().backward()
        grads[cl] = {n: p.grad.clone() for n, p in unet.named_parameters()}
        unet.zero_grad(set_to_none=True)
    scale = max(g.abs().max().item() for g in grads[False].values())
    assert scale > 1e-6  # non-trivial gradients
    for name, g in grads[False].items():  # (biases right before a GroupNorm get ~0: global scale)
        assert (grads[True][name] - g).abs().max() <= 1e-4 * scale, name


def test_wrapped_projection_runs_its_own_forward():
    """A module wrapping the 1x1 conv (as PEFT's LoRA layer does) is called, not bypassed."""
    conv = nn.Conv2d(6, 4, 1)

    class Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.base = conv

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.base(x) + 1.0  # an extra branch, like a LoRA delta

    tokens = torch.randn(2, 3 * 5, 6)
    plain = _conv1x1_as_linear(conv, tokens, 3, 5)
    image = tokens.reshape(2, 3, 5, 6).permute(0, 3, 1, 2)
    expected = conv(image).permute(0, 2, 3, 1).reshape(2, 15, 4)
    torch.testing.assert_close(plain, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(_conv1x1_as_linear(Wrapped(), tokens, 3, 5), expected + 1.0)


def test_channels_last_keeps_state_dict_keys_and_layout():
    a, b = UNetModel(**SD1_LIKE), UNetModel(**SD1_LIKE, channels_last=True)
    assert list(a.state_dict()) == list(b.state_dict())
    assert all(v.is_contiguous() for v in b.state_dict().values())
