"""SDXL micro-conditioning: original size, crop offsets in the resized grid, target size."""

import random

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from ldm.data.cache import CachedEncodings
from ldm.data.folder import ImageFolderDataset
from ldm.data.micro_conditioning import MICRO_CONDITIONING_KEYS, MicroConditioning
from ldm.data.photos import PhotoCrops
from ldm.data.shapes import CaptionedShapes
from ldm.data.transforms import ImageTransform, to_float_array
from ldm.data.webdataset import WebDatasetShards, image_bytes, write_shards

W, H, SIZE = 300, 200, 128
RESIZED = (round(W * SIZE / H), SIZE)  # (w, h) = (192, 128): short side resized to 128


def _noise(w: int = W, h: int = H, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _resized(img: Image.Image) -> Image.Image:
    return img.resize(RESIZED, resample=Image.Resampling.BICUBIC)


def _check_item(item: dict, original, crop, target) -> None:
    for key, want in zip(MICRO_CONDITIONING_KEYS, (original, crop, target)):
        assert item[key].dtype == torch.long and item[key].shape == (2,), key
        assert tuple(item[key].tolist()) == tuple(want), key


def test_center_crop_by_hand():
    img = _noise()
    out = ImageTransform(SIZE, crop="center").apply(img)
    assert RESIZED == (192, 128)
    assert out.micro.original_size == (200, 300)  # (height, width) before resize
    assert out.micro.crop_coords_top_left == (0, (192 - 128) // 2)
    assert out.micro.target_size == (128, 128)
    expected = to_float_array(_resized(img).crop((32, 0, 32 + SIZE, SIZE)))
    np.testing.assert_array_equal(out.image, expected)
    np.testing.assert_array_equal(ImageTransform(SIZE)(img), out.image)  # __call__: the array


def test_random_crop_offsets_match_the_pixels_cut_out():
    img = _noise()
    tall = _noise(H, W, seed=1)  # 200 x 300 (w x h): the crop moves vertically
    t = ImageTransform(SIZE, crop="random")
    for source, resized_size in ((img, RESIZED), (tall, RESIZED[::-1])):
        resized = source.resize(resized_size, resample=Image.Resampling.BICUBIC)
        seen = set()
        for seed in range(8):
            out = t.apply(source, random.Random(seed))
            top, left = out.micro.crop_coords_top_left
            seen.add((top, left))
            cut = to_float_array(resized.crop((left, top, left + SIZE, top + SIZE)))
            np.testing.assert_array_equal(out.image, cut)
            assert out.micro.original_size == (source.height, source.width)
            assert out.micro.target_size == (SIZE, SIZE)
        assert len(seen) > 1  # the offsets are the random ones, not a constant
    # The same draws as before this change: __call__ and apply agree for the same seed.
    np.testing.assert_array_equal(t(img, random.Random(3)), t.apply(img, random.Random(3)).image)


def test_flip_mirrors_the_left_offset():
    img = _noise()
    plain = ImageTransform(SIZE, crop="random")
    flipped = ImageTransform(SIZE, crop="random", flip=1.0)
    for seed in range(5):
        a, b = plain.apply(img, random.Random(seed)), flipped.apply(img, random.Random(seed))
        top, left = a.micro.crop_coords_top_left
        assert b.micro.crop_coords_top_left == (top, RESIZED[0] - left - SIZE)
        np.testing.assert_array_equal(b.image, a.image[:, ::-1])
        # = the crop at the reported offsets of the flipped resized image (diffusers' order)
        mirror = _resized(img).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        top_f, left_f = b.micro.crop_coords_top_left
        cut = to_float_array(mirror.crop((left_f, top_f, left_f + SIZE, top_f + SIZE)))
        np.testing.assert_array_equal(b.image, cut)


def test_no_crop_and_no_resize():
    img = _noise()
    out = ImageTransform(SIZE, crop="none").apply(img)
    assert out.image.shape == (128, 192, 3)
    assert out.micro == MicroConditioning((200, 300), (0, 0), (128, 192))
    assert ImageTransform(None, flip=1.0).apply(img).micro == MicroConditioning.uncropped(200, 300)


def test_micro_conditioning_rejects_bad_values():
    with pytest.raises(ValueError, match="crop_coords_top_left"):
        MicroConditioning((2, 2), (-1, 0), (2, 2))


def test_image_folder_items_and_batch(tmp_path):
    for n in range(3):
        _noise(seed=n).save(tmp_path / f"{n}.png")
    ds = ImageFolderDataset(tmp_path, size=SIZE, buckets=False)
    _check_item(ds[0], (200, 300), (0, 32), (128, 128))
    assert ds[0]["image"].shape == (128, 128, 3)
    batch = next(iter(DataLoader(ds, batch_size=3)))
    for key in MICRO_CONDITIONING_KEYS:
        assert batch[key].dtype == torch.long and batch[key].shape == (3, 2)
    assert batch["original_size_as_tuple"].tolist() == [[200, 300]] * 3


def test_image_folder_bucket_items_record_the_bucket_crop(tmp_path):
    _noise(seed=0).save(tmp_path / "0.png")  # 300 x 200 (w x h): aspect 1.5
    ds = ImageFolderDataset(tmp_path, size=SIZE)  # buckets of area <= 128**2 in steps of 32
    # nearest bucket 96 x 160 (aspect 1.67); resized to cover it: 160 x 107 (w x h); centre crop
    # top (107 - 96) // 2 = 5, left 0
    _check_item(ds[0], (200, 300), (5, 0), (96, 160))
    assert ds[0]["image"].shape == (96, 160, 3)
    flipped = ImageFolderDataset(tmp_path, size=SIZE, flip=1.0, crop="random")
    top, left = flipped[0]["crop_coords_top_left"].tolist()
    assert left == 0 and 0 <= top <= 11  # width fits exactly (flip: 160 - 0 - 160); top random
    np.testing.assert_array_equal(
        ImageFolderDataset(tmp_path, size=SIZE, flip=1.0)[0]["image"], ds[0]["image"][:, ::-1]
    )


def test_captioned_shapes_items_and_batch():
    ds = CaptionedShapes(length=8, size=32)
    _check_item(ds[0], (32, 32), (0, 0), (32, 32))
    assert set(ds[0]) == {"image", "caption", *MICRO_CONDITIONING_KEYS}
    batch = next(iter(DataLoader(ds, batch_size=4)))
    assert batch["image"].shape == (4, 32, 32, 3) and len(batch["caption"]) == 4
    for key in MICRO_CONDITIONING_KEYS:
        assert batch[key].dtype == torch.long and batch[key].shape == (4, 2)
    assert batch["target_size_as_tuple"].tolist() == [[32, 32]] * 4
    assert batch["crop_coords_top_left"].tolist() == [[0, 0]] * 4


def test_webdataset_items(tmp_path):
    pixels = np.asarray(_noise())
    write_shards([{"__key__": "0", "png": image_bytes(pixels), "txt": "noise"}], tmp_path)
    (item,) = list(WebDatasetShards(str(tmp_path / "shard-000000.tar"), size=SIZE))
    assert item["caption"] == "noise" and item["image"].shape == (128, 128, 3)
    _check_item(item, (200, 300), (0, 32), (128, 128))


def test_cached_encodings_keep_the_keys():
    ds = CaptionedShapes(length=4, size=16)
    cached = CachedEncodings(ds, lambda x: torch.zeros(len(x), 1), "image", drop_input=True)
    cached.precompute()
    assert set(cached[1]) == {"caption", "image_encoded", *MICRO_CONDITIONING_KEYS}
    _check_item(cached[1], (16, 16), (0, 0), (16, 16))


def test_photo_crops_items():
    kw = dict(photos=["coins"], size=32, length=8, deterministic=True)
    half = PhotoCrops(scale=(0.5, 0.5), flip=False, **kw)
    h, w = half.images[0].shape[1:]
    for i in range(len(half)):
        item = half[i]
        assert tuple(item["original_size_as_tuple"].tolist()) == (h, w)
        assert tuple(item["target_size_as_tuple"].tolist()) == (32, 32)
        top, left = item["crop_coords_top_left"].tolist()  # crop side 64 -> photo halved
        assert 0 <= top <= round(h / 2) - 32 and 0 <= left <= round(w / 2) - 32
    # scale 1: no resize, so the offsets index the photo itself; a flip mirrors left
    one = dict(kw, scale=(1.0, 1.0))
    plain, flipped = PhotoCrops(flip=False, **one), PhotoCrops(flip=True, **one)
    mirrored = 0
    for i in range(len(plain)):
        a, b = plain[i], flipped[i]
        top, left = a["crop_coords_top_left"].tolist()
        photo = plain.images[0].permute(1, 2, 0).numpy()
        np.testing.assert_allclose(a["image"], photo[top : top + 32, left : left + 32], atol=1e-6)
        if not np.array_equal(a["image"], b["image"]):
            mirrored += 1
            assert b["crop_coords_top_left"].tolist() == [top, w - left - 32]
        else:
            assert b["crop_coords_top_left"].tolist() == [top, left]
    assert 0 < mirrored < len(plain)
