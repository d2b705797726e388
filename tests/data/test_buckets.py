"""Aspect-ratio buckets: the bucket set, assignment, single-bucket batches over workers and ranks,
resume, and the data module choosing the bucket sampler."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
from PIL import Image
from torch.utils.data import DataLoader

from ldm.data.bucket_sampler import BucketBatchSampler
from ldm.data.buckets import BucketSpec, assign_bucket, make_buckets, nearest_bucket
from ldm.data.datamodule import DataModuleFromConfig
from ldm.data.folder import ImageFolderDataset

# 7 aspect ratios (h, w), 200 images
SHAPES = [(64, 64), (48, 80), (80, 48), (40, 96), (96, 40), (56, 72), (72, 56)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(0)
    for n in range(200):
        h, w = SHAPES[n % len(SHAPES)]
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / f"{n:03d}.png")
    return root


def test_sd_buckets_at_512():
    buckets = make_buckets(512, 64)
    assert (512, 512) in buckets and len(buckets) == 17
    for h, w in buckets:
        assert h % 64 == 0 and w % 64 == 0 and h * w <= 512 * 512
        assert 256 <= min(h, w) and max(h, w) <= 1024 and (w, h) in buckets
    # sd-scripts' list for max_reso 512, min 256, max 1024, step 64 (widths 256..1024)
    expected = {(1024, 256), (896, 256), (960, 256), (832, 256), (768, 320), (704, 320)}
    expected |= {(640, 384), (576, 448), (512, 512)}
    assert expected <= set(buckets)
    assert buckets == sorted(buckets, key=lambda b: b[1] / b[0])
    with pytest.raises(ValueError, match="smaller than the step"):
        make_buckets(32, 64)


def test_assignment_by_aspect_and_no_upscale():
    buckets = make_buckets(512, 64)
    assert nearest_bucket((1000, 1500), buckets) == (384, 640)  # 1.5 -> 1.67 (nearest in log)
    assert nearest_bucket((3000, 3000), buckets) == (512, 512)
    assert assign_bucket((1000, 1500), buckets, 64) == (384, 640)
    # smaller than its bucket: kept at its own size, rounded down to the step
    assert assign_bucket((300, 450), buckets, 64) == (256, 448)
    assert assign_bucket((300, 450), buckets, 64, upscale=True) == (384, 640)
    spec = BucketSpec.from_config({"resolution": 64, "step": 8})
    assert spec.assign([(48, 80)]) == [(48, 80)]
    with pytest.raises(ValueError, match="unknown keys"):
        BucketSpec.from_config({"resolutoin": 64})


def _epoch_items(ds, batch_size, epoch, world=2, workers=2, skip=0):
    """Per rank: the list of batches (file names) over a 2-worker DataLoader."""
    out = []
    for rank in range(world):
        sampler = BucketBatchSampler(
            ds.item_buckets, batch_size, seed=3, rank=rank, world_size=world, epoch=epoch, skip=skip
        )
        loader = DataLoader(ds, batch_sampler=sampler, num_workers=workers)
        out.append(list(loader))
    return out


def test_batches_are_single_bucket_and_every_image_once_across_workers_and_ranks(folder):
    ds = ImageFolderDataset(folder, size=64, buckets={"step": 8}, return_path=True)
    assert len(set(ds.item_buckets)) == 7 and len(ds) == 200
    ranks = _epoch_items(ds, batch_size=8, epoch=0)
    assert len(ranks[0]) == len(ranks[1])  # equal batch counts keep DDP in step
    seen = Counter()
    for batches in ranks:
        for batch in batches:
            h, w = batch["image"].shape[1:3]
            assert batch["target_size_as_tuple"].tolist() == [[h, w]] * len(batch["image"])
            for path, original, crop in zip(
                batch["file_path_"], batch["original_size_as_tuple"], batch["crop_coords_top_left"]
            ):
                seen[path] += 1
                n = int(path[-7:-4])
                assert tuple(original.tolist()) == SHAPES[n % 7]  # the file's own size
                assert ds.item_buckets[n] == (h, w)
                oh, ow = SHAPES[n % 7]
                scale = max(h / oh, w / ow)  # resized to cover the bucket, centre crop
                assert tuple(crop.tolist()) == (
                    (round(oh * scale) - h) // 2,
                    (round(ow * scale) - w) // 2,
                )
    assert len(seen) == 200 and set(seen.values()) == {1}
    # a new epoch: a new order, still each image once
    again = _epoch_items(ds, batch_size=8, epoch=1)
    order0 = [p for b in ranks[0] for p in b["file_path_"]]
    order1 = [p for b in again[0] for p in b["file_path_"]]
    assert order0 != order1
    assert sorted(p for r in again for b in r for p in b["file_path_"]) == sorted(seen)


def test_resume_continues_the_permutation(folder):
    ds = ImageFolderDataset(folder, size=64, buckets={"step": 8})
    full = BucketBatchSampler(ds.item_buckets, 8, seed=3, rank=1, world_size=2, epoch=4)
    resumed = BucketBatchSampler(ds.item_buckets, 8, seed=3, rank=1, world_size=2, epoch=4, skip=5)
    assert list(resumed) == list(full)[5:]
    assert list(resumed) == list(full)  # the skip applies once
    resumed.sampler.set_epoch(5)  # what Lightning calls at the next epoch start
    assert resumed.epoch == 5 and list(resumed) != list(full)


def test_uneven_batches_are_halved_not_repeated():
    buckets = ["a"] * 5 + ["b"] * 3  # batches [4, 1] and [3]: 3 batches for 2 ranks
    ranks = [list(BucketBatchSampler(buckets, 4, rank=r, world_size=2)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 2
    items = sorted(i for r in ranks for b in r for i in b)
    assert items == list(range(8))
    for r in ranks:
        for b in r:
            assert len({buckets[i] for i in b}) == 1


def test_datamodule_uses_the_bucket_sampler_and_resumes(folder, monkeypatch):
    root = str(folder)
    dm = DataModuleFromConfig(
        batch_size=8,
        num_workers=0,
        train={
            "target": "ldm.data.folder.ImageFolderDataset",
            "params": {"root": root, "size": 64, "buckets": {"step": 8}},
        },
        seed=3,
    )
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert isinstance(loader.batch_sampler, BucketBatchSampler)
    shapes = [tuple(b["image"].shape[1:3]) for b in loader]
    assert sum(len(b["image"]) for b in loader) == 200
    assert len(set(shapes)) == 7
    monkeypatch.setattr(dm, "_position", lambda: (0, 3))
    resumed = [tuple(b["image"].shape[1:3]) for b in dm.train_dataloader()]
    assert resumed == shapes[3:]
    assert math.ceil(200 / 8) <= len(loader) <= 200 // 8 + 7


def test_webdataset_shards_yield_single_bucket_batches(folder, tmp_path):
    from ldm.data.webdataset import WebDatasetShards, folder_to_shards

    shards = folder_to_shards(folder, tmp_path / "shards", samples_per_shard=50)
    dm = DataModuleFromConfig(
        batch_size=8,
        num_workers=2,
        train={
            "target": "ldm.data.webdataset.WebDatasetShards",
            "params": {"urls": str(tmp_path / "shards"), "size": 64, "buckets": {"step": 8}},
        },
    )
    dm.setup("fit")
    assert len(shards) == 4 and isinstance(dm.datasets["train"], WebDatasetShards)
    total, shapes = 0, Counter()
    for batch in dm.train_dataloader():
        h, w = batch["image"].shape[1:3]
        assert batch["target_size_as_tuple"].tolist() == [[h, w]] * len(batch["image"])
        shapes[(h, w)] += len(batch["image"])
        total += len(batch["image"])
    assert total == 200 and len(shapes) == 7 and set(shapes.values()) <= {28, 29}


def test_caption_options_change_per_epoch_and_match_across_workers(tmp_path):
    for n in range(12):
        Image.new("RGB", (40, 24), (n, 0, 0)).save(tmp_path / f"{n}.png")
        (tmp_path / f"{n}.txt").write_text(f"tag{n}, red, square, small")
    cfg = {"shuffle_tags": True, "keep_tokens": 1, "prefix": "photo, "}

    def captions(workers, epoch):
        dm = DataModuleFromConfig(
            batch_size=4,
            num_workers=workers,
            seed=1,
            train={
                "target": "ldm.data.folder.ImageFolderDataset",
                "params": {"root": str(tmp_path), "size": 32, "captions": cfg, "seed": 1},
            },
        )
        dm.setup("fit")
        loader = dm.train_dataloader()
        loader.batch_sampler.sampler.set_epoch(epoch)
        return sorted(c for b in loader for c in b["caption"])

    first = captions(0, 0)
    assert all(c.startswith("photo, tag") for c in first)  # prefix, then the kept first tag
    assert captions(2, 0) == first and captions(0, 1) != first
