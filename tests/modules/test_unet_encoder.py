"""EncoderUNetModel (guided-diffusion classifier) reuses the U-Net's encoder path exactly."""

import pytest
import torch

from ldm.modules.unet import EncoderUNetModel, UNetModel

COMMON = dict(
    image_size=8,
    in_channels=3,
    model_channels=32,
    num_res_blocks=1,
    attention_resolutions=[2],
    channel_mult=[1, 2],
    num_head_channels=16,
    use_scale_shift_norm=True,
    resblock_updown=True,
)


def _randomize(module):
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


@pytest.mark.parametrize("pool", ["adaptive", "attention", "spatial", "spatial_v2"])
def test_encoder_shares_the_unet_encoder_path(pool):
    unet = UNetModel(**COMMON, out_channels=3)
    _randomize(unet)
    enc = EncoderUNetModel(**COMMON, out_channels=10, pool=pool)
    shared = {k: v for k, v in unet.state_dict().items() if not k.startswith(("out.", "output_"))}
    missing, unexpected = enc.load_state_dict(shared, strict=False)
    assert unexpected == [] and all(k.startswith("out.") for k in missing)
    feats = []
    unet.middle_block.register_forward_hook(lambda m, i, o: feats.append(o))
    enc.middle_block.register_forward_hook(lambda m, i, o: feats.append(o))
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3.0, 700.0])
    unet(x, t)
    logits = enc(x, t)
    assert torch.allclose(feats[0], feats[1], atol=1e-6)
    assert logits.shape == (2, 10)


def test_attention_pool_needs_head_channels():
    with pytest.raises(ValueError, match="num_head_channels"):
        EncoderUNetModel(**dict(COMMON, num_head_channels=-1), out_channels=2, pool="attention")
