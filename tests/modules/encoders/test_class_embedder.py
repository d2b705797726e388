"""ClassEmbedder: embeddings, guidance dropout to the null class, CompVis config; SpatialRescaler."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from ldm.modules.encoders.class_embedder import ClassEmbedder
from ldm.modules.encoders.spatial import SpatialRescaler
from ldm.util import instantiate_from_config


def test_eval_embeds_labels_without_dropout():
    emb = ClassEmbedder(embed_dim=8, n_classes=10, ucg_rate=0.5).eval()
    labels = torch.tensor([0, 3, 9, 3])
    c = emb({"class": labels})
    assert c.shape == (4, 1, 8)
    torch.testing.assert_close(c[:, 0], emb.embedding.weight[labels])


def test_training_dropout_rate_and_null_class():
    emb = ClassEmbedder(embed_dim=4, n_classes=11, ucg_rate=0.3).train()
    labels = torch.randint(0, 10, (20000,))
    g = torch.Generator().manual_seed(0)
    c = emb({"class": labels}, generator=g)[:, 0]
    null = emb.embedding.weight[10]
    dropped = (c == null).all(-1)
    assert abs(dropped.float().mean().item() - 0.3) < 0.015
    torch.testing.assert_close(c[~dropped], emb.embedding.weight[labels[~dropped]])
    kept = emb({"class": labels}, disable_dropout=True)[:, 0]
    torch.testing.assert_close(kept, emb.embedding.weight[labels])
    all_dropped = ClassEmbedder(embed_dim=4, n_classes=11, ucg_rate=1.0).train()
    assert (all_dropped({"class": labels[:5]})[:, 0] == all_dropped.embedding.weight[10]).all()


def test_unconditional_conditioning_is_null_class():
    emb = ClassEmbedder(embed_dim=4, n_classes=7, key="class_label")
    uc = emb.get_unconditional_conditioning(3)
    assert uc["class_label"].tolist() == [6, 6, 6]
    torch.testing.assert_close(emb.eval()(uc)[:, 0], emb.embedding.weight[[6, 6, 6]])
    with pytest.raises(ValueError, match="n_classes"):
        emb({"class_label": torch.tensor([7])})


def test_compvis_cin_config_builds(tmp_path):
    cfg = OmegaConf.create(
        {"target": "ldm.modules.encoders.modules.ClassEmbedder",
         "params": {"n_classes": 1001, "embed_dim": 512, "key": "class_label"}}
    )  # fmt: skip
    emb = instantiate_from_config(cfg).eval()
    assert list(emb.state_dict()) == ["embedding.weight"]
    assert emb({"class_label": torch.tensor([1, 2])}).shape == (2, 1, 512)


def test_spatial_rescaler_matches_interpolate_and_conv():
    m = SpatialRescaler(
        n_stages=2, method="bilinear", multiplier=0.5, in_channels=5, out_channels=3
    )
    x = torch.randn(2, 5, 32, 32)
    y = F.interpolate(
        F.interpolate(x, scale_factor=0.5, mode="bilinear"), scale_factor=0.5, mode="bilinear"
    )
    torch.testing.assert_close(m.encode(x), F.conv2d(y, m.channel_mapper.weight))
    assert list(m.state_dict()) == ["channel_mapper.weight"]
    with pytest.raises(ValueError, match="method"):
        SpatialRescaler(method="lanczos")
