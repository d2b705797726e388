"""Sweeps on Ray Tune (ldm.sweep_ray): ASHA stops a trial early, a crashing trial is recorded on
both backends, an interrupted sweep resumes, Optuna proposes trials, a two-node Ray cluster runs
trials on both nodes."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from ldm.launch_cli import parse_command
from ldm.sweep import PROGRESS_FILE, run_sweep

ray = pytest.importorskip("ray")  # the `sweep` extra (in the test extra)

CFG = Path(__file__).parent / "configs" / "cli"


@pytest.fixture(scope="module")
def local_ray():
    """One Ray instance for the tests of this module (starting Ray takes seconds)."""
    from ldm.sweep_ray import init_ray

    init_ray()
    yield
    ray.shutdown()


def _command(tmp_path: Path, sweep: Path, backend: str = "ray", *extra: str):
    return parse_command(
        [
            "--base",
            str(CFG / "toy.yaml"),
            "-t",
            "--no-test",
            "-l",
            str(tmp_path / "logs"),
            "--trainer.max_steps",
            "12",
            "--trainer.val_check_interval",
            "2",
            "lightning.callbacks.image_logger=null",
            "--sweep",
            str(sweep),
            "--sweep-backend",
            backend,
            *extra,
        ]  # fmt: skip
    )


def _sweep_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    return path


def _summary(tmp_path: Path) -> list[dict[str, str]]:
    (sweep_dir,) = (tmp_path / "logs").iterdir()
    return list(csv.DictReader(open(sweep_dir / "summary.csv")))


def test_asha_stops_a_trial_early_and_the_summary_is_written(tmp_path: Path, local_ray) -> None:
    sweep = _sweep_file(
        tmp_path,
        """
metric: val/loss
mode: min
cpus_per_trial: 1
max_concurrent: 1          # one after another: later, worse trials meet the earlier results
scheduler: {type: asha, max_t: 20, grace_period: 1, reduction_factor: 2}
parameters:
  model.base_learning_rate: [1.0e-2, 1.0e-6]
  model.params.hidden: [4, 8]
""",
    )
    command = _command(tmp_path, sweep)
    rows = run_sweep(command.spec, command.sweep, backend="ray")
    table = _summary(tmp_path)
    assert len(rows) == len(table) == 4
    stopped = [r for r in table if r["status"].startswith("stopped early")]
    done = [r for r in table if r["status"] == "ok"]
    assert stopped and done, [r["status"] for r in table]
    # the slow learners (lr 1e-6) do not get through; the first trial (nothing to compare with
    # at its rungs) runs to the end and ranks first
    assert {float(r["model.base_learning_rate"]) for r in done} == {1e-2}
    assert 1e-6 in {float(r["model.base_learning_rate"]) for r in stopped}
    assert all(int(r["steps"]) < 12 for r in stopped) and all(int(r["steps"]) == 12 for r in done)
    assert table[0]["status"] == "ok"
    assert [int(r["rank"]) for r in table] == [1, 2, 3, 4]
    assert all(Path(r["run_dir"]).is_dir() for r in table)  # normal run directories
    (sweep_dir,) = (tmp_path / "logs").iterdir()
    assert len((sweep_dir / PROGRESS_FILE).read_text().splitlines()) == 4


@pytest.mark.parametrize("backend", ["local", "ray"])
def test_a_crashing_trial_is_recorded_and_the_sweep_goes_on(
    tmp_path: Path, backend: str, local_ray
) -> None:
    sweep = _sweep_file(
        tmp_path,
        "metric: train/loss\nparameters:\n  model.params.hidden: [4, -3]\n",
    )
    command = _command(tmp_path, sweep, backend)
    run_sweep(command.spec, command.sweep, backend=backend)
    table = _summary(tmp_path)
    by_hidden = {r["model.params.hidden"]: r for r in table}
    assert by_hidden["4"]["status"] == "ok" and by_hidden["4"]["rank"] == "1"
    assert by_hidden["-3"]["status"].startswith("failed") and by_hidden["-3"]["rank"] == "2"


def test_an_interrupted_sweep_resumes_with_only_the_missing_trials(
    tmp_path: Path, local_ray
) -> None:
    sweep = _sweep_file(
        tmp_path, "metric: train/loss\nparameters:\n  model.params.hidden: [2, 4, 8]\n"
    )
    command = _command(tmp_path, sweep, "local")
    run_sweep(command.spec, command.sweep, backend="local")
    (sweep_dir,) = (tmp_path / "logs").iterdir()
    progress = sweep_dir / PROGRESS_FILE
    lines = progress.read_text().splitlines()
    progress.write_text("\n".join(lines[:2]) + "\n")  # as if killed during the third trial
    before = {p.name for p in sweep_dir.iterdir()}
    resumed = _command(tmp_path, sweep, "ray", "--sweep-resume", str(sweep_dir))
    rows = run_sweep(resumed.spec, resumed.sweep, backend="ray", resume=resumed.sweep_resume)
    assert sorted(r["trial"] for r in rows) == [0, 1, 2]
    new = {p.name for p in sweep_dir.iterdir()} - before
    assert len([n for n in new if "_trial02" in n]) == 1 and not any("_trial00" in n for n in new)
    assert [json.loads(x)["trial"] for x in progress.read_text().splitlines()] == [0, 1, 2]


@pytest.mark.slow
def test_optuna_search_proposes_the_trials(tmp_path: Path, local_ray) -> None:
    sweep = _sweep_file(
        tmp_path,
        """
method: random
trials: 3
metric: val/loss
search: {type: optuna, seed: 0}
parameters:
  model.base_learning_rate: {distribution: log_uniform, min: 1.0e-4, max: 1.0e-2}
""",
    )
    command = _command(tmp_path, sweep)
    rows = run_sweep(command.spec, command.sweep, backend="ray")
    assert len(rows) == 3 and all(r["status"] == "ok" for r in rows)
    lrs = [float(r["model.base_learning_rate"]) for r in rows]
    assert all(1e-4 <= lr <= 1e-2 for lr in lrs) and len(set(lrs)) == 3


@pytest.mark.slow
def test_two_node_ray_cluster_runs_trials_on_both_nodes(tmp_path: Path) -> None:
    from ray.cluster_utils import Cluster

    ray.shutdown()  # this test starts its own two-node cluster
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    try:
        sweep = _sweep_file(
            tmp_path,
            "metric: train/loss\ncpus_per_trial: 1\nparameters:\n  model.params.hidden: [4, 8]\n",
        )
        command = _command(tmp_path, sweep, "ray", "--ray-address", cluster.address)
        rows = run_sweep(command.spec, command.sweep, backend="ray", address=cluster.address)
        assert all(r["status"] == "ok" for r in rows)
        assert len({r["node"] for r in rows}) == 2  # one trial on each node
    finally:
        ray.shutdown()
        cluster.shutdown()
