"""DreamBoothDataset: interleaved instance / class items, prior flags, captions, class prompts,
the class-image folder's manifest checks (no model: class images are written by hand here)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from ldm.data.class_images import ClassImageCache, ClassImageMismatch
from ldm.data.dreambooth import DreamBoothDataset
from ldm.data.micro_conditioning import MICRO_CONDITIONING_KEYS
from ldm.data.shapes import CaptionedShapes
from ldm.data.transforms import ImageTransform
from ldm.util import ConfigError

PURPLE = {
    "target": "ldm.data.shapes.CaptionedShapes",
    "params": {"length": 3, "size": 16, "colours": ["purple"]},
}
TRAIN_CAPTIONS = {"target": "ldm.data.shapes.CaptionedShapes", "params": {"length": 3, "size": 16}}


def write_class_images(folder: Path, prompts: list[str], size: int = 16) -> list[np.ndarray]:
    """Solid-grey class images 00000.png ... (value 10 * i) and their manifest; the uint8 arrays."""
    cache = ClassImageCache(folder)
    cache.write_manifest({"prompts": prompts, "size": [size, size], "model": {"fingerprint": "x"}})
    arrays = []
    for i in range(len(prompts)):
        a = np.full((size, size, 3), 10 * i, dtype=np.uint8)
        Image.fromarray(a).save(cache.path(i))
        arrays.append(a)
    return arrays


def as_uint8(image: np.ndarray) -> np.ndarray:
    return np.round((image + 1.0) * 127.5).astype(np.uint8)


def test_epoch_interleaves_instance_and_class_items_with_prior_flags(tmp_path: Path) -> None:
    arrays = write_class_images(tmp_path, ["a shape"] * 5)
    ds = DreamBoothDataset(
        instance=PURPLE, class_dir=tmp_path, num_class_images=5, class_prompt="a shape"
    )
    shapes = CaptionedShapes(length=3, size=16, colours=["purple"])
    assert ds.prior_preservation and len(ds) == 2 * 5 and ds.missing_class_images() == []
    for k in range(len(ds)):
        item = ds[k]
        assert set(item) == {"image", "caption", "prior", *MICRO_CONDITIONING_KEYS}
        assert item["image"].dtype == np.float32 and item["image"].shape == (16, 16, 3)
        if k % 2 == 0:  # instance k // 2, cycled over the 3 purple shapes
            assert item["prior"] is False
            assert item["caption"] == shapes.caption((k // 2) % 3) and "purple" in item["caption"]
            np.testing.assert_array_equal(item["image"], shapes[(k // 2) % 3]["image"])
        else:  # class image k // 2, exactly the file's pixels, uncropped micro-conditioning
            assert item["prior"] is True and item["caption"] == "a shape"
            np.testing.assert_array_equal(as_uint8(item["image"]), arrays[k // 2])
            assert item["original_size_as_tuple"].tolist() == [16, 16]
            assert item["crop_coords_top_left"].tolist() == [0, 0]
    # a shuffled loader's batches mix both kinds; the flags collate to a bool tensor
    gen = torch.Generator().manual_seed(0)
    batch = next(iter(DataLoader(ds, batch_size=10, shuffle=True, generator=gen)))
    assert batch["prior"].dtype == torch.bool and int(batch["prior"].sum()) == 5
    # repeats multiply the epoch; items repeat in the same order
    twice = DreamBoothDataset(
        instance=PURPLE, class_dir=tmp_path, num_class_images=5, class_prompt="a shape", repeats=2
    )
    assert len(twice) == 20 and twice[13]["caption"] == ds[3]["caption"]
    assert [twice[k]["prior"] for k in range(20)] == [k % 2 == 1 for k in range(20)]


def test_without_prior_preservation_only_instance_items(tmp_path: Path) -> None:
    ds = DreamBoothDataset(instance=PURPLE, repeats=3)
    assert not ds.prior_preservation and len(ds) == 9 and ds.missing_class_images() == []
    assert all(ds[k]["prior"] is False for k in range(9))
    off = DreamBoothDataset(instance=PURPLE, class_dir=tmp_path, prior_preservation=False)
    assert len(off) == 3 and off.cache is None


def test_folder_instances_take_instance_prompt_and_are_center_cropped(tmp_path: Path) -> None:
    folder = tmp_path / "dog"
    folder.mkdir()
    rng = np.random.default_rng(0)
    pictures = [
        Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)) for _ in range(2)
    ]
    for i, p in enumerate(pictures):
        p.save(folder / f"dog{i}.png")
    write_class_images(tmp_path / "class", ["a photo of a dog"] * 3, size=32)  # resized to 16
    ds = DreamBoothDataset(
        instance_dir=folder,
        instance_prompt="a photo of sks dog",
        size=16,
        class_dir=tmp_path / "class",
        num_class_images=3,
        class_prompt="a photo of a dog",
    )
    assert len(ds) == 6 and ds.item_size == (16, 16)
    expected = ImageTransform(16, crop="center").apply(pictures[1])
    item = ds[2]
    assert item["caption"] == "a photo of sks dog" and item["prior"] is False
    np.testing.assert_array_equal(item["image"], expected.image)
    assert item["original_size_as_tuple"].tolist() == [30, 40]
    assert item["crop_coords_top_left"].tolist() == list(expected.micro.crop_coords_top_left)
    cls = ds[1]
    assert cls["image"].shape == (16, 16, 3) and cls["caption"] == "a photo of a dog"
    assert cls["original_size_as_tuple"].tolist() == [32, 32]  # made at 32, used at 16


def test_class_prompts_cycle_a_data_sets_captions(tmp_path: Path) -> None:
    ds = DreamBoothDataset(
        instance=PURPLE, class_dir=tmp_path, num_class_images=7, class_prompts=TRAIN_CAPTIONS
    )
    train = CaptionedShapes(length=3, size=16)
    assert [ds.class_prompt_of(i) for i in range(7)] == [train.caption(i % 3) for i in range(7)]
    assert not any("purple" in p for p in ds.class_prompts)
    assert ds.missing_class_images() == list(range(7))
    with pytest.raises(FileNotFoundError) as err:
        ds[1]
    message = str(err.value)
    assert str(tmp_path) in message and "DreamBoothClassImages" in message and "7 of 7" in message
    assert ds[0]["prior"] is False  # instance items do not need the class images


def test_a_folder_made_for_other_prompts_is_refused_or_regenerated(tmp_path: Path) -> None:
    write_class_images(tmp_path, ["a photo of a cat"] * 4)
    with pytest.raises(ClassImageMismatch) as err:
        DreamBoothDataset(
            instance=PURPLE, class_dir=tmp_path, num_class_images=4, class_prompt="a dog"
        )
    message = str(err.value)
    assert "'a photo of a cat'" in message and "'a dog'" in message and str(tmp_path) in message
    assert "Delete the folder" in message and "regenerate: true" in message
    ds = DreamBoothDataset(
        instance=PURPLE,
        class_dir=tmp_path,
        num_class_images=4,
        class_prompt="a dog",
        regenerate=True,
    )
    assert ds.missing_class_images() == [0, 1, 2, 3]  # all made again, none reused
    # more images for the same prompts extend the folder; fewer use its first ones
    more = DreamBoothDataset(
        instance=PURPLE, class_dir=tmp_path, num_class_images=6, class_prompt="a photo of a cat"
    )
    assert more.missing_class_images() == [4, 5]


def test_images_without_a_manifest_are_refused(tmp_path: Path) -> None:
    Image.new("RGB", (16, 16)).save(tmp_path / "00000.png")
    with pytest.raises(ClassImageMismatch, match="no manifest.json"):
        DreamBoothDataset(instance=PURPLE, class_dir=tmp_path, num_class_images=2, class_prompt="x")


def test_config_mistakes_are_explained(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="exactly one of instance"):
        DreamBoothDataset(instance=PURPLE, instance_dir=tmp_path)
    with pytest.raises(ConfigError, match="class_prompt"):
        DreamBoothDataset(instance=PURPLE, class_dir=tmp_path)
    with pytest.raises(ConfigError, match="needs class_dir"):
        DreamBoothDataset(instance=PURPLE, prior_preservation=True, class_prompt="x")
    with pytest.raises(ConfigError, match="repeats"):
        DreamBoothDataset(instance=PURPLE, repeats=0)
