"""SetupCallback (rank 0 only), ImageLogger frequency and files, atomic checkpoint writes."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

import ldm.fault_tolerance as fault_tolerance
from ldm.callbacks import CUDACallback, ImageLogger, SetupCallback
from ldm.fault_tolerance import AtomicCheckpointIO


def _setup_cb(tmp_path: Path) -> SetupCallback:
    log = tmp_path / "run"
    cfg = OmegaConf.create({"model": {"lr": "${data.x}"}, "data": {"x": 3}})
    return SetupCallback(
        False,
        "NOW",
        str(log),
        str(log / "checkpoints"),
        str(log / "configs"),
        cfg,
        OmegaConf.create({"trainer": {"max_steps": 2}}),
    )


def test_setup_callback_writes_resolved_configs_on_rank0_only(tmp_path: Path) -> None:
    cb = _setup_cb(tmp_path)
    cb.setup(SimpleNamespace(is_global_zero=False), None, "fit")
    assert not (tmp_path / "run").exists()  # other ranks write nothing
    cb.setup(SimpleNamespace(is_global_zero=True), None, "fit")
    project = OmegaConf.load(tmp_path / "run" / "configs" / "NOW-project.yaml")
    assert project.model.lr == 3  # interpolation resolved
    lightning = OmegaConf.load(tmp_path / "run" / "configs" / "NOW-lightning.yaml")
    assert lightning.lightning.trainer.max_steps == 2
    assert (tmp_path / "run" / "checkpoints").is_dir() and (tmp_path / "run" / "images").is_dir()


def test_image_logger_frequency() -> None:
    il = ImageLogger(batch_frequency=8, max_images=2)
    assert [s for s in range(0, 33) if il.check_frequency(s)] == [1, 2, 4, 8, 16, 24, 32]
    il = ImageLogger(batch_frequency=8, max_images=2, increase_log_steps=False, log_first_step=True)
    assert [s for s in range(0, 20) if il.check_frequency(s)] == [0, 8, 16]


class _Module(torch.nn.Module):
    cond_stage_key = "txt"

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(1, 1)
        self.calls: list[tuple[str, bool]] = []

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def log_images(self, batch: dict, split: str = "train", **kwargs: object) -> dict:
        self.calls.append((split, self.training))
        torch.rand(1)  # draws from the RNG: must not disturb training's RNG stream
        x = torch.linspace(-2, 2, 6 * 3 * 2 * 2).view(6, 3, 2, 2)
        return {"samples": x, "conditioning": ["a", "b", "c", "d", "e", "f"], "scalar": 1.0}


def test_image_logger_writes_grids_and_captions(tmp_path: Path) -> None:
    il = ImageLogger(batch_frequency=2, max_images=4, save_dir=str(tmp_path))
    module = _Module()
    module.train()
    trainer = SimpleNamespace(
        is_global_zero=True,
        global_step=2,
        current_epoch=0,
        loggers=[],
        default_root_dir="x",
        sanity_checking=False,
    )
    batch = {"txt": ["red", "green", "blue", "cyan", "white", "black"]}
    state = torch.get_rng_state()
    il.on_train_batch_end(trainer, module, None, batch, 5)
    assert torch.equal(state, torch.get_rng_state())  # own RNG fork
    assert module.calls == [("train", False)] and module.training  # eval during, train after
    folder = tmp_path / "images" / "train"
    grid = np.asarray(Image.open(folder / "samples_gs-000002_e-000000_b-000005.png"))
    assert grid.shape == (2 + 2 * 2, 4 * 2 + 5 * 2, 3)  # 4 images of 2x2, nrow=4, padding 2
    # clamped to [-1, 1] then mapped to [0, 255]: the first pixel is -2 -> -1 -> 0; the largest
    # value among the first 4 images is linspace index 47: -2 + 4 * 47 / 71
    assert grid[2, 2, 0] == 0
    assert grid.max() == round(((-2 + 4 * 47 / 71) + 1) / 2 * 255)
    assert (folder / "captions_gs-000002_e-000000_b-000005.txt").read_text().split() == [
        "red",
        "green",
        "blue",
        "cyan",
    ]
    assert (folder / "conditioning_gs-000002_e-000000_b-000005.txt").read_text().split() == [
        "a",
        "b",
        "c",
        "d",
    ]
    # not a logging step, and other ranks never log
    il.on_train_batch_end(
        SimpleNamespace(**{**vars(trainer), "global_step": 3}), module, None, batch, 6
    )
    il.on_train_batch_end(
        SimpleNamespace(**{**vars(trainer), "is_global_zero": False}), module, None, batch, 7
    )
    assert len(module.calls) == 1


def test_cuda_callback_logs_the_epoch_time_and_no_memory_on_cpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import ldm.callbacks as callbacks

    clock = iter([100.0, 102.5, 999.0])  # start, end, the unused getattr default
    monkeypatch.setattr(callbacks.time, "time", lambda: next(clock))
    messages: list[str] = []
    monkeypatch.setattr(callbacks, "rank_zero_info", messages.append)
    cb, module = CUDACallback(), _Module()
    trainer = SimpleNamespace(current_epoch=3)
    cb.on_train_epoch_start(trainer, module)
    cb.on_train_epoch_end(trainer, module)
    assert messages == ["epoch 3: 2.50 s"]  # 102.5 - 100.0; a CPU has no peak-memory figure


def test_atomic_checkpoint_survives_a_crash_while_saving(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "w": torch.ones(3)}, path)
    real_save = torch.save

    def crash(obj: object, f: object, *a: object, **k: object) -> None:
        real_save(obj, f, *a, **k)
        f.truncate(10)  # half-written file, then the process "dies"
        raise OSError("disk full")

    monkeypatch.setattr(fault_tolerance.torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"global_step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.setattr(fault_tolerance.torch, "save", real_save)
    state = torch.load(path, weights_only=True)  # the previous checkpoint is intact
    assert state["global_step"] == 1 and torch.equal(state["w"], torch.ones(3))
    assert os.listdir(tmp_path) == ["last.ckpt"]  # no temp files left behind
    io.save_checkpoint({"global_step": 3}, path)
    assert torch.load(path, weights_only=True)["global_step"] == 3
