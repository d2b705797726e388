"""The acceptance run of the image-folder config: `python main.py --base configs/txt2img.yaml
configs/data/image-folder.yaml -t` on a folder of mixed-aspect photos (made from scikit-image's
bundled photographs) trains with aspect-ratio buckets and cached latents."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from ldm.data.photo_folder import write_photo_folder
from ldm.launch import run
from ldm.launch_cli import parse_command

ROOT = Path(__file__).resolve().parents[1]


def test_image_folder_run_trains_with_buckets_and_cached_latents(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    photos = write_photo_folder(tmp_path / "photos", photos=("astronaut", "coffee", "chelsea"))
    assert len(photos) == 21
    monkeypatch.chdir(ROOT)  # the config names the shipped first stage relative to the repository
    monkeypatch.setenv("LDM_CACHE_DIR", str(tmp_path / "cache"))
    args = [
        "--base",
        "configs/txt2img.yaml",
        "configs/data/image-folder.yaml",
        "-t",
        "--no-test",
        "-l",
        str(tmp_path / "logs"),
        f"data.params.train.params.root={tmp_path / 'photos'}",
        "data.params.batch_size=4",
        "lightning.trainer.max_steps=8",
        "lightning.callbacks.image_logger.params.batch_frequency=4",
        "lightning.callbacks.image_logger.params.log_images_kwargs.ddim_steps=2",
    ]
    with caplog.at_level(logging.INFO):
        result = run(parse_command(args).spec)
    assert result.global_step == 8
    text = caplog.text
    assert (
        "image folder" in text and "3 buckets (h x w: images): 40x24: 9, 32x32: 3, 24x40: 9" in text
    )
    entries = list((tmp_path / "cache" / "latents").rglob("*.safetensors"))
    assert len(entries) == 42  # 21 photos and their mirror images, encoded once
    assert "42 entries, 42 to encode" in text
    # the image logger shows a cached batch's inputs (decoded from the stored means)
    assert list((result.run_dir / "images" / "train").glob("inputs_gs-*.png"))
