"""A run as a value: RunSpec built in Python -> run(spec) -> RunResult; the command line builds
the same value; run directory names come from the spec, never from the environment."""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import ldm.launch  # noqa: E402
from ldm.launch import resolve_paths, run  # noqa: E402
from ldm.launch_cli import get_parser, parse_command  # noqa: E402
from ldm.run_spec import FINISHED, RunResult, RunSpec, UsageError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CFG = Path(__file__).parent / "configs" / "cli"
NOW = "2024-01-31T12-00-00"


def test_spec_built_in_python_trains_and_returns_the_run(tmp_path: Path) -> None:
    spec = RunSpec(
        base=[CFG / "toy.yaml"],
        train=True,
        no_test=True,
        logdir=tmp_path,
        overrides=[
            "max_steps=3",  # a bare Trainer argument, as on the command line
            "trainer.val_check_interval=3",
            "model.params.monitor=val/loss",
            "lightning.callbacks.image_logger=null",
        ],
    )
    result = run(spec)
    assert isinstance(result, RunResult) and result.status == FINISHED and not result.interrupted
    assert result.run_dir.parent == tmp_path
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d-\d\d-\d\d_toy", result.run_dir.name)
    assert result.last_ckpt == result.run_dir / "checkpoints" / "last.ckpt"
    assert torch.load(result.last_ckpt, weights_only=True)["global_step"] == 3 == result.global_step
    now = result.run_dir.name.split("_")[0]
    saved = OmegaConf.load(result.run_dir / "configs" / f"{now}-lightning.yaml")
    assert (
        saved.lightning.trainer.max_steps == 3 and saved.lightning.trainer.val_check_interval == 3
    )
    # the monitor the model named, its last value and the best checkpoint chosen by it
    assert result.monitor == "val/loss" and result.monitor_value == result.metrics["val/loss"]
    assert result.best_score == pytest.approx(result.monitor_value)
    assert result.best_ckpt and Path(result.best_ckpt).parent == result.run_dir / "checkpoints"
    assert "train/loss" in result.metrics


def test_command_line_builds_the_same_spec() -> None:
    argv = ["--base", "a.yaml", "b.yaml", "-t", "-n", "exp", "-f", "_v2", "-p", "proj",
            "-l", "out", "-s", "5", "--scale_lr", "false", "--no-test", "-d",
            "model.params.x=1", "--trainer.max_steps", "4"]  # fmt: skip
    command = parse_command(argv)
    assert command.sweep is None and command.sweep_backend == "local"
    assert command.spec == RunSpec(
        base=["a.yaml", "b.yaml"],
        overrides=["model.params.x=1", "lightning.trainer.max_steps=4"],
        train=True,
        name="exp",
        postfix="_v2",
        project="proj",
        logdir="out",
        seed=5,
        scale_lr=False,
        no_test=True,
        debug=True,
    )
    assert parse_command([]).spec == RunSpec()  # the flags' defaults are the spec's defaults
    sweep = parse_command(["--base", "a.yaml", "--sweep", "s.yaml", "--sweep-backend", "ray"])
    assert (sweep.sweep, sweep.sweep_backend, sweep.spec.base) == ("s.yaml", "ray", ("a.yaml",))


def test_every_run_flag_is_a_spec_field() -> None:
    """A flag added to the parser without a RunSpec field (or the reverse) fails here."""
    sweep_flags = {"sweep", "sweep_backend", "ray_address", "sweep_resume"}  # Command fields
    dests = {a.dest for a in get_parser()._actions} - {"help", *sweep_flags}
    # validate: set by `python -m ldm validate` (ldm.lightning_cli), not a main.py flag
    fields = {f.name for f in dataclasses.fields(RunSpec)} - {"overrides", "now", "validate"}
    assert dests == fields


def test_spec_is_a_checked_value(tmp_path: Path) -> None:
    spec = RunSpec(base=[tmp_path / "a.yaml"], resume=tmp_path, logdir=tmp_path / "logs")
    assert spec.base == (str(tmp_path / "a.yaml"),) and spec.resume == str(tmp_path)
    assert spec.logdir == str(tmp_path / "logs")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.train = True  # type: ignore[misc]
    assert dataclasses.replace(spec, train=True).train and not spec.train
    with pytest.raises(UsageError, match="cannot be used together"):
        RunSpec(name="x", resume="logs/run")
    with pytest.raises(TypeError, match="expected a list of strings"):
        RunSpec(base="a.yaml")  # type: ignore[arg-type]  # would be read as 6 file names
    with pytest.raises(UsageError, match="empty timestamp"):
        RunSpec(now="")


def test_new_run_names_are_unique_a_given_now_joins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ldm.launch, "timestamp", lambda: NOW)
    spec = RunSpec(base=["configs/toy.yaml"], logdir=tmp_path)
    first = resolve_paths(spec)
    assert first.run_dir == tmp_path / f"{NOW}_toy" and first.now == NOW
    assert first.run_dir.is_dir()  # claimed at once: a launch in the same second cannot take it
    second = resolve_paths(spec)  # same second, directory taken: a new one
    assert second.run_dir == tmp_path / f"{NOW}-1_toy" and second.now == f"{NOW}-1"
    joined = resolve_paths(dataclasses.replace(spec, now=NOW))  # another process of the first run
    assert joined.run_dir == first.run_dir
    # resuming: the run's directory; new config file names unless the timestamp is given
    (first.run_dir / "checkpoints").mkdir()
    (first.run_dir / "checkpoints" / "last.ckpt").write_bytes(b"")
    (first.run_dir / "configs").mkdir()
    (first.run_dir / "configs" / f"{NOW}-project.yaml").write_text("model: {}\n")
    resumed = resolve_paths(RunSpec(resume=first.run_dir))
    assert resumed.run_dir == first.run_dir and resumed.now == f"{NOW}-1"
    assert resumed.ckpt == first.run_dir / "checkpoints" / "last.ckpt"
    assert resolve_paths(RunSpec(resume=first.run_dir, now=NOW)).now == NOW


def test_the_library_takes_the_run_name_from_the_spec_not_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LDM_RUN_NOW", "1999-01-01T00-00-00")
    monkeypatch.setattr(ldm.launch, "timestamp", lambda: NOW)
    assert resolve_paths(RunSpec(logdir=tmp_path, name="a")).now == NOW
    readers = [
        str(p.relative_to(ROOT))
        for p in (ROOT / "ldm").rglob("*.py")
        if "LDM_RUN_NOW" in p.read_text() or "RUN_NOW_ENV" in p.read_text()
    ]
    assert readers == []  # only main.py, at the process boundary


def test_main_hands_the_run_name_to_the_ranks_it_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from main import RUN_NOW_ENV, run_name_shared_with_child_ranks

    monkeypatch.delenv(RUN_NOW_ENV, raising=False)
    monkeypatch.setattr(ldm.launch, "timestamp", lambda: NOW)
    spec = RunSpec(base=["toy.yaml"], logdir=tmp_path)
    (tmp_path / f"{NOW}_toy").mkdir()  # taken: the first process resolves the unique name once
    with run_name_shared_with_child_ranks(spec) as first:
        assert first.now == f"{NOW}-1" and os.environ[RUN_NOW_ENV] == f"{NOW}-1"
        assert dataclasses.replace(first, now=None) == spec
        # a rank started now (same argv, copy of the environment) joins that directory
        with run_name_shared_with_child_ranks(spec) as rank1:
            assert resolve_paths(rank1).run_dir == resolve_paths(first).run_dir
    assert RUN_NOW_ENV not in os.environ  # handed back: the next run in this process names itself
