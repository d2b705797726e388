"""Resume after SIGKILL: same step count, same weights as an uninterrupted run of the same seed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

from ldm.launch import run  # noqa: E402
from ldm.launch_cli import parse_command  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CFG = ROOT / "tests" / "configs" / "cli" / "toy.yaml"
# 12 steps = 1.5 epochs of 8 batches; checkpoints every 2 steps; the killed run dies after step 7,
# so it resumes mid-epoch from step 6 and must continue with the same batches and noise draws
COMMON = ["--base", str(CFG), "-t", "--no-test", "--trainer.max_steps", "12"]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["state_dict"]


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path: Path) -> None:
    full = run(parse_command([*COMMON, "-l", str(tmp_path / "full")]).spec)
    assert full.global_step == 12

    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests" / "fixtures")])
    )
    killer = [
        "lightning.callbacks.killer.target=toy_model.KillAtStep",
        "lightning.callbacks.killer.params.step=7",
    ]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "main.py"), *COMMON, "-l", str(tmp_path / "killed"), *killer],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    (logdir,) = (tmp_path / "killed").iterdir()
    assert torch.load(logdir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6
    step6 = _weights(logdir / "checkpoints" / "last.ckpt")

    resumed = run(
        parse_command(
            ["-r", str(logdir), "-t", "--no-test", "lightning.callbacks.killer=null"]
        ).spec
    )
    assert resumed.run_dir == logdir  # continues in the same run directory
    assert resumed.global_step == 12
    assert len(list((logdir / "configs").glob("*-project.yaml"))) == 2  # one per launch
    a, b = _weights(full.last_ckpt), _weights(logdir / "checkpoints" / "last.ckpt")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    # and the resumed run trained past the checkpoint: weights moved between step 6 and 12
    assert max((step6[k] - b[k]).abs().max().item() for k in b) > 1e-4


def test_extend_a_finished_run_from_its_checkpoint_file(tmp_path: Path) -> None:
    """A run that stopped at max_steps=3 (mid-epoch, off the save period) continued to 11 steps
    equals an 11-step run: last.ckpt is written at the final step, before the epoch is closed."""
    full = run(parse_command([*COMMON[:-1], "11", "-l", str(tmp_path / "full")]).spec)
    first = run(parse_command([*COMMON[:-1], "3", "-l", str(tmp_path / "short")]).spec)
    ckpt = first.run_dir / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=True)["global_step"] == 3
    again = run(
        parse_command(["-r", str(ckpt), "-t", "--no-test", "--trainer.max_steps", "11"]).spec
    )
    assert again.run_dir == first.run_dir and again.global_step == 11
    a, b = _weights(full.last_ckpt), _weights(again.last_ckpt)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_resume_errors(tmp_path: Path) -> None:
    import pytest

    from ldm.util import ConfigError

    with pytest.raises(ConfigError, match="no such file or directory"):
        run(parse_command(["-r", str(tmp_path / "nope"), "-t"]).spec)
    # a checkpoint holding arbitrary pickled objects is refused with an explanation
    short = run(parse_command([*COMMON[:-1], "1", "-l", str(tmp_path / "pickled")]).spec)
    state = torch.load(short.last_ckpt, weights_only=True)
    state["hyper_parameters"] = {"opt": __import__("argparse").Namespace(a=1)}
    torch.save(state, short.last_ckpt)
    with pytest.raises(ConfigError, match="pickled Python objects that safe loading"):
        run(parse_command(["-r", str(short.run_dir), "-t", "--trainer.max_steps", "2"]).spec)
    empty = tmp_path / "empty_run"
    (empty / "checkpoints").mkdir(parents=True)
    with pytest.raises(ConfigError, match="last.ckpt does not exist"):
        run(parse_command(["-r", str(empty), "-t"]).spec)


def test_refused_resume_leaves_the_run_configs_unchanged(tmp_path: Path) -> None:
    """A -r launch whose config does not fit the checkpoint saves no config into the run: the
    next plain -r merges the run's configs/ and must still fit."""
    import pytest

    from ldm.util import ConfigError

    first = run(parse_command([*COMMON[:-1], "2", "-l", str(tmp_path)]).spec)
    configs = first.run_dir / "configs"
    before = sorted(p.name for p in configs.iterdir())
    wider = tmp_path / "wider.yaml"
    wider.write_text("model:\n  params:\n    hidden: 16\n")
    resume = ["-r", str(first.run_dir), "-t", "--no-test"]
    with pytest.raises(ConfigError, match="weights do not fit"):
        run(parse_command([*resume, "--base", str(wider), "--trainer.max_steps", "4"]).spec)
    assert sorted(p.name for p in configs.iterdir()) == before
    again = run(parse_command([*resume, "--trainer.max_steps", "4"]).spec)
    assert again.global_step == 4
    assert len(list(configs.glob("*-project.yaml"))) == len(before) // 2 + 1


def test_resume_without_t_says_nothing_was_trained(tmp_path: Path, caplog) -> None:  # noqa: ANN001
    import logging

    first = run(parse_command([*COMMON[:-1], "2", "-l", str(tmp_path)]).spec)
    with caplog.at_level(logging.WARNING):
        again = run(parse_command(["-r", str(first.run_dir)]).spec)
    assert again.global_step == 0  # CompVis semantics: no -t, no training step
    assert "add -t to continue training this run" in caplog.text
