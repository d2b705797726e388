"""Image folder inputs as people make them: byte-order marks, Hugging Face split folders,
repeated metadata rows, captions off, parameter types from YAML, latent caching with random crops."""

import codecs
import json
import logging

import pytest
from PIL import Image

from ldm.data.folder import ImageFolderDataset
from ldm.data.webdataset import caption_from_sample, folder_samples, folder_to_shards
from ldm.util import ConfigError

BOM = codecs.BOM_UTF8


def _image(path, rgb=(200, 10, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 12), rgb).save(path)


def _jsonl(path, rows, bom=False):
    text = "".join(json.dumps(r) + "\n" for r in rows)
    path.write_bytes((BOM if bom else b"") + text.encode("utf-8"))


# ---------------------------------------------------------------- 1. UTF-8 byte-order marks
def test_sidecar_txt_with_bom(tmp_path):
    _image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes(BOM + b"bom caption\n")
    ds = ImageFolderDataset(tmp_path, size=8)
    assert ds.caption_source == "txt" and ds.captions == ["bom caption"]


def test_excel_csv_with_bom(tmp_path):
    _image(tmp_path / "a.png")
    (tmp_path / "metadata.csv").write_bytes(BOM + b"file_name,text\r\na.png,excel caption\r\n")
    assert ImageFolderDataset(tmp_path, size=8).captions == ["excel caption"]


def test_jsonl_with_bom(tmp_path):
    _image(tmp_path / "a.png")
    _jsonl(tmp_path / "metadata.jsonl", [{"file_name": "a.png", "text": "bom jsonl"}], bom=True)
    assert ImageFolderDataset(tmp_path, size=8).captions == ["bom jsonl"]


def test_not_utf8_line_number_counts_the_bom(tmp_path):
    _image(tmp_path / "a.png")
    (tmp_path / "metadata.csv").write_bytes(BOM + b"file_name,text\na.png,caf\xe9\n")
    with pytest.raises(ValueError, match=r"metadata.csv:2: not UTF-8"):
        ImageFolderDataset(tmp_path, size=8)


def test_shards_strip_the_bom(tmp_path):
    _image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes(BOM + b"packed")
    (sample,) = folder_samples(tmp_path)
    assert sample["txt"] == "packed"
    assert caption_from_sample({"txt": BOM + b"from a tar"}) == "from a tar"


# ---------------------------------------------------------------- 2. split folders, repeated rows
@pytest.fixture
def hf_splits(tmp_path):
    """root/train (2 images), root/test (1), root/val (1), each with its metadata.jsonl."""
    for split, names in {"train": ["a", "b"], "test": ["c"], "val": ["d"]}.items():
        for n in names:
            _image(tmp_path / split / f"{n}.png")
        rows = [{"file_name": f"{n}.png", "text": f"{split} {n}"} for n in names]
        _jsonl(tmp_path / split / "metadata.jsonl", rows)
    return tmp_path


def test_split_folders_default_to_train_and_say_so(hf_splits, caplog):
    with caplog.at_level(logging.INFO):
        ds = ImageFolderDataset(hf_splits, size=8)
    assert ds.split == "train" and sorted(ds.captions) == ["train a", "train b"]
    assert all("train" in p.parent.name for p in ds.paths)
    assert any("reading split 'train'" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    ("split", "captions"), [("test", ["test c"]), ("validation", ["val d"]), ("val", ["val d"])]
)
def test_split_asked_for_is_the_only_one_read(hf_splits, split, captions):
    ds = ImageFolderDataset(hf_splits, size=8, split=split)
    assert ds.captions == captions


def test_split_errors_name_what_exists(hf_splits, tmp_path):
    (hf_splits / "val").rename(hf_splits / "elsewhere")
    with pytest.raises(ConfigError, match=r"no 'validation' split folder.*test, train"):
        ImageFolderDataset(hf_splits, size=8, split="validation")
    with pytest.raises(ConfigError, match=r"split: expected one of .*found 'holdout'"):
        ImageFolderDataset(hf_splits, size=8, split="holdout")
    with pytest.raises(ConfigError, match="the root has none"):
        ImageFolderDataset(hf_splits / "train", size=8, split="train")


def test_no_split_folders_reads_everything(tmp_path):
    _image(tmp_path / "cats" / "a.png")
    _image(tmp_path / "dogs" / "b.png")
    ds = ImageFolderDataset(tmp_path, size=8)
    assert ds.split is None and len(ds) == 2


def test_shards_of_a_split_layout_hold_one_split(hf_splits, tmp_path):
    out = tmp_path / "shards"
    folder_to_shards(hf_splits, out)
    samples = list(folder_samples(hf_splits, split="test"))
    assert [s["txt"] for s in samples] == ["test c"]
    assert sorted(s["txt"] for s in folder_samples(hf_splits)) == ["train a", "train b"]


