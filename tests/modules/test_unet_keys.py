"""UNetModel built from the official SD configs has exactly the SD checkpoint keys and shapes."""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ldm.modules.unet import UNetModel
from ldm.util import instantiate_from_config

DATA = Path(__file__).parents[1] / "data"
CONFIGS = Path(__file__).parents[1] / "configs"
PREFIX = "model.diffusion_model."


def _reference(tsv: str) -> dict[str, tuple[int, ...]]:
    ref = {}
    for line in (DATA / tsv).read_text().splitlines()[1:]:
        key, shape = line.split("\t")
        if key.startswith(PREFIX):
            ref[key[len(PREFIX) :]] = tuple(int(s) for s in shape.split("x")) if shape else ()
    return ref


def _ours(cfg) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        unet = instantiate_from_config(cfg)
    assert isinstance(unet, UNetModel)
    return {k: tuple(v.shape) for k, v in unet.state_dict().items()}


@pytest.mark.parametrize(
    "config, tsv, n_params",
    [
        ("v1-inference.yaml", "sd-v1-unet-vae.tsv", 859_520_964),
        ("v2-inference-v.yaml", "sd-v2-unet-vae.tsv", 865_910_724),
        ("v2-inference.yaml", "sd-v2-unet-vae.tsv", 865_910_724),
    ],
)
def test_sd_unet_keys_and_shapes(config, tsv, n_params):
    cfg = OmegaConf.load(CONFIGS / "official" / config).model.params.unet_config
    ours, ref = _ours(cfg), _reference(tsv)
    assert sorted(set(ref) - set(ours)) == [], "missing keys"
    assert sorted(set(ours) - set(ref)) == [], "unexpected keys"
    wrong = {k: (ours[k], ref[k]) for k in ref if ours[k] != ref[k]}
    assert wrong == {}
    assert sum(torch.Size(s).numel() for s in ours.values()) == n_params


def test_inpainting_unet_has_nine_input_channels():
    cfg = OmegaConf.load(CONFIGS / "official" / "v2-inpainting-inference.yaml").model.params
    ours = _ours(cfg.unet_config)
    ref = _reference("sd-v2-unet-vae.tsv")
    assert ours.pop("input_blocks.0.0.weight") == (320, 9, 3, 3)
    ref.pop("input_blocks.0.0.weight")
    assert ours == ref


def test_ldm_txt2img_large_parameter_count():
    """CompVis txt2img-1p4B (LDM-KL-8-G) U-Net; its loader logs 'DiffusionWrapper has 872.30 M params'."""
    params = dict(
        image_size=32,
        in_channels=4,
        out_channels=4,
        model_channels=320,
        attention_resolutions=[4, 2, 1],
        num_res_blocks=2,
        channel_mult=[1, 2, 4, 4],
        num_heads=8,
        use_spatial_transformer=True,
        transformer_depth=1,
        context_dim=1280,
        use_checkpoint=True,
        legacy=False,
    )
    with torch.device("meta"):
        unet = UNetModel(**params)
    assert round(sum(p.numel() for p in unet.parameters()) / 1e6, 2) == 872.30


@pytest.mark.parametrize(
    "config", ["cin256-v2.yaml", "celebahq-ldm-vq-4.yaml", "lsun_churches-ldm-kl-8.yaml"]
)
def test_compvis_ldm_unets_build(config):
    cfg = OmegaConf.load(CONFIGS / "compvis" / config).model.params.unet_config
    ours = _ours(cfg)
    p = cfg.params
    # first conv and output conv follow the config; attention type follows use_spatial_transformer
    assert ours["input_blocks.0.0.weight"] == (p.model_channels, p.in_channels, 3, 3)
    assert ours["out.2.weight"] == (p.out_channels, p.model_channels, 3, 3)
    spatial = any(".transformer_blocks." in k for k in ours)
    assert spatial == bool(p.get("use_spatial_transformer", False))
    if not spatial:
        assert any(k.endswith(".qkv.weight") for k in ours)
