"""Sweeps: a 2x2 grid runs 4 trials in their own run directories and writes a ranked summary."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ldm.launch_cli import parse_command  # noqa: E402
from ldm.sweep import load_sweep, rank_rows, run_sweep, sample_trials  # noqa: E402
from ldm.util import ConfigError  # noqa: E402

CFG = Path(__file__).parent / "configs" / "cli"


def test_grid_sweep_runs_every_combination_and_ranks(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    command = parse_command(
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
        ]  # fmt: skip
    )  # the local backend (Ray Tune: tests/test_sweep_ray.py)
    with caplog.at_level(logging.INFO):
        rows = run_sweep(command.spec, command.sweep, backend=command.sweep_backend)
    (sweep_dir,) = tmp_path.iterdir()
    assert sweep_dir.name.endswith("_sweep_grid_sweep")
    trial_dirs = sorted(p for p in sweep_dir.iterdir() if p.is_dir() and "_trial" in p.name)
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


def test_sweep_runs_a_spec_per_trial_without_the_command_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From Python: the trials are RunSpecs derived from the given one; argparse is never used."""
    import argparse

    import ldm.sweep
    from ldm.run_spec import FINISHED, RunResult, RunSpec

    def no_parser(*args: object, **kwargs: object) -> None:
        raise AssertionError("the sweep built an argument parser")

    monkeypatch.setattr(argparse.ArgumentParser, "__init__", no_parser)
    ran: list[RunSpec] = []

    def fake_run(spec: RunSpec) -> RunResult:
        ran.append(spec)
        lr = float(spec.overrides[-2].split("=")[1])
        hidden = int(spec.overrides[-1].split("=")[1])
        run_dir = Path(spec.logdir) / f"now_{spec.name}"
        return RunResult(run_dir, FINISHED, None, {"train/loss": 1.0 / lr + hidden}, None,
                         None, None, 8, 0, 0.1, lr)  # fmt: skip

    monkeypatch.setattr(ldm.sweep, "run", fake_run)
    base = RunSpec(
        base=[CFG / "toy.yaml"],
        overrides=["lightning.trainer.max_steps=8"],
        train=True,
        name="mine",
        project="proj",
        postfix="_x",
        logdir=tmp_path,
        seed=7,
    )
    rows = run_sweep(base, CFG / "sweep_grid.yaml")
    (sweep_dir,) = (tmp_path / "proj").iterdir()
    assert sweep_dir.name.endswith("_mine_sweep")
    assert [s.name for s in ran] == ["trial00", "trial01", "trial02", "trial03"]
    for spec in ran:  # everything else comes from the given spec
        assert spec.logdir == str(sweep_dir) and spec.project is None and spec.postfix == ""
        assert (spec.base, spec.train, spec.seed) == (base.base, True, 7)
        assert spec.overrides[0] == "lightning.trainer.max_steps=8"
    assert [s.overrides[1:] for s in ran] == [
        ("model.base_learning_rate=1.0e-05", "model.params.hidden=4"),
        ("model.base_learning_rate=1.0e-05", "model.params.hidden=8"),
        ("model.base_learning_rate=0.01", "model.params.hidden=4"),
        ("model.base_learning_rate=0.01", "model.params.hidden=8"),
    ]
    assert [r["trial"] for r in rows] == [2, 3, 0, 1]  # ranked by the loss the runs returned
    assert rows[0]["run_dir"] == str(sweep_dir / "now_trial02")
    table = list(csv.DictReader(open(sweep_dir / "summary.csv")))
    assert [int(r["trial"]) for r in table] == [2, 3, 0, 1]
    with pytest.raises(ConfigError, match="cannot be combined with -r"):
        run_sweep(RunSpec(resume=tmp_path), CFG / "sweep_grid.yaml")


def _imports(path: Path) -> set[str]:
    """Modules a file imports (at module level or inside functions), absolute names."""
    import ast

    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def test_run_modules_import_in_one_direction() -> None:
    """main.py -> ldm.sweep -> ldm.launch -> ldm.run_spec; main.py -> ldm.launch_cli (argparse).
    No cycle passes through these modules (imports inside functions included)."""
    root = Path(__file__).resolve().parents[1]
    modules = {
        ".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): p
        for p in (root / "ldm").rglob("*.py")
    }
    graph = {}
    for name, path in modules.items():
        deps = set()
        for target in _imports(path):
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                deps.add(target)
        graph[name] = deps

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            for dep in graph[todo.pop()] - seen:
                if dep == goal:
                    return True
                seen.add(dep)
                todo.append(dep)
        return False

    ours = ["ldm.launch", "ldm.sweep", "ldm.launch_cli", "ldm.run_spec"]
    assert [m for m in ours if reaches(m, m)] == []  # on no import cycle
    assert "ldm.launch" in graph["ldm.sweep"] and not reaches("ldm.launch", "ldm.sweep")
    for name in ("ldm.launch", "ldm.sweep", "ldm.run_spec"):  # the library takes RunSpecs
        assert "argparse" not in _imports(modules[name]), name
        assert not reaches(name, "ldm.launch_cli"), name
    assert "ldm.launch_cli" in _imports(root / "main.py") and "argparse" not in _imports(
        root / "main.py"
    )
