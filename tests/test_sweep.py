"""Sweeps: a 2x2 grid runs 4 trials in their own run directories and writes a ranked summary."""

from __future__ import annotations

import csv
import logging
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).parent))  # toy_model

from ldm.launch import parse_args  # noqa: E402
from ldm.sweep import load_sweep, rank_rows, run_sweep, sample_trials  # noqa: E402
from ldm.util import ConfigError  # noqa: E402

CFG = Path(__file__).parent / "configs" / "cli"


def test_grid_sweep_runs_every_combination_and_ranks(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    opt, overrides = parse_args(
        [
            "--base",
            str(CFG / "toy.yaml"),
            "-t",
            "--no-test",
            "-l",
            str(tmp_path),
            "--trainer.max_steps",
            "8",
            "lightning.callbacks.image_logger=null",
            "--sweep",
            str(CFG / "sweep_grid.yaml"),
            "--sweep-backend",
            "ray",
        ]  # fmt: skip
    )
    with caplog.at_level(logging.INFO):
        rows = run_sweep(opt, overrides)
    if "ray" not in sys.modules:
        assert "ray is not installed" in caplog.text  # fell back to running here
    (sweep_dir,) = tmp_path.iterdir()
    assert sweep_dir.name.endswith("_sweep_grid_sweep")
    trial_dirs = sorted(p for p in sweep_dir.iterdir() if p.is_dir())
    assert len(trial_dirs) == 4 and all(
        p.name.split("_", 1)[1].startswith("trial") for p in trial_dirs
    )
    combos = set()
    for d in trial_dirs:  # each trial is a complete run directory with its own merged config
        (project,) = (d / "configs").glob("*-project.yaml")
        cfg = OmegaConf.load(project)
        combos.add((cfg.model.base_learning_rate, cfg.model.params.hidden))
        assert (d / "checkpoints" / "last.ckpt").exists()
    assert combos == {(1e-5, 4), (1e-5, 8), (1e-2, 4), (1e-2, 8)}
    table = list(csv.DictReader(open(sweep_dir / "summary.csv")))
    assert [int(r["rank"]) for r in table] == [1, 2, 3, 4]
    values = [float(r["train/loss"]) for r in table]
    assert values == sorted(values) and all(r["status"] == "ok" for r in table)
    # a 1000x larger learning rate (8 steps) fits better: the two 1e-2 trials rank first
    assert {float(r["model.base_learning_rate"]) for r in table[:2]} == {1e-2}
    md = (sweep_dir / "summary.md").read_text().splitlines()
    assert md[0].startswith(
        "| rank | trial | model.base_learning_rate | model.params.hidden | train/loss"
    )
    assert len(md) == 2 + 4 and rows[0]["value"] == pytest.approx(values[0])


def test_random_sampling_is_seeded_and_bounded(tmp_path: Path) -> None:
    spec_file = tmp_path / "rand.yaml"
    spec_file.write_text(
        "method: random\ntrials: 20\nseed: 3\nparameters:\n"
        "  a: {distribution: log_uniform, min: 1.0e-5, max: 1.0e-3}\n"
        "  b: {distribution: int_uniform, min: 2, max: 4}\n  c: [x, y]\n"
    )
    spec = load_sweep(spec_file)
    t1, t2 = sample_trials(spec), sample_trials(spec)
    assert t1 == t2 and len(t1) == 20
    assert all(1e-5 <= t["a"] <= 1e-3 and t["b"] in (2, 3, 4) and t["c"] in ("x", "y") for t in t1)
    assert len({t["b"] for t in t1}) == 3  # all integer values drawn in 20 trials


def test_bad_sweep_files(tmp_path: Path) -> None:
    f = tmp_path / "s.yaml"
    f.write_text("methd: grid\nparameters: {a: [1]}\n")
    with pytest.raises(ConfigError, match="unknown key 'methd'.*did you mean 'method'"):
        load_sweep(f)
    f.write_text("method: grid\nparameters: {a: {distribution: uniform, min: 0, max: 1}}\n")
    with pytest.raises(ConfigError, match="needs method: random"):
        load_sweep(f)
    f.write_text("method: random\nparameters: {a: [1]}\n")
    with pytest.raises(ConfigError, match="random sampling needs an integer number of trials"):
        load_sweep(f)


def test_ranking_puts_failed_trials_last() -> None:
    rows = [{"trial": 0, "value": None}, {"trial": 1, "value": 2.0}, {"trial": 2, "value": 1.0}]
    assert [r["trial"] for r in rank_rows(rows, "min")] == [2, 1, 0]
    assert [r["trial"] for r in rank_rows(rows, "max")] == [1, 2, 0]
