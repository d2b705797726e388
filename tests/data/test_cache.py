"""Encoding cache: identical values, the encoder runs once per item, disk reuse, invalidation."""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from ldm.data.cache import CachedEncodings, EncodingCache, WithIndex, fingerprint
from ldm.data.folder import ImageFolderDataset
from ldm.data.micro_conditioning import MICRO_CONDITIONING_KEYS
from ldm.data.shapes import CaptionedShapes


class CountingEncoder:
    """A deterministic 'encoder' (fixed random conv) that records every row it encodes."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 4, 4, stride=4)
        with torch.no_grad():
            for p in self.conv.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
        self.calls, self.rows = 0, 0

    def __call__(self, images) -> torch.Tensor:
        x = torch.as_tensor(np.asarray(images)).permute(
            0, 3, 1, 2
        )  # B x H x W x C -> B x C x H x W
        self.calls += 1
        self.rows += x.shape[0]
        return self.conv(x)


def test_wrapper_identical_values_and_one_call_per_item():
    ds = CaptionedShapes(length=10, size=16)
    enc = CountingEncoder()
    cached = CachedEncodings(ds, enc, key="image", out_key="latent")
    direct = enc(np.stack([ds[i]["image"] for i in range(10)]))
    enc.calls = enc.rows = 0
    for _epoch in range(3):
        batches = list(DataLoader(cached, batch_size=4, num_workers=0))
    assert enc.rows == 10 and enc.calls == 10  # first epoch only, one row per item
    got = torch.cat([b["latent"] for b in batches])
    assert got.shape == (10, 4, 4, 4)
    torch.testing.assert_close(got, direct, rtol=0, atol=0)
    assert batches[0]["caption"][0] == ds.caption(0) and "image" in batches[0]


def test_precompute_batches_then_no_calls_and_drop_input():
    ds = CaptionedShapes(length=10, size=16)
    enc = CountingEncoder()
    cached = CachedEncodings(ds, enc, key="image", drop_input=True)
    assert cached.precompute(batch_size=4) == 10
    assert (enc.calls, enc.rows) == (3, 10)
    assert cached.precompute(batch_size=4) == 0 and enc.calls == 3
    item = cached[7]
    assert set(item) == {"caption", "image_encoded", *MICRO_CONDITIONING_KEYS} and enc.calls == 3


def test_disk_cache_reused_across_instances_and_invalidated_by_fingerprint(tmp_path):
    ds = CaptionedShapes(length=6, size=16)
    enc = CountingEncoder()
    fp = fingerprint({"target": "enc", "params": {"ch": 4}}, torch.nn.Linear(2, 2))
    first = CachedEncodings(ds, enc, "image", cache_dir=tmp_path, fingerprint=fp, name="latents")
    first.precompute(batch_size=6)
    assert len(list((tmp_path / f"latents-{fp}").glob("*.safetensors"))) == 6
    enc2 = CountingEncoder()
    again = CachedEncodings(ds, enc2, "image", cache_dir=tmp_path, fingerprint=fp, name="latents")
    torch.testing.assert_close(again[5]["image_encoded"], first[5]["image_encoded"], rtol=0, atol=0)
    assert enc2.calls == 0
    other = CachedEncodings(ds, enc2, "image", cache_dir=tmp_path, fingerprint="changed")
    other[5]
    assert enc2.calls == 1


def test_batch_api_encodes_only_missing_rows_for_text():
    seen = []

    def text_encoder(captions):
        seen.append(list(captions))
        return torch.stack([torch.full((2, 3), float(len(c))) for c in captions])

    cache = EncodingCache("txt")
    ds = WithIndex(CaptionedShapes(length=8), index_key="index")
    batch = next(iter(DataLoader(ds, batch_size=4)))
    out1 = cache.encode(batch["index"], batch["caption"], text_encoder)
    out2 = cache.encode(torch.tensor([2, 3, 4]), ["x", "y", ds[4]["caption"]], text_encoder)
    assert seen == [batch["caption"], [ds[4]["caption"]]]  # rows 2, 3 came from the cache
    torch.testing.assert_close(out2[:2], out1[2:])
    assert out1.shape == (4, 2, 3) and (cache.hits, cache.misses) == (2, 5)


def test_fingerprint_tracks_config_and_weights():
    m = torch.nn.Linear(3, 3)
    base = fingerprint({"a": 1, "b": [1, 2]}, m)
    assert base == fingerprint({"b": [1, 2], "a": 1}, m)
    assert base != fingerprint({"a": 2, "b": [1, 2]}, m)
    with torch.no_grad():
        m.weight[0, 0] += 1e-3
    assert base != fingerprint({"a": 1, "b": [1, 2]}, m)


def test_refuses_random_augmentation_and_bad_encoder_output(tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "a.png")
    rand = ImageFolderDataset(tmp_path, size=8, flip=True)
    with pytest.raises(ValueError, match="freeze one augmentation"):
        CachedEncodings(rand, CountingEncoder(), key="image")
    CachedEncodings(rand, CountingEncoder(), key="image", allow_random_transforms=True)
    bad = CachedEncodings(CaptionedShapes(length=2), lambda x: [1.0], key="image")
    with pytest.raises(TypeError, match="one row per"):
        bad[0]
    with pytest.raises(KeyError, match="no key 'latent'"):
        CachedEncodings(CaptionedShapes(length=2), CountingEncoder(), key="latent")[0]
