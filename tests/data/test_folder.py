"""Image folder data set: caption conventions, transforms, odd modes, bad files, clear errors."""

import io
import json
import logging
import random

import numpy as np
import pytest
from PIL import Image
from torch.utils.data import DataLoader

from ldm.data.folder import ImageFolderDataset
from ldm.data.image_io import BadImageError, load_rgb
from ldm.data.micro_conditioning import MICRO_CONDITIONING_KEYS

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "gray": (128, 128, 128)}


def _solid(path, rgb, size=(20, 12), fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, rgb).save(path, format=fmt)


def _expected(rgb):
    return np.asarray(rgb, dtype=np.float32) / 127.5 - 1.0


@pytest.fixture
def nested(tmp_path):
    """Four solid images, two in a sub-folder; name = colour."""
    paths = {}
    for i, (name, rgb) in enumerate(COLOURS.items()):
        rel = f"sub/{name}.png" if i % 2 else f"{name}.jpg"
        _solid(tmp_path / rel, rgb, fmt="PNG" if rel.endswith("png") else "JPEG")
        paths[name] = rel
    return tmp_path, paths


def _check_pairs(ds, caption_key="caption", image_key="image", prefix="a "):
    assert len(ds) == len(COLOURS)
    seen = set()
    for i in range(len(ds)):
        item = ds[i]
        img = item[image_key]
        assert img.dtype == np.float32 and img.shape == (8, 8, 3)
        assert img.min() >= -1.0 and img.max() <= 1.0
        name = item[caption_key][len(prefix) :]
        np.testing.assert_allclose(img.mean(axis=(0, 1)), _expected(COLOURS[name]), atol=0.05)
        seen.add(name)
    assert seen == set(COLOURS)


def test_metadata_jsonl_hf_convention(nested):
    root, paths = nested
    with open(root / "metadata.jsonl", "w") as f:
        for name, rel in paths.items():
            f.write(json.dumps({"file_name": rel, "text": f"a {name}"}) + "\n")
    ds = ImageFolderDataset(root, size=8)
    assert ds.caption_source == "metadata"
    _check_pairs(ds)


def test_metadata_caption_column_and_csv(nested):
    root, paths = nested
    lines = ["file_name,caption"] + [f"{rel},a {name}" for name, rel in paths.items()]
    (root / "metadata.csv").write_text("\n".join(lines) + "\n")
    _check_pairs(ImageFolderDataset(root, size=8, caption_source="metadata"))


def test_nested_metadata_is_relative_to_its_folder(nested):
    root, paths = nested
    for name, rel in paths.items():
        meta = (
            root / rel.rsplit("/", 1)[0] / "metadata.jsonl"
            if "/" in rel
            else root / "metadata.jsonl"
        )
        with open(meta, "a") as f:
            f.write(json.dumps({"file_name": rel.split("/")[-1], "caption": f"a {name}"}) + "\n")
    _check_pairs(ImageFolderDataset(root, size=8))


def test_sidecar_txt_and_sd_keys(nested):
    root, paths = nested
    for name, rel in paths.items():
        (root / rel).with_suffix(".txt").write_text(f"a {name}\n")
    ds = ImageFolderDataset(root, size=8, image_key="jpg", caption_key="txt")
    assert ds.caption_source == "txt"
    _check_pairs(ds, caption_key="txt", image_key="jpg")


def test_unconditional_and_non_recursive(nested):
    root, _ = nested
    ds = ImageFolderDataset(root, size=8)
    assert ds.caption_source == "none" and len(ds) == 4
    assert set(ds[0]) == {"image", *MICRO_CONDITIONING_KEYS}  # no caption key
    assert len(ImageFolderDataset(root, size=8, recursive=False)) == 2


def test_resize_center_crop_and_flip(tmp_path):
    img = np.zeros((10, 40, 3), np.uint8)  # H=10, W=40: left half red, right half blue
    img[:, :20] = (255, 0, 0)
    img[:, 20:] = (0, 0, 255)
    Image.fromarray(img).save(tmp_path / "x.png")
    item = ImageFolderDataset(tmp_path, size=5, interpolation="nearest")[0]["image"]
    assert item.shape == (5, 5, 3)  # 10x40 -> 5x20 -> center crop 5x5 straddles the edge
    assert item[0, 0, 0] == 1.0 and item[0, -1, 2] == 1.0
    flipped = ImageFolderDataset(tmp_path, size=5, interpolation="nearest", flip=1.0)[0]["image"]
    np.testing.assert_array_equal(flipped, item[:, ::-1])
    random.seed(0)
    crops = {
        ImageFolderDataset(tmp_path, size=5, crop="random", interpolation="nearest")[0]["image"][
            0, 0, 0
        ]
        for _ in range(30)
    }
    assert crops == {1.0, -1.0}  # random crop sees both halves
    assert not ImageFolderDataset(tmp_path, size=5, crop="random").deterministic


def _save(img, path, **kw):
    img.save(path, **kw)
    return path


