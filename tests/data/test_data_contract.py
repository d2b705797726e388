"""The data module names what breaks the CompVis item contract (DESIGN.md, contracts item 5):
collation failures name the key, the value's type and the data set; the train loader's first
batch is checked for uint8 / 0..255 and channels-first images; valid items pass untouched."""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset

from ldm.data.datamodule import DataModuleFromConfig
from ldm.util import ConfigError

HERE = "tests.data.test_data_contract"


class Items(Dataset):
    """Eight CompVis items; ``kind`` breaks the contract in one way."""

    def __init__(self, kind: str = "valid", n: int = 8) -> None:
        self.kind, self.n = kind, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Any]:
        x = np.random.default_rng(i).uniform(-1, 1, (16, 16, 3)).astype(np.float32)
        item: dict[str, Any] = {"caption": f"item {i}", "class_label": i % 4}
        if self.kind == "uint8":
            x = ((x + 1) * 127.5).astype(np.uint8)
        elif self.kind == "float255":
            x = (x + 1) * 127.5
        elif self.kind == "chw":
            x = np.ascontiguousarray(x.transpose(2, 0, 1))
        elif self.kind == "pil":
            x = Image.fromarray(((x + 1) * 127.5).astype(np.uint8))
        elif self.kind == "none_caption" and i % 2:
            item["caption"] = None
        elif self.kind == "none_all":  # default_collate itself fails (TypeError)
            item["caption"] = None
        elif self.kind == "mask":  # a mask H x W x 1 in [0, 1] beside the image is fine
            item["mask"] = (x[..., :1] > 0).astype(np.float32)
        item["image"] = x
        return item


def _module(kind: str, image_key: str | None = "image", **params: Any) -> DataModuleFromConfig:
    train = {"target": f"{HERE}.Items", "params": {"kind": kind}}
    dm = DataModuleFromConfig(batch_size=4, train=train, num_workers=0, **params)
    if image_key is not None:  # as when a Trainer attaches the model (its first_stage_key)
        model = SimpleNamespace(first_stage_key=image_key)
        dm.trainer = SimpleNamespace(lightning_module=model, ckpt_path=None, current_epoch=0)
    return dm


def _first(dm: DataModuleFromConfig) -> dict[str, Any]:
    return next(iter(dm.train_dataloader()))


@pytest.mark.parametrize(
    ("kind", "key", "found", "fix"),
    [
        ("pil", "image", "PIL.Image.Image", "np.asarray"),
        ("none_all", "caption", "NoneType", "empty string"),
        # every other caption None: the shuffled batch either starts with one (default_collate
        # fails) or has one later (default_collate passes it through; the check catches it)
        ("none_caption", "caption", ("None in", "NoneType"), "empty string"),
    ],
)
def test_collate_failure_names_key_type_and_dataset(kind, key, found, fix) -> None:
    with pytest.raises(ConfigError) as err:
        list(_module(kind, wrap=True).train_dataloader())
    text = str(err.value)
    found = (found,) if isinstance(found, str) else found
    assert f"key '{key}'" in text and any(f in text for f in found) and fix in text
    assert f"{HERE}.Items" in text and "H x W x C float" in text  # the data set and the contract


def test_collate_failure_in_a_worker_process_names_the_key() -> None:
    dm = DataModuleFromConfig(
        batch_size=4, train={"target": f"{HERE}.Items", "params": {"kind": "pil"}}, num_workers=1
    )
    with pytest.raises(ConfigError, match="key 'image' holds PIL.Image.Image"):
        next(iter(dm.train_dataloader()))


def test_differing_image_sizes_point_to_buckets() -> None:
    from ldm.data.collate import CheckedCollate

    items = [{"image": np.zeros((8, 8, 3), np.float32)}, {"image": np.zeros((8, 6, 3), np.float32)}]
    with pytest.raises(ConfigError, match=r"key 'image' holds arrays of different shapes.*bucket"):
        CheckedCollate("my.Data")(items)


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("uint8", r"key 'image' is uint8 .*127\.5 - 1"),
        ("float255", r"key 'image' has values in \[[0-9.]+, 255\], far outside \[-1, 1\]"),
        ("chw", r"key 'image' has shape \(4, 3, 16, 16\): the items look channels-first"),
    ],
)
def test_first_train_batch_against_the_image_convention(kind: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected) as err:
        _first(_module(kind))
    assert f"{HERE}.Items" in str(err.value) and "H x W x C" in str(err.value)


def test_without_the_model_key_image_like_tensors_get_warnings(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="ldm.data.item_contract"):
        batch = _first(_module("chw", image_key=None))
    assert batch["image"].shape == (4, 3, 16, 16)
    assert "key 'image'" in caplog.text and "channels-first" in caplog.text


@pytest.mark.parametrize("kind", ["valid", "mask"])
def test_valid_items_pass_untouched(kind: str, caplog) -> None:
    with caplog.at_level(logging.WARNING):
        for image_key in ("image", None):
            batch = _first(_module(kind, image_key=image_key, seed=1))
            order = [int(s.split()[1]) for s in batch["caption"]]
            expected = torch.stack([torch.from_numpy(Items(kind)[i]["image"]) for i in order])
            assert torch.equal(batch["image"], expected)
            assert batch["class_label"].tolist() == [i % 4 for i in order]
    assert not [r for r in caplog.records if r.name.startswith("ldm.data")]
