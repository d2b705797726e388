"""`wrap: true` (CompVis WrappedDataset) changes nothing: aspect buckets, latent caching and epoch
hooks of the wrapped data set stay visible; `wrap` must be a bool."""

from __future__ import annotations

import copy
import pickle
from pathlib import Path

import pytest
from PIL import Image

from ldm.data.datamodule import DataModuleFromConfig, WrappedDataset
from ldm.data.folder import ImageFolderDataset
from ldm.engine.latent_caching import cacheable
from ldm.util import ConfigError

FOLDER = "ldm.data.folder.ImageFolderDataset"


def _folder(root: Path) -> Path:
    """Six solid images in two aspect ratios (wide and tall), captioned by file name."""
    for i in range(6):
        size = (48, 32) if i % 2 else (32, 48)  # PIL: (width, height)
        Image.new("RGB", size, (40 * i, 100, 200)).save(root / f"img{i}.png")
    return root


def _module(root: Path, wrap: object) -> DataModuleFromConfig:
    train = {"target": FOLDER, "params": {"root": str(root), "size": 32, "buckets": {"step": 8}}}
    return DataModuleFromConfig(batch_size=3, train=train, num_workers=0, wrap=wrap)


def test_wrap_keeps_buckets_caching_and_epoch_hooks(tmp_path: Path) -> None:
    dm = _module(_folder(tmp_path), wrap=True)
    dm.setup()
    dataset = dm.datasets["train"]
    assert isinstance(dataset, WrappedDataset) and isinstance(dataset.data, ImageFolderDataset)
    assert dataset.item_buckets == dataset.data.item_buckets
    assert len(set(dataset.item_buckets)) == 2
    assert cacheable(dataset)  # cache_variants, cache_image, use_latent_cache reach the folder
    assert dataset.set_epoch.__self__ is dataset.data
    batches = list(dm.train_dataloader())  # one size per batch: no stack size mismatch
    shapes = sorted(tuple(b["image"].shape) for b in batches)
    assert shapes == sorted((3, h, w, 3) for h, w in set(dataset.item_buckets))


def test_wrapped_dataset_pickles_and_copies_without_recursion(tmp_path: Path) -> None:
    dataset = WrappedDataset(ImageFolderDataset(_folder(tmp_path), size=32, buckets={"step": 8}))
    for clone in (pickle.loads(pickle.dumps(dataset)), copy.deepcopy(dataset)):
        assert isinstance(clone, WrappedDataset)  # dunders (__deepcopy__, ...) are not forwarded
        assert clone.item_buckets == dataset.item_buckets
    bare = WrappedDataset.__new__(WrappedDataset)  # as unpickling sees it before __dict__ is set
    with pytest.raises(AttributeError, match="item_buckets"):
        _ = bare.item_buckets
    with pytest.raises(AttributeError):
        _ = WrappedDataset([1, 2]).item_buckets  # a missing attribute stays missing


@pytest.mark.parametrize("wrap", ["yes", "false", 1, None])
def test_wrap_must_be_a_bool(tmp_path: Path, wrap: object) -> None:
    with pytest.raises(ConfigError, match=r"data\.params\.wrap: expected true or false"):
        _module(tmp_path, wrap=wrap)


def test_a_batch_size_beyond_the_data_set_is_warned(tmp_path: Path, caplog) -> None:  # noqa: ANN001
    import logging

    train = {"target": FOLDER, "params": {"root": str(_folder(tmp_path)), "size": 32}}
    dm = DataModuleFromConfig(batch_size=64, train=train, num_workers=0)
    with caplog.at_level(logging.WARNING):
        dm.train_dataloader()
    assert "batch_size 64 is larger than the train set (6 items" in caplog.text
