"""Numeric parity of UNetModel with diffusers' UNet2DConditionModel through diffusers' converters."""

import pytest
import torch

from ldm.modules.unet import UNetModel

diffusers = pytest.importorskip("diffusers")
from diffusers import UNet2DConditionModel  # noqa: E402
from diffusers.loaders.single_file_utils import (  # noqa: E402
    convert_ldm_unet_checkpoint,
    create_unet_diffusers_config_from_ldm,
)

SD1_LIKE = dict(  # conv proj_in, heads given by num_heads (SD 1.x layout)
    image_size=8,
    in_channels=4,
    out_channels=4,
    model_channels=32,
    attention_resolutions=[1, 2],
    num_res_blocks=2,
    channel_mult=[1, 2, 2],
    num_heads=2,
    use_spatial_transformer=True,
    transformer_depth=1,
    context_dim=32,
    legacy=False,
)
SD2_LIKE = dict(  # linear proj_in, heads given by num_head_channels (SD 2.x layout)
    image_size=8,
    in_channels=4,
    out_channels=4,
    model_channels=32,
    attention_resolutions=[1, 2],
    num_res_blocks=2,
    channel_mult=[1, 2, 2],
    num_head_channels=16,
    use_spatial_transformer=True,
    use_linear_in_transformer=True,
    transformer_depth=2,
    context_dim=24,
    legacy=False,
)
ONLY_CROSS = dict(SD1_LIKE, legacy=True, disable_self_attentions=[True, False, False])


def _randomize(module: torch.nn.Module) -> None:
    """Random weights everywhere (zero-initialized output layers would hide mistakes)."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def _to_diffusers(unet: UNetModel, params: dict) -> UNet2DConditionModel:
    original_config = {
        "model": {
            "params": {
                "unet_config": {"params": params},
                "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}},
            }
        }
    }
    checkpoint = {"model.diffusion_model." + k: v for k, v in unet.state_dict().items()}
    config = create_unet_diffusers_config_from_ldm(original_config, checkpoint, image_size=64)
    converted = convert_ldm_unet_checkpoint(checkpoint, config)
    ref = UNet2DConditionModel(**config)
    ref.load_state_dict(converted, strict=True)
    return ref.eval()


@pytest.mark.parametrize(
    "params", [SD1_LIKE, SD2_LIKE, ONLY_CROSS], ids=["sd1-like", "sd2-like", "only-cross-attn"]
)
def test_unet_matches_diffusers(params):
    unet = UNetModel(**params).eval()
    _randomize(unet)
    ref = _to_diffusers(unet, params)
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([3.0, 917.25])  # fractional t as sigma-based samplers produce
    ctx = torch.randn(2, 5, params["context_dim"])
    with torch.no_grad():
        ours = unet(x, t, context=ctx)
        theirs = ref(x, t, encoder_hidden_states=ctx).sample
    assert ours.shape == (2, 4, 8, 8)
    assert theirs.abs().mean() > 1e-2  # a non-trivial output
    err = (ours - theirs).abs().max().item()
    assert err <= 1e-4, f"max abs diff {err:.3g} vs diffusers"


@pytest.mark.parametrize("size", [(9, 9), (7, 11), (6, 10)], ids=["9x9", "7x11", "6x10"])
def test_unet_matches_diffusers_at_sizes_not_divisible_by_the_downsamplings(size):
    """Two downsamplings need sides divisible by 4; other sides upsample to the skip's size, as
    diffusers' UNet2DConditionModel does with its `upsample_size`."""
    unet = UNetModel(**SD1_LIKE).eval()
    _randomize(unet)
    ref = _to_diffusers(unet, SD1_LIKE)
    x = torch.randn(2, 4, *size)
    t = torch.tensor([3.0, 917.25])
    ctx = torch.randn(2, 5, SD1_LIKE["context_dim"])
    with torch.no_grad():
        ours = unet(x, t, context=ctx)
        theirs = ref(x, t, encoder_hidden_states=ctx).sample
    assert ours.shape == theirs.shape == (2, 4, *size)
    rel = ((ours - theirs).norm() / theirs.norm()).item()
    assert rel <= 1e-5, f"relative difference {rel:.3g} vs diffusers at {size}"


@pytest.mark.parametrize("side", [32, 5], ids=["fused-path", "two-step-path"])
def test_upsample_to_twice_the_size_is_bit_identical_to_the_plain_2x(side):
    """A skip size of exactly 2x takes the usual (fused or two-step) path: the same bits."""
    from ldm.modules.unet_layers import Upsample

    up = Upsample(8, True).eval()
    _randomize(up)
    x = torch.randn(1, 8, side, side)
    with torch.no_grad():
        assert torch.equal(up(x, (2 * side, 2 * side)), up(x))
        odd = up(x, (2 * side - 1, 2 * side + 1))
        ref = up.conv(torch.nn.functional.interpolate(x, size=(2 * side - 1, 2 * side + 1)))
    assert odd.shape == (1, 8, 2 * side - 1, 2 * side + 1)
    torch.testing.assert_close(odd, ref)
