"""Our configs/autoencoder/*.yaml: published LDM sizes, loss targets, and the photo-crop data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from ldm.data.photos import TRAIN_PHOTOS, VALIDATION_PHOTOS
from ldm.modules.losses import LPIPSWithDiscriminator, VQLPIPSWithDiscriminator
from ldm.util import instantiate_from_config

ROOT = Path(__file__).resolve().parents[2]
FAMILIES = ["kl-f4", "kl-f8", "kl-f16", "kl-f32", "vq-f4", "vq-f8", "vq-f16"]


@pytest.mark.parametrize("name", FAMILIES)
def test_family_configs_have_the_published_sizes(name: str) -> None:
    ours = OmegaConf.load(ROOT / "configs" / "autoencoder" / f"{name}.yaml").model
    published = OmegaConf.load(ROOT / "tests" / "configs" / "compvis" / f"{name}.yaml").model
    assert ours.params.ddconfig == published.params.ddconfig
    assert ours.params.embed_dim == published.params.embed_dim
    assert ours.params.get("n_embed") == published.params.get("n_embed")
    for key, value in published.params.lossconfig.params.items():
        assert ours.params.lossconfig.params[key] == value, key
    with torch.device("meta"):
        model = instantiate_from_config(ours)
    expected = VQLPIPSWithDiscriminator if name.startswith("vq") else LPIPSWithDiscriminator
    assert type(model.loss) is expected
    factor = 2 ** (len(ours.params.ddconfig.ch_mult) - 1)
    assert name.endswith(f"f{factor}")


@pytest.mark.parametrize(
    ("name", "z_channels"), [("kl-f4-small", 3), ("vq-f4-small", 3), ("kl-f4-fast", 4)]
)
def test_small_configs_build_and_their_data_holds_out_photos(name: str, z_channels: int) -> None:
    cfg = OmegaConf.load(ROOT / "configs" / "autoencoder" / f"{name}.yaml")
    model = instantiate_from_config(cfg.model)
    assert model.loss.perceptual_loss is None  # no LPIPS weight files needed
    x = torch.zeros(1, 3, 64, 64)
    z = model.encode(x).mode() if name.startswith("kl") else model.encode(x)[0]
    assert z.shape == (1, z_channels, 16, 16)  # f4
    train = instantiate_from_config(cfg.data.params.train)
    val = instantiate_from_config(cfg.data.params.validation)
    assert set(train.photos).isdisjoint(val.photos)
    assert set(val.photos) == set(VALIDATION_PHOTOS) and set(train.photos) == set(TRAIN_PHOTOS)
    item = train[0]
    assert item["image"].shape == (64, 64, 3) and item["image"].dtype == np.float32
    assert -1.0 <= item["image"].min() and item["image"].max() <= 1.0
    np.testing.assert_array_equal(val[3]["image"], val[3]["image"])  # fixed validation crops
    assert not np.array_equal(val[3]["image"], val[4]["image"])
