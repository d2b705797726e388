"""The optional learned position map: off by default (SD keys), breaks translation invariance when on."""

import pytest
import torch

from ldm.modules.position import sincos_position_map
from ldm.modules.unet import UNetModel


def _unet(position_embedding: bool | str, **overrides) -> UNetModel:
    params = dict(
        image_size=8,
        in_channels=4,
        out_channels=4,
        model_channels=32,
        attention_resolutions=[1],
        num_res_blocks=1,
        channel_mult=[1, 2],
        num_head_channels=16,
        use_spatial_transformer=True,
        context_dim=16,
        position_embedding=position_embedding,
    )
    return UNetModel(**{**params, **overrides})


def test_off_by_default_and_keys_unchanged():
    plain = _unet(False)
    assert plain.pos_embed is None
    with_pos = _unet(True)
    extra = set(with_pos.state_dict()) - set(plain.state_dict())
    assert extra == {"pos_embed"}
    assert with_pos.pos_embed.shape == (1, 32, 8, 8)


def test_constant_input_gives_position_dependent_interior_only_with_embedding():
    x = torch.ones(1, 4, 64, 64)  # the 8x8 map is resized; the centre is far from the zero padding
    t = torch.tensor([10.0])
    ctx = torch.randn(1, 3, 16)
    for enabled in (False, True):
        torch.manual_seed(0)
        net = _unet(enabled).eval()
        for p in net.out.parameters():  # the output conv is zero-initialized; make it visible
            torch.nn.init.normal_(p, std=0.1)
        with torch.no_grad():
            out = net(x, t, context=ctx)
        centre = out[..., 30:34, 30:34]
        spread = (centre - centre.mean(dim=(-1, -2), keepdim=True)).abs().max().item()
        if enabled:
            assert spread > 1e-3
        else:
            assert spread < 1e-4


def test_gradient_reaches_position_map_and_bad_settings_error():
    net = _unet(True)
    for p in net.out.parameters():  # zero-initialized output conv would stop all gradients
        torch.nn.init.normal_(p, std=0.1)
    out = net(torch.randn(2, 4, 8, 8), torch.tensor([1.0, 2.0]), context=torch.randn(2, 3, 16))
    out.square().mean().backward()
    assert net.pos_embed.grad is not None and net.pos_embed.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="position_embedding needs"):
        UNetModel(
            image_size=None,
            in_channels=4,
            out_channels=4,
            model_channels=32,
            attention_resolutions=[],
            num_res_blocks=1,
            channel_mult=[1],
            num_heads=1,
            position_embedding=True,
        )


def test_sincos_map_unit_rms_distinct_places_and_no_aliasing():
    m = sincos_position_map(32, 8)[0]  # [C, 8, 8]
    assert m.pow(2).mean().item() == pytest.approx(1.0, rel=1e-5)
    flat = m.reshape(32, 64).T  # one feature vector per place
    dist = torch.cdist(flat, flat) + torch.eye(64) * 1e9
    assert dist.min().item() > 0.1  # every place has its own code
    # lowest frequency: half a cycle across the map (sin(pi * y) symmetric about the centre)
    torch.testing.assert_close(m[0, :, 0], m[0, :, 0].flip(0))
    # 4 * (C // 4) channels used, the rest zero; odd sizes work
    odd = sincos_position_map(10, 5)[0]
    assert odd[8:].abs().max() == 0 and odd[:8].abs().max() > 0


def test_sincos_option_starts_from_the_map_and_bad_kind_errors():
    net = _unet("sincos")
    torch.testing.assert_close(net.pos_embed.data, sincos_position_map(32, 8))
    assert net.pos_embed.requires_grad
    with pytest.raises(ValueError, match="expected false, true, or one of"):
        _unet("fourier")


def test_pooled_context_reaches_every_place_and_is_off_by_default():
    assert _unet(False).context_emb is None
    torch.manual_seed(0)
    net = _unet(
        False,
        attention_resolutions=[],  # no cross-attention: the prompt can only come in through emb
        pooled_context=True,
        use_scale_shift_norm=True,
    ).eval()
    for p in net.parameters():  # zero-initialized output convs would hide the residual branches
        if not p.detach().abs().amax() > 0:
            torch.nn.init.normal_(p, std=0.1)
    x, t = torch.randn(1, 4, 8, 8).expand(2, -1, -1, -1), torch.tensor([5.0, 5.0])
    ctx = torch.randn(2, 3, 16)
    with torch.no_grad():
        out = net(x, t, context=ctx)
        same = net(x, t, context=ctx[:1].expand(2, -1, -1))
    assert (out[0] - out[1]).abs().amax() > 1e-3  # different prompts, different outputs
    torch.testing.assert_close(same[0], same[1])
    # the pooled vector is the token mean: permuting tokens changes nothing without attention
    with torch.no_grad():
        permuted = net(x, t, context=ctx.flip(1))
    torch.testing.assert_close(permuted, out)
    with pytest.raises(ValueError, match="pooled_context=True needs context as one"):
        net(x, t, context=[ctx])
