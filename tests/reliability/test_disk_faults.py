"""A full disk or a read-only folder while training or sampling, and sampling out of memory: exit
code 1 and a message that names the folder, the space, or the switches that help; the previous
checkpoint is intact. Two launches in the same second never share a run directory."""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import threading
from pathlib import Path

import pytest
import torch
from tiny_models import build_tiny, tiny_ldm_config

import ldm.launch
import main as main_py
from ldm.checkpoint.prune import save_state_dict
from ldm.commands import sample
from ldm.launch import resolve_paths
from ldm.run_spec import RunSpec

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]

ROOT = Path(__file__).resolve().parents[2]
TOY = str(ROOT / "tests" / "configs" / "cli" / "toy.yaml")
TRAIN = ["-b", TOY, "-t", "--no-test", "lightning.callbacks.image_logger=null"]


class _FullAfter:
    """A file whose writes raise ENOSPC once ``limit`` bytes are written."""

    def __init__(self, f, limit: int) -> None:  # noqa: ANN001
        self.f, self.limit, self.n = f, limit, 0

    def write(self, data) -> int:  # noqa: ANN001
        self.n += len(data)
        if self.n > self.limit:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.f.write(data)

    def __getattr__(self, name: str):  # noqa: ANN204
        return getattr(self.f, name)

    def __enter__(self):  # noqa: ANN204
        return self

    def __exit__(self, *exc: object) -> None:
        self.f.close()


def test_disk_full_during_a_checkpoint_write(tmp_path, monkeypatch, caplog, figures) -> None:
    """The first checkpoint (step 2) is written; the disk fills while writing the second."""
    import ldm.fault_tolerance as ft

    real_fdopen = os.fdopen
    saves = []

    def fdopen(fd: int, mode: str = "r", *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        f = real_fdopen(fd, mode, *args, **kwargs)
        saves.append(1)
        return _FullAfter(f, 1000) if len(saves) > 2 else f  # step 2: top-k + last.ckpt

    monkeypatch.setattr(ft.os, "fdopen", fdopen)
    logdir = tmp_path / "logs"
    with caplog.at_level(logging.INFO):
        code = main_py.main([*TRAIN, "-l", str(logdir), "--trainer.max_steps", "6"])
    assert code == 1
    (run_dir,) = logdir.iterdir()
    ckptdir = run_dir / "checkpoints"
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "disk full while writing checkpoint" in errors[0], errors
    assert str(ckptdir) in errors[0] and "free" in errors[0] and "needs about" in errors[0]
    assert (
        "The checkpoints written before are unchanged (" in errors[0] and "last.ckpt" in errors[0]
    )
    assert "Traceback" not in caplog.text
    assert torch.load(ckptdir / "last.ckpt", weights_only=True)["global_step"] == 2
    assert [p.name for p in ckptdir.iterdir() if p.name.endswith(".tmp")] == []
    figures["disk full: training cases (exit 1, previous checkpoint intact)"] += 1


def test_read_only_log_folder(tmp_path, monkeypatch, caplog, figures) -> None:
    ro = tmp_path / "ro"
    real_mkdir = os.mkdir

    def mkdir(path, *args, **kwargs) -> None:  # noqa: ANN001, ANN002, ANN003
        if str(path).startswith(str(ro)):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)
    with caplog.at_level(logging.ERROR):
        assert main_py.main([*TRAIN, "-l", str(ro)]) == 1
    assert "read-only file system" in caplog.text and "-l/--logdir" in caplog.text
    assert str(ro) in caplog.text
    figures["read-only log folder: cases (exit 1)"] += 1


def test_runs_started_in_the_same_second_get_their_own_directories(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(ldm.launch, "timestamp", lambda: "2024-01-31T12-00-00")
    spec = RunSpec(base=["toy.yaml"], logdir=tmp_path)
    barrier, found, errors = threading.Barrier(8), [], []

    def launch() -> None:
        barrier.wait()
        try:
            found.append(resolve_paths(spec).run_dir)
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=launch) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(set(found)) == 8
    assert all(p.is_dir() for p in found)
    # the processes of one run (DDP ranks, given the name) share it
    joined = resolve_paths(dataclasses.replace(spec, now="2024-01-31T12-00-00"))
    assert joined.run_dir == tmp_path / "2024-01-31T12-00-00_toy"


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = tiny_ldm_config()
    return save_state_dict(
        build_tiny(cfg).state_dict(), tmp_path_factory.mktemp("m") / "tiny.ckpt", config=cfg
    )


def _sample_flags(ckpt: Path, out: Path, *extra: str) -> list[str]:
    return ["--ckpt", str(ckpt), "--steps", "2", "--n_samples", "2", "--n_iter", "1",
            "--device", "cpu", "--outdir", str(out), *extra]  # fmt: skip


@pytest.mark.parametrize(
    "error",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
        RuntimeError(
            "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate "
            "memory: you tried to allocate 85899345920 bytes. Error code 12"
        ),
    ],
    ids=["cuda", "cpu"],
)
def test_out_of_memory_names_the_switches_that_help(
    error, tiny_ckpt, tmp_path, monkeypatch, capsys, figures
) -> None:
    def generate(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise error

    monkeypatch.setattr("ldm.engine.generate.generate", generate)
    assert sample.main("txt2img", _sample_flags(tiny_ckpt, tmp_path / "o")) == 1
    err = capsys.readouterr().err
    assert "out of memory on cpu while running ldm-txt2img" in err
    for switch in ("--attention-slice 1", "--tiled-decode", "--n_samples 1", "--H/--W"):
        assert switch in err, err
    # switches already at their most frugal are not suggested again
    flags = _sample_flags(tiny_ckpt, tmp_path / "o", "--tiled-decode", "--attention-slice", "1")
    assert sample.main("txt2img", flags) == 1
    err = capsys.readouterr().err
    assert "--tiled-decode" not in err and "--attention-slice" not in err
    figures["sampling out of memory: cases (exit 1, switches named)"] += 2


def test_disk_full_while_saving_images(tiny_ckpt, tmp_path, monkeypatch, capsys, figures) -> None:
    from PIL import Image

    def save(self, fp, *args, **kwargs) -> None:  # noqa: ANN001, ANN002, ANN003
        raise OSError(errno.ENOSPC, "No space left on device", str(fp))

    monkeypatch.setattr(Image.Image, "save", save)
    out = tmp_path / "o"
    assert sample.main("txt2img", _sample_flags(tiny_ckpt, out)) == 1
    err = capsys.readouterr().err
    assert "disk full while writing the images to --outdir" in err and str(out) in err
    figures["disk full: sampling cases (exit 1)"] += 1
