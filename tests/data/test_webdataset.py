"""WebDataset shards: written by the test, read back, split over workers and ranks, bad samples."""

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image
from torch.utils.data import DataLoader

from ldm.data.micro_conditioning import MICRO_CONDITIONING_KEYS
from ldm.data.webdataset import WebDatasetShards, folder_to_shards, image_bytes, write_shards

N = 12


def _value(i):
    return 20 * i  # grey level of image i, recovered from the item to check the pairing


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """An image folder with sidecar captions packed into 4 shards of 3 samples."""
    root = tmp_path_factory.mktemp("folder")
    for i in range(N):
        Image.new("RGB", (12, 10), (_value(i),) * 3).save(root / f"img{i:02d}.png")
        (root / f"img{i:02d}.txt").write_text(f"caption {i}")
    out = tmp_path_factory.mktemp("shards")
    paths = folder_to_shards(root, out, samples_per_shard=3)
    assert len(paths) == 4
    return out, paths


def _ids(items):
    ids = []
    for item in items:
        i = int(item["caption"].split()[1])
        grey = (item["image"][0, 0, 0] + 1) * 127.5
        assert abs(grey - _value(i)) < 1.0, "image and caption of a sample got mixed up"
        ids.append(i)
    return ids


def test_round_trip_from_brace_pattern(shards):
    out, _ = shards
    ds = WebDatasetShards(str(out / "shard-{000000..000003}.tar"), size=8, shuffle_shards=False)
    items = list(ds)
    assert sorted(_ids(items)) == list(range(N))
    assert items[0]["image"].shape == (8, 8, 3) and items[0]["image"].dtype == np.float32
    sd = WebDatasetShards(str(out), size=8, image_key="jpg", caption_key="txt")
    assert set(next(iter(sd))) == {"jpg", "txt", *MICRO_CONDITIONING_KEYS}


def test_two_workers_no_overlap(shards):
    out, _ = shards
    ds = WebDatasetShards(str(out), size=8, seed=3)
    loader = DataLoader(ds, batch_size=None, num_workers=2)
    ids = _ids(loader)
    assert sorted(ids) == list(range(N))  # each sample exactly once per epoch


def test_two_ranks_times_workers_no_overlap(shards):
    out, _ = shards
    per_rank = []
    for rank in range(2):
        ds = WebDatasetShards(str(out), size=8, rank=rank, world_size=2, seed=5)
        per_rank.append(_ids(DataLoader(ds, batch_size=None, num_workers=2)))
    assert len(per_rank[0]) == len(per_rank[1]) == N // 2
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == list(range(N))


def test_fewer_shards_than_readers_splits_by_sample(shards, monkeypatch):
    _, paths = shards
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")  # env is used when torch.distributed is not initialised
    ids0 = _ids(WebDatasetShards(paths[0], size=8))
    ids = [_ids(WebDatasetShards(paths[0], size=8, rank=r, world_size=3)) for r in range(3)]
    assert ids0 == ids[0] and sorted(sum(ids, [])) == [0, 1, 2] and all(len(x) == 1 for x in ids)


def test_shard_order_changes_with_epoch_and_shuffle_buffer(shards):
    out, _ = shards
    ds = WebDatasetShards(str(out), size=8, seed=1, shuffle_buffer=5)
    first = _ids(ds)
    second = _ids(ds)  # the next pass in the same process is the next epoch
    assert sorted(first) == sorted(second) == list(range(N)) and first != second
    ds.set_epoch(0)
    assert _ids(ds) == first  # reproducible from (seed, epoch)
    assert _ids(WebDatasetShards(str(out), size=8, seed=1, shuffle_buffer=5)) == first
    ds.set_epoch(1)
    assert _ids(ds) == second


def test_persistent_workers_see_new_epochs_without_overlap(shards):
    out, _ = shards
    ds = WebDatasetShards(str(out), size=8, seed=2)
    loader = DataLoader(ds, batch_size=None, num_workers=2, persistent_workers=True)
    epochs = [_ids(loader) for _ in range(3)]
    assert all(sorted(e) == list(range(N)) for e in epochs)
    assert len({tuple(e) for e in epochs}) > 1


