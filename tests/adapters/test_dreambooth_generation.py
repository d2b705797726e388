"""generate_class_images: only the missing images, resumable and bit-identical, atomic files, a
manifest that refuses another model (a tiny text-to-image model with random weights)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tiny_models import build_tiny, tiny_ldm_config

from ldm.adapters.dreambooth import generate_class_images, model_fingerprint, output_size
from ldm.data.class_images import ClassImageMismatch
from ldm.data.dreambooth import DreamBoothDataset

pytestmark = pytest.mark.usefixtures("one_thread")

PURPLE = {
    "target": "ldm.data.shapes.CaptionedShapes",
    "params": {"length": 2, "size": 16, "colours": ["purple"]},
}
TRAIN_CAPTIONS = {"target": "ldm.data.shapes.CaptionedShapes", "params": {"length": 4, "size": 16}}
FAST = {"batch_size": 4, "steps": 2, "progress": False}
N = 6


def tiny_config() -> dict:
    cfg = tiny_ldm_config()
    cfg["model"]["params"].update(first_stage_key="image", cond_stage_key="caption")
    return cfg


@pytest.fixture(scope="module")
def model():
    return build_tiny(tiny_config())


def dataset(folder: Path, **kwargs) -> DreamBoothDataset:
    return DreamBoothDataset(
        instance=PURPLE,
        class_dir=folder,
        num_class_images=N,
        class_prompts=TRAIN_CAPTIONS,
        **kwargs,
    )


def contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


def copy_folder(source: Path, folder: Path) -> None:
    for p in source.iterdir():
        (folder / p.name).write_bytes(p.read_bytes())


@pytest.fixture(scope="module")
def first_run(model, tmp_path_factory) -> tuple[Path, dict[str, bytes]]:
    folder = tmp_path_factory.mktemp("class")
    assert generate_class_images(model, dataset(folder), **FAST) == N
    return folder, contents(folder)


def test_makes_every_missing_image_at_the_models_size_with_a_manifest(model, first_run) -> None:
    folder, files = first_run
    assert sorted(files) == [f"{i:05d}.png" for i in range(N)]
    assert sorted(p.name for p in folder.iterdir()) == [*sorted(files), "manifest.json"]  # no tmp
    ds = dataset(folder)
    assert ds.missing_class_images() == []
    with Image.open(folder / "00003.png") as im:
        assert im.size == output_size(model)[::-1] and im.text["prompt"] == ds.class_prompt_of(3)
    item = ds[7]  # class image 3
    assert item["prior"] is True and item["caption"] == ds.class_prompt_of(3)
    manifest = ds.cache.read_manifest()
    assert manifest["prompts"] == ds.class_prompts and manifest["size"] == list(output_size(model))
    assert manifest["model"]["fingerprint"] == model_fingerprint(model)["fingerprint"]
    assert generate_class_images(model, ds, **FAST) == 0  # all there: nothing made


def test_deleted_images_are_remade_bit_identical_and_the_others_untouched(
    model, first_run, tmp_path: Path
) -> None:
    _, files = first_run
    folder = tmp_path / "class"
    folder.mkdir()
    copy_folder(first_run[0], folder)

    def stamp(name: str) -> tuple[int, int]:
        st = (folder / name).stat()
        return st.st_ino, st.st_mtime_ns

    kept = {n: stamp(n) for n in files}
    (folder / "00001.png").unlink()
    (folder / "00004.png").unlink()
    assert dataset(folder).missing_class_images() == [1, 4]
    assert generate_class_images(model, dataset(folder), **FAST) == 2
    assert contents(folder) == files
    changed = [n for n in files if stamp(n) != kept[n]]
    assert changed == ["00001.png", "00004.png"]


def test_an_interrupted_run_resumes_to_the_same_images(model, first_run, tmp_path: Path) -> None:
    calls = {"n": 0}
    generate = model.generate

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return generate(*args, **kwargs)

    model.generate = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            generate_class_images(model, dataset(tmp_path), **FAST)
    finally:
        del model.generate
    assert sorted(contents(tmp_path)) == [f"{i:05d}.png" for i in range(4)]  # the first batch
    assert dataset(tmp_path).missing_class_images() == [4, 5]
    assert generate_class_images(model, dataset(tmp_path), **FAST) == 2
    assert contents(tmp_path) == first_run[1]


def test_each_image_depends_on_its_index_not_on_the_batching(model, first_run, tmp_path) -> None:
    assert generate_class_images(model, dataset(tmp_path), **{**FAST, "batch_size": 1}) == N
    for name in first_run[1]:
        a = np.asarray(Image.open(tmp_path / name), dtype=np.int16)
        b = np.asarray(Image.open(first_run[0] / name), dtype=np.int16)
        assert np.abs(a - b).max() <= 1  # same start noise; batched float math at most 1 level
    first = np.asarray(Image.open(first_run[0] / "00000.png"), dtype=np.int16)
    other = np.asarray(Image.open(first_run[0] / "00001.png"), dtype=np.int16)
    assert np.abs(first - other).max() > 10  # a different image per index


def test_a_folder_made_by_another_model_is_refused_or_regenerated(first_run, tmp_path) -> None:
    copy_folder(first_run[0], tmp_path)
    other = build_tiny(tiny_config(), seed=1)
    with pytest.raises(ClassImageMismatch) as err:
        generate_class_images(other, dataset(tmp_path), **FAST)
    message = str(err.value)
    assert "another model" in message and str(tmp_path) in message
    assert "Delete the folder" in message and "regenerate: true" in message
    assert contents(tmp_path) == first_run[1]  # nothing touched
    assert generate_class_images(other, dataset(tmp_path, regenerate=True), **FAST) == N
    assert contents(tmp_path) != first_run[1]
    manifest = dataset(tmp_path).cache.read_manifest()
    assert manifest["model"]["fingerprint"] == model_fingerprint(other)["fingerprint"]
