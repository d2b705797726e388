"""``ldm-convert`` never loses a file: it refuses a destination folder that holds anything but
a diffusers folder (or holds the source, or the working directory), replaces a diffusers
folder only with --overwrite, and reads output suffixes in any case."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_models import build_tiny, tiny_ldm_config

from ldm.checkpoint.prune import save_state_dict
from ldm.checkpoint.safe_load import read_checkpoint
from ldm.commands import convert

pytestmark = pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = tiny_ldm_config()
    model = build_tiny(config)
    path = tmp_path_factory.mktemp("src") / "tiny.safetensors"
    return save_state_dict(model.state_dict(), path, config=config)


def _run(*argv: str | Path) -> int:
    return convert.main([str(a) for a in argv])


def test_folder_with_other_files_is_refused(source: Path, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    dst = tmp_path / "models"
    dst.mkdir()
    (dst / "notes.txt").write_text("precious")
    assert _run(source, dst) == 2
    assert "not a diffusers folder (it holds notes.txt)" in capsys.readouterr().err
    assert (dst / "notes.txt").read_text() == "precious"


def test_folder_holding_the_source_is_refused(source: Path, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    dst = tmp_path / "here"
    dst.mkdir()
    inner = dst / source.name
    inner.write_bytes(source.read_bytes())
    assert _run(inner, dst) == 2
    assert "holds the source" in capsys.readouterr().err
    assert inner.read_bytes() == source.read_bytes()


def test_working_directory_is_never_replaced(
    source: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys,  # noqa: ANN001
) -> None:
    out = tmp_path / "out"
    assert _run(source, out) == 0
    monkeypatch.chdir(out / "unet")
    assert _run(source, out, "--overwrite") == 2
    assert "holds the working directory" in capsys.readouterr().err
    assert (out / "model_index.json").is_file()


def test_diffusers_folder_is_replaced_only_with_overwrite(
    source: Path,
    tmp_path: Path,
    capsys,  # noqa: ANN001
) -> None:
    dst = tmp_path / "out"
    assert _run(source, dst) == 0
    stamp = dst / "model_index.json"
    before = stamp.stat().st_mtime_ns
    assert _run(source, dst) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert stamp.stat().st_mtime_ns == before
    (dst / "stale.txt").write_text("from an older conversion")
    assert _run(source, dst, "--overwrite") == 0
    assert (dst / "model_index.json").is_file() and not (dst / "stale.txt").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _run(source, empty) == 0 and (empty / "unet").is_dir()


@pytest.mark.parametrize("name", ["back.SAFETENSORS", "back.pt", "back.Ckpt"])
def test_output_suffixes_in_any_case(source: Path, tmp_path: Path, name: str) -> None:
    folder = tmp_path / "folder"
    assert _run(source, folder) == 0
    for src in (source, folder):  # file -> file (prune) and folder -> file
        dst = tmp_path / f"{src.stem}-{name}"
        assert _run(src, dst) == 0
        assert dst.is_file()
        back = read_checkpoint(dst).state_dict
        original = read_checkpoint(source).state_dict
        for k, v in original.items():
            assert torch.equal(back[k], v), k


def test_file_output_needs_a_readable_suffix(source: Path, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    folder = tmp_path / "folder"
    assert _run(source, folder) == 0
    assert _run(folder, tmp_path / "back_noext") == 2
    assert "needs a .safetensors / .ckpt" in capsys.readouterr().err
    assert not (tmp_path / "back_noext").exists()
    assert _run(folder, tmp_path / "again", "--to", "diffusers") == 2
    assert "already a diffusers folder" in capsys.readouterr().err