def test_resampled_stream_with_epoch_length(shards):
    out, _ = shards
    ds = WebDatasetShards(str(out), size=8, resampled=True, samples_per_epoch=30)
    assert len(ds) == 30
    ids = _ids(DataLoader(ds, batch_size=None, num_workers=2))
    assert len(ids) == 30 and set(ids) <= set(range(N))


def test_bad_samples_skipped_and_counted(tmp_path):
    good = image_bytes(np.full((6, 6, 3), 40, np.uint8))
    samples = [
        {"__key__": "a", "png": good, "txt": "caption 2"},
        {"__key__": "b", "jpg": b"not a jpeg", "txt": "broken"},
        {"__key__": "c", "txt": "no image"},
        {"__key__": "d", "png": good, "json": {"caption": "caption 2", "w": 6}},
        {"__key__": "e", "png": b"", "txt": "empty"},
    ]
    write_shards(samples, tmp_path, samples_per_shard=10)
    ds = WebDatasetShards(str(tmp_path), size=4)
    assert _ids(ds) == [2, 2]
    assert ds.skipped.count == 3


def test_truncated_shard_does_not_stop_the_stream(shards, tmp_path):
    _, paths = shards
    data = open(paths[1], "rb").read()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) // 2])
    ds = WebDatasetShards([str(cut), paths[2]], size=8, shuffle_shards=False)
    ids = _ids(ds)
    # complete samples before the cut and the next shard are read; the cut sample is dropped
    assert set(range(6, 9)) <= set(ids) and 3 in ids and len(ids) < 6


def test_written_shards_are_plain_webdataset_tars(shards):
    _, paths = shards
    with tarfile.open(paths[0]) as tar:
        names = tar.getnames()
        meta = json.load(tar.extractfile("000000000.json"))
    assert sorted(names[:3]) == ["000000000.json", "000000000.png", "000000000.txt"]
    assert meta == {"file_name": "img00.png", "caption": "caption 0"}
    assert Image.open(io.BytesIO(image_bytes(np.zeros((2, 2, 3), np.uint8)))).size == (2, 2)


def test_missing_shards_are_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no WebDataset shards"):
        WebDatasetShards(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="do not exist"):
        WebDatasetShards(str(tmp_path / "x-{0..3}.tar"))


def test_length_only_with_samples_per_epoch(shards):
    from collections.abc import Sized

    out, _ = shards
    assert not isinstance(WebDatasetShards(str(out)), Sized)
    sized = WebDatasetShards(str(out), size=8, samples_per_epoch=5, shuffle_shards=False)
    assert isinstance(sized, Sized) and isinstance(sized, WebDatasetShards) and len(sized) == 5
    assert len(_ids(sized)) == 5


def _ddp_worker(rank, world, init_file, shard_dir, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        ds = WebDatasetShards(shard_dir, size=8, seed=9)  # rank/world from torch.distributed
        for ctx in ("spawn", "fork"):  # DataLoader workers started both ways
            loader = DataLoader(ds, batch_size=None, num_workers=2, multiprocessing_context=ctx)
            (out_dir / f"rank{rank}-{ctx}.json").write_text(json.dumps(_ids(loader)))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_real_process_group_two_ranks_no_overlap(shards, tmp_path):
    import torch.multiprocessing as mp

    out, _ = shards
    mp.spawn(_ddp_worker, args=(2, tmp_path / "init", str(out), tmp_path), nprocs=2, join=True)
    for ctx in ("spawn", "fork"):
        ids = [json.loads((tmp_path / f"rank{r}-{ctx}.json").read_text()) for r in range(2)]
        assert len(ids[0]) == len(ids[1]) == N // 2 and sorted(ids[0] + ids[1]) == list(range(N))


def test_stream_of_only_bad_samples_fails_clearly(tmp_path, monkeypatch):
    import ldm.data.webdataset as W

    monkeypatch.setattr(W, "MAX_CONSECUTIVE_FAILURES", 5)
    write_shards(({"__key__": f"{i}", "png": b"bad", "txt": "x"} for i in range(8)), tmp_path)
    with pytest.raises(RuntimeError, match="5 consecutive"):
        list(WebDatasetShards(str(tmp_path), size=4))
    (tmp_path / "empty.tar").write_bytes(b"")
    with pytest.raises(RuntimeError, match="gave no samples"):
        next(iter(WebDatasetShards(str(tmp_path / "empty.tar"), resampled=True)))