def test_repeated_metadata_rows_are_reported(tmp_path, caplog):
    _image(tmp_path / "a.png")
    _image(tmp_path / "b.png")
    rows = [
        {"file_name": "a.png", "text": "one"},
        {"file_name": "b.png", "text": "bee"},
        {"file_name": "a.png", "text": "two"},
        {"file_name": "./a.png", "text": "three"},
    ]
    _jsonl(tmp_path / "metadata.jsonl", rows)
    with caplog.at_level(logging.WARNING):
        ds = ImageFolderDataset(tmp_path, size=8)
    assert ds.captions == ["three", "bee"]
    (msg,) = [r.getMessage() for r in caplog.records if "repeat" in r.getMessage()]
    assert "metadata.jsonl" in msg and "2 row(s)" in msg and "'a.png' on line 3" in msg


# ---------------------------------------------------------------- 3. caption_source none / txt
def test_caption_source_none_does_not_read_metadata(tmp_path):
    _image(tmp_path / "a.png")
    (tmp_path / "metadata.csv").write_text("file_name,additional_feature\na.png,x\n")
    with pytest.raises(ValueError, match="no caption column"):
        ImageFolderDataset(tmp_path, size=8)
    ds = ImageFolderDataset(tmp_path, size=8, caption_source="none")
    assert len(ds) == 1 and "caption" not in ds[0]
    (tmp_path / "a.txt").write_text("sidecar")
    assert ImageFolderDataset(tmp_path, size=8, caption_source="txt").captions == ["sidecar"]


# ---------------------------------------------------------------- 4. parameter types
@pytest.mark.parametrize(
    ("params", "pattern"),
    [
        (
            {"size": "32"},
            r"params.size: expected a whole number.*found '32' \(str\).*without quotes",
        ),
        ({"size": 32.5}, r"params.size: expected a whole number.*found 32.5"),
        ({"size": 0}, r"params.size: expected a whole number"),
        ({"flip": "yes"}, r"params.flip: expected true, false or a probability.*found 'yes'"),
        ({"flip": 1.5}, r"params.flip: expected .*found 1.5"),
        ({"extensions": 5}, r"params.extensions: expected a file extension"),
        ({"extensions": []}, r"params.extensions: expected a file extension"),
        ({"recursive": "no"}, r"params.recursive: expected true or false"),
        ({"max_items": "10"}, r"params.max_items: expected a whole number"),
        ({"background": [255, 255]}, r"params.background: expected three values"),
    ],
)
def test_bad_parameter_types_name_the_parameter(tmp_path, params, pattern):
    _image(tmp_path / "a.png")
    with pytest.raises(ConfigError, match=pattern):
        ImageFolderDataset(tmp_path, **params)


@pytest.mark.parametrize("extensions", [".png", "png", "PNG", ["png"], (".PNG", "jpg")])
def test_extensions_as_one_string_or_without_dot(tmp_path, extensions):
    _image(tmp_path / "a.png")
    _image(tmp_path / "b.webp")
    ds = ImageFolderDataset(tmp_path, size=8, extensions=extensions)
    assert [p.name for p in ds.paths] == ["a.png"]


def test_whole_float_size_and_probability_flip_are_accepted(tmp_path):
    _image(tmp_path / "a.png")
    ds = ImageFolderDataset(tmp_path, size=8.0, flip=0.25)
    assert ds.transform.size == 8 and ds.transform.flip_p == 0.25
    assert ds[0]["image"].shape == (8, 8, 3)


# ---------------------------------------------------------------- 5. latent cache + random crop
def test_cache_with_random_crop_is_a_config_error(tmp_path):
    _image(tmp_path / "a.png")
    ds = ImageFolderDataset(tmp_path, size=8, crop="random")
    with pytest.raises(ConfigError) as err:
        ds.cache_variants(0)
    msg = str(err.value)
    assert "model.params.cache_latents" in msg and "data.params.train.params.crop" in msg
    assert "crop: center" in msg and "cache_latents: false" in msg


# ---------------------------------------------------------------- 6. missing sidecars counted
def test_missing_sidecar_count_leaves_out_unreadable_files(tmp_path, caplog):
    _image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("has one")
    _image(tmp_path / "b.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    with caplog.at_level(logging.WARNING):
        ds = ImageFolderDataset(tmp_path, size=8)
    assert len(ds) == 2 and ds.skipped.count == 1
    (msg,) = [r.getMessage() for r in caplog.records if "no sidecar" in r.getMessage()]
    assert "1 of 2 images have no sidecar .txt caption" in msg


def test_a_missing_root_is_a_config_error(tmp_path) -> None:  # noqa: ANN001
    """exit 2 from main.py (a ConfigError), still a FileNotFoundError for callers."""
    from ldm.data.folder import ImageFolderDataset
    from ldm.util import ConfigError

    with pytest.raises(ConfigError, match="does not exist or is not a directory") as err:
        ImageFolderDataset(root=tmp_path / "nope")
    assert isinstance(err.value, FileNotFoundError)
