"""Encoder/Decoder behaviour, DiagonalGaussianDistribution against torch.distributions."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from ldm.modules.autoencoder import Decoder, Encoder
from ldm.modules.autoencoder_blocks import AttnBlock, LinAttnBlock
from ldm.modules.distributions import DiagonalGaussianDistribution

DD = dict(
    double_z=True,
    z_channels=4,
    resolution=32,
    in_channels=3,
    out_ch=3,
    ch=32,
    ch_mult=[1, 2, 2],
    num_res_blocks=1,
    attn_resolutions=[16],
    dropout=0.0,
)


@pytest.mark.parametrize("attn_type", ["vanilla", "linear", "none"])
def test_encoder_decoder_shapes_and_attention_types(attn_type: str) -> None:
    enc, dec = Encoder(**DD, attn_type=attn_type), Decoder(**DD, attn_type=attn_type)
    x = torch.randn(2, 3, 32, 32)
    h = enc(x)
    assert h.shape == (2, 8, 8, 8)  # double_z -> 2 * z_channels, f = 4
    assert dec(h[:, :4]).shape == (2, 3, 32, 32)
    kinds = {type(m).__name__ for m in enc.down[1].attn}
    expected = {"vanilla": "AttnBlock", "linear": "LinAttnBlock", "none": "Identity"}[attn_type]
    assert kinds == {expected}
    assert dec.z_shape == (1, 4, 8, 8)


def test_use_linear_attn_flag_and_decoder_options() -> None:
    enc = Encoder(**DD, use_linear_attn=True)
    assert isinstance(enc.mid.attn_1, LinAttnBlock)
    dec = Decoder(**DD, tanh_out=True)
    out = dec(10 * torch.randn(1, 4, 8, 8))
    assert out.abs().max() <= 1.0
    pre = Decoder(**DD, give_pre_end=True)(torch.randn(1, 4, 8, 8))
    assert pre.shape == (1, 32, 32, 32)  # features before norm_out/conv_out


def test_attn_block_equals_explicit_softmax_attention() -> None:
    blk = AttnBlock(32).eval()
    x = torch.randn(2, 32, 5, 6)
    h = blk.norm(x)
    q, k, v = (m(h).flatten(2) for m in (blk.q, blk.k, blk.v))  # [B, C, N]
    w = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(32), dim=-1)  # [B, N, N]
    ref = x + blk.proj_out((v @ w.transpose(1, 2)).reshape(2, 32, 5, 6))
    torch.testing.assert_close(blk(x), ref, atol=1e-5, rtol=1e-5)


def test_downsampling_without_conv_is_average_pooling() -> None:
    enc = Encoder(**{**DD, "resamp_with_conv": False})
    x = torch.randn(1, 32, 8, 8)
    torch.testing.assert_close(enc.down[0].downsample(x), torch.nn.functional.avg_pool2d(x, 2))


def test_diagonal_gaussian_matches_torch_distributions() -> None:
    params = torch.randn(3, 8, 4, 4)
    post = DiagonalGaussianDistribution(params)
    mean, logvar = params[:, :4], params[:, 4:]
    ref = Normal(mean, torch.exp(0.5 * logvar))
    prior = Normal(torch.zeros_like(mean), torch.ones_like(mean))
    torch.testing.assert_close(post.kl(), kl_divergence(ref, prior).sum(dim=[1, 2, 3]))
    other = DiagonalGaussianDistribution(torch.randn(3, 8, 4, 4))
    ref_other = Normal(other.mean, other.std)
    torch.testing.assert_close(post.kl(other), kl_divergence(ref, ref_other).sum(dim=[1, 2, 3]))
    z = torch.randn(3, 4, 4, 4)
    torch.testing.assert_close(post.nll(z), -ref.log_prob(z).sum(dim=[1, 2, 3]))
    assert torch.equal(post.mode(), mean)


def test_diagonal_gaussian_sampling_statistics_and_generator() -> None:
    params = torch.cat(
        [torch.full((1, 1, 200, 200), 0.5), torch.full((1, 1, 200, 200), math.log(4.0))], 1
    )
    post = DiagonalGaussianDistribution(params)
    s = post.sample(generator=torch.Generator().manual_seed(0))
    assert abs(s.mean().item() - 0.5) < 0.02 and abs(s.std().item() - 2.0) < 0.02
    s2 = post.sample(generator=torch.Generator().manual_seed(0))
    assert torch.equal(s, s2)
    det = DiagonalGaussianDistribution(params, deterministic=True)
    assert torch.equal(det.sample(), det.mean) and torch.equal(det.kl(), torch.zeros(1))


@pytest.mark.parametrize(
    ("c_in", "c_out", "conv_shortcut", "temb"),
    [(8, 8, False, 0), (8, 16, False, 0), (8, 16, True, 0), (8, 8, False, 6)],
)
def test_resnet_block_without_grad_is_the_block_formula_bit_for_bit(
    c_in: int, c_out: int, conv_shortcut: bool, temb: int
) -> None:
    """The in-place no-grad path gives exactly x_skip + conv2(silu(gn2(conv1(silu(gn1 x)) + W
    silu(t)))), the pre-activation block of DDPM, and the same as with grad recorded."""
    from ldm.modules.autoencoder_blocks import ResnetBlock

    torch.manual_seed(0)
    block = ResnetBlock(
        in_channels=c_in,
        out_channels=c_out,
        conv_shortcut=conv_shortcut,
        temb_channels=temb,
        norm_num_groups=4,
    ).eval()
    x = torch.randn(2, c_in, 6, 5)
    t = torch.randn(2, temb) if temb else None
    h = block.conv1(torch.nn.functional.silu(block.norm1(x)))
    if t is not None:
        h = h + block.temb_proj(torch.nn.functional.silu(t))[:, :, None, None]
    h = block.conv2(torch.nn.functional.silu(block.norm2(h)))
    skip = x
    if c_in != c_out:
        skip = block.conv_shortcut(x) if conv_shortcut else block.nin_shortcut(x)
    expected = skip + h
    x_before = x.clone()
    with torch.no_grad():
        fast = block(x, t)
    assert torch.equal(x, x_before)  # the input is not written
    assert torch.equal(fast, expected.detach())
    assert torch.equal(block(x, t), expected)  # the graph-recording path


def test_resnet_block_without_grad_keeps_the_promoted_dtype_of_mixed_inputs() -> None:
    from ldm.modules.autoencoder_blocks import ResnetBlock

    block = ResnetBlock(in_channels=8, norm_num_groups=4).eval()
    x = torch.randn(1, 8, 4, 4)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        out = block(x)  # conv2 gives bf16, x is fp32: x + h is fp32
    assert out.dtype == torch.float32
