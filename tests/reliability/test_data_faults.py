"""Data faults: a WebDataset shard cut off mid-member, a member with a corrupt image, a shard that
cannot be opened -> skipped and counted, the stream (and training) goes on; a metadata file with
a bad line -> an error naming FILE:LINE."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from torch.utils.data import DataLoader

from ldm.data.folder import ImageFolderDataset
from ldm.data.webdataset import WebDatasetShards, write_shards

N_PER_SHARD = 4
FAST = settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
    derandomize=True,
)


def _png(i: int) -> bytes:
    rng = np.random.default_rng(i)  # noise: the image does not compress to a few bytes
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def shard_bytes(tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    """Three shards of four samples (captions c0 .. c11)."""
    out = tmp_path_factory.mktemp("shards")
    samples = [{"__key__": f"{i:04d}", "png": _png(i), "txt": f"c{i}"} for i in range(12)]
    return [Path(p).read_bytes() for p in write_shards(samples, out, N_PER_SHARD)]


def _captions(ds: WebDatasetShards) -> list[str]:
    return [item["caption"] for item in DataLoader(ds, batch_size=None, num_workers=0)]


def _cut_case(shard_bytes: list[bytes], tmp_path: Path, cut: int, figures) -> None:  # noqa: ANN001
    """Shard 1 cut at ``cut`` bytes: shards 0 and 2 whole; of shard 1 only whole samples with
    their own caption; the cut counted once."""
    paths = []
    for i, data in enumerate(shard_bytes):
        p = tmp_path / f"s{i}.tar"
        p.write_bytes(data[:cut] if i == 1 else data)
        paths.append(str(p))
    ds = WebDatasetShards(paths, size=8, shuffle_shards=False)
    caps = _captions(ds)
    figures["webdataset cut shard: cases"] += 1
    assert caps[:4] == [f"c{i}" for i in range(4)] and caps[-4:] == [f"c{i}" for i in range(8, 12)]
    middle = caps[4:-4]
    assert middle == [f"c{i}" for i in range(4, 4 + len(middle))]  # no sample without its caption
    tail = shard_bytes[1][cut - 1024 : cut] if cut >= 1024 and cut % 512 == 0 else b"x"
    whole = cut >= len(shard_bytes[1]) or tail.strip(b"\0") == b""  # the end blocks are there
    assert ds.skipped.count == (0 if whole else 1), ds.skipped.summary()
    figures[
        "webdataset cut shard: skipped and counted" if not whole else "webdataset cut shard: whole"
    ] += 1


def test_shard_cut_off_mid_member(shard_bytes, tmp_path, figures) -> None:
    size = len(shard_bytes[1])

    @FAST
    @given(st.integers(0, size))
    def case(cut: int) -> None:
        _cut_case(shard_bytes, tmp_path, cut, figures)

    case()


@pytest.mark.slow
def test_shard_cut_at_every_block(shard_bytes, tmp_path, figures) -> None:
    for cut in range(0, len(shard_bytes[1]) + 1, 64):
        _cut_case(shard_bytes, tmp_path, cut, figures)


def test_corrupt_member_and_unopenable_shards_are_skipped(shard_bytes, tmp_path, caplog) -> None:
    good = []
    for i, data in enumerate(shard_bytes):
        p = tmp_path / f"s{i}.tar"
        p.write_bytes(data)
        good.append(str(p))
    bad_image = [{"__key__": "x1", "png": _png(1)[:40], "txt": "cut image"},
                 {"__key__": "x2", "jpg": b"<html>not found</html>", "txt": "html"}]  # fmt: skip
    (corrupt,) = write_shards(bad_image, tmp_path / "corrupt", 10)
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"\x89PNG not a tar" * 100)
    vanished = tmp_path / "vanished.tar"
    vanished.write_bytes(shard_bytes[0])
    ds = WebDatasetShards([good[0], corrupt, str(garbage), str(vanished), good[2]], size=8,
                          shuffle_shards=False)  # fmt: skip
    vanished.unlink()  # listed when the data set was made, gone when it is read
    with caplog.at_level(logging.WARNING):
        caps = _captions(ds)
    assert caps == [f"c{i}" for i in (0, 1, 2, 3, 8, 9, 10, 11)]
    assert ds.skipped.count == 4  # 2 bad images, 1 shard that is no tar, 1 that vanished
    summary = ds.skipped.summary()
    assert "garbage.tar" in summary and "skipping unreadable input" in caplog.text


def test_training_goes_on_over_bad_shards(shard_bytes, tmp_path) -> None:
    """Two DataLoader workers, a cut shard and a garbage one: every good sample arrives once."""
    paths = []
    for i, data in enumerate(shard_bytes):
        p = tmp_path / f"s{i}.tar"
        p.write_bytes(data[: len(data) // 2] if i == 1 else data)
        paths.append(str(p))
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"junk" * 300)
    ds = WebDatasetShards([*paths, str(garbage)], size=8, shuffle_shards=False)
    loader = DataLoader(ds, batch_size=None, num_workers=2)
    caps = sorted(item["caption"] for item in loader)
    assert {f"c{i}" for i in (0, 1, 2, 3, 8, 9, 10, 11)} <= set(caps)
    assert len(caps) == len(set(caps))


def _folder(tmp_path: Path, name: str, text: bytes) -> Path:
    for n in ("a", "b"):
        Image.new("RGB", (8, 8), "red").save(tmp_path / f"{n}.png")
    (tmp_path / name).write_bytes(text)
    return tmp_path


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("metadata.csv", b"file_name,text\na.png,red\nb.png,blue,extra\n", r"metadata.csv:3: 3 fields"),
        ("metadata.csv", b"file_name,text\na.png\nb.png,blue\n", r"metadata.csv:2: 1 fields.*missing text"),
        ("metadata.csv", b'file_name,text\na.png,"red\nb.png,blue\n', r"metadata.csv:\d+: not valid CSV"),
        ("metadata.csv", b"file_name,text\na.png,caf\xe9\n", r"metadata.csv:2: not UTF-8"),
        ("metadata.csv", b"name,text\na.png,red\n", r"metadata.csv:2: no 'file_name' column"),
        ("metadata.jsonl", b'{"file_name": "a.png", "text": "x"}\n{"file_name": "b.png"\n', r"metadata.jsonl:2: not a JSON object"),
        ("metadata.jsonl", b'{"file_name": "a.png", "text": "x"}\n\n[1, 2]\n', r"metadata.jsonl:3: expected a JSON object"),
        ("metadata.jsonl", b'{"file_name": "a.png"}\n', r"metadata.jsonl:1: no caption column"),
    ],
)  # fmt: skip
def test_metadata_bad_line_is_named(name, text, expected, tmp_path, figures) -> None:
    root = _folder(tmp_path, name, text)
    with pytest.raises(ValueError, match=expected):
        ImageFolderDataset(root, size=8, caption_source="metadata")
    figures["metadata files with a bad line: FILE:LINE named"] += 1