def test_odd_modes_are_converted(tmp_path):
    a = np.zeros((4, 4, 4), np.uint8)
    a[..., 0] = 255  # red, alpha 0 on the left half
    a[:, 2:, 3] = 255
    rgba = _save(Image.fromarray(a), tmp_path / "rgba.png")
    out = np.asarray(load_rgb(rgba))
    assert (out[:, :2] == 255).all() and (out[:, 2:] == (255, 0, 0)).all()  # over white
    assert (np.asarray(load_rgb(rgba, background=(0, 0, 0)))[:, :2] == 0).all()

    g16 = np.full((4, 4), 65535, np.uint16)
    g16[:, :2] = 32768
    p16 = _save(Image.fromarray(g16), tmp_path / "g16.png")
    assert Image.open(p16).mode.startswith("I")
    out = np.asarray(load_rgb(p16))
    assert (out[:, 2:] == 255).all() and (np.abs(out[:, :2].astype(int) - 128) <= 1).all()

    dark16 = _save(Image.fromarray(np.full((4, 4), 200, np.uint16)), tmp_path / "d16.png")
    assert np.asarray(load_rgb(dark16)).max() <= 1  # 200/65535: dark, not stretched to 200/255

    cmyk = _save(Image.new("CMYK", (4, 4), (0, 255, 255, 0)), tmp_path / "cmyk.jpg")
    r, g, b = np.asarray(load_rgb(cmyk)).reshape(-1, 3).mean(axis=0)
    assert r > 200 and g < 60 and b < 60
    for mode, value in [("L", 100), ("1", 1), ("P", 3)]:
        img = Image.new(mode, (4, 4), value)
        out = load_rgb(_save(img, tmp_path / f"m{mode}.png"))
        assert out.mode == "RGB" and out.size == (4, 4)
    la = Image.new("LA", (4, 4), (0, 0))
    assert (np.asarray(load_rgb(_save(la, tmp_path / "la.png"))) == 255).all()


def test_bad_files_skipped_counted_and_reported_once(tmp_path, caplog):
    for i in range(4):
        _solid(tmp_path / f"good{i}.png", (60 * i, 0, 0))
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "garbage.jpg").write_bytes(b"this is not an image at all" * 10)
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(
        buf, format="JPEG"
    )
    (tmp_path / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with caplog.at_level(logging.WARNING):
        ds = ImageFolderDataset(tmp_path, size=8)
    warnings = [r for r in caplog.records if "skipped" in r.getMessage()]
    assert len(warnings) == 1 and "skipped 2 bad input" in warnings[0].getMessage()
    assert "empty.png" in warnings[0].getMessage() and "garbage.jpg" in warnings[0].getMessage()
    assert ds.skipped.count == 2 and len(ds) == 5  # truncated JPEG passes the cheap verify

    with pytest.raises(BadImageError):
        load_rgb(tmp_path / "truncated.jpg")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        items = list(DataLoader(ds, batch_size=2, num_workers=0))
        items += list(DataLoader(ds, batch_size=2, num_workers=0))  # a second epoch
    assert sum(len(b["image"]) for b in items) == 10  # nothing lost, nothing crashed
    assert ds.skipped.count == 3  # + the truncated one, once
    assert len([r for r in caplog.records if "truncated.jpg" in r.getMessage()]) == 1
    bad = ds.paths.index(tmp_path / "truncated.jpg")
    np.testing.assert_array_equal(ds[bad]["image"], ds[(bad + 1) % len(ds)]["image"])

    full = ImageFolderDataset(tmp_path, size=8, validate="full")
    assert len(full) == 4 and full.skipped.count == 3


def test_missing_and_empty_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        ImageFolderDataset(tmp_path / "nope")
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"no usable images.*\.png"):
        ImageFolderDataset(tmp_path)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(ValueError, match="1 bad files skipped"):
        ImageFolderDataset(tmp_path)
    with pytest.raises(ValueError, match="no metadata.jsonl"):
        _solid(tmp_path / "ok.png", (1, 2, 3))
        ImageFolderDataset(tmp_path, caption_source="metadata")


def test_metadata_rows_for_missing_files_are_counted(tmp_path, caplog):
    _solid(tmp_path / "a.png", (255, 0, 0))
    _solid(tmp_path / "unlisted.png", (0, 0, 255))
    rows = [{"file_name": "a.png", "text": "red"}, {"file_name": "gone.png", "text": "lost"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with caplog.at_level(logging.WARNING):
        ds = ImageFolderDataset(tmp_path, size=4)
    assert len(ds) == 1 and ds[0]["caption"] == "red" and ds.skipped.count == 1
    text = caplog.text
    assert (
        "gone.png (listed in metadata but not found)" in text and "1 images are not listed" in text
    )
    (tmp_path / "metadata.jsonl").write_text('{"name": "a.png", "text": "x"}\n')
    with pytest.raises(ValueError, match="no 'file_name' column"):
        ImageFolderDataset(tmp_path)
