"""Kill-and-resume loops: a training run SIGKILLed at random points (in a batch, from a timer
thread, halfway through writing a checkpoint), resumed each time, ends with weights bit-equal to
an uninterrupted run, and no checkpoint it left is corrupt.

Each round starts ``main.py`` in a subprocess with the ``chaos.ChaosKill`` callback (seeded, so
a failing round can be replayed). A round killed before its first checkpoint starts the run over;
in the slow loop some rounds also cut ``last.ckpt`` short after the kill (a copy that stopped
midway), which the resume must notice and get past by using an older checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from ldm.launch import run
from ldm.launch_cli import parse_command
from ldm.resume_fallback import checkpoint_problem

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

ROOT = Path(__file__).resolve().parents[2]
TOY = str(ROOT / "tests" / "configs" / "cli" / "toy.yaml")
STEPS = 16
# every checkpoint kept (an older one to fall back to), saved every 2 steps
COMMON = ["-t", "--no-test", "lightning.callbacks.image_logger=null",
          "lightning.modelcheckpoint.params.save_top_k=-1"]  # fmt: skip
ENV = dict(
    os.environ,
    PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests" / "fixtures")]),
    OMP_NUM_THREADS="1",
)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    logdir = tmp_path_factory.mktemp("full")
    argv = ["-b", TOY, *COMMON, "-l", str(logdir), "--trainer.max_steps", str(STEPS)]
    result = run(parse_command(argv).spec)
    assert result.global_step == STEPS
    return _weights(result.last_ckpt)


def _main(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "main.py"), *args],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _chaos(seed: int, record: Path, max_offset: int = STEPS) -> list[str]:
    key = "lightning.callbacks.chaos"
    return [f"{key}.target=chaos.ChaosKill", f"{key}.params.seed={seed}",
            f"{key}.params.max_offset={max_offset}", f"{key}.params.record={record}"]  # fmt: skip


def kill_and_resume(
    logdir: Path, seed: int, rounds: int, figures: Counter, damage: float = 0.0
) -> Path:
    """Up to ``rounds`` killed launches, then a last one without kills; the run directory."""
    rng = random.Random(seed)
    record = logdir.parent / f"kills-{seed}.jsonl"
    cut: dict[Path, bytes] = {}  # files the harness damaged on purpose -> their bytes then
    for _ in range(rounds):
        run_dirs = sorted(logdir.iterdir()) if logdir.is_dir() else []
        resumable = bool(run_dirs) and any((run_dirs[0] / "checkpoints").glob("*.ckpt"))
        if run_dirs and not resumable:  # killed before its first checkpoint: start over
            shutil.rmtree(run_dirs[0])
            figures["kill-and-resume: restarts (killed before the first checkpoint)"] += 1
        start = ["-r", str(run_dirs[0])] if resumable else ["-b", TOY, "-l", str(logdir)]
        proc = _main([*start, *COMMON, "--trainer.max_steps", str(STEPS),
                      *_chaos(rng.randrange(2**31), record, STEPS // 3)])  # fmt: skip
        assert proc.returncode in (0, -signal.SIGKILL), proc.stderr[-3000:]
        (run_dir,) = logdir.iterdir()
        _count_checkpoints(run_dir, figures, cut)
        if proc.returncode == 0:
            figures["kill-and-resume: rounds that ran to the end"] += 1
            break
        figures["kill-and-resume: SIGKILLs"] += 1
        last = run_dir / "checkpoints" / "last.ckpt"
        others = [p for p in (run_dir / "checkpoints").glob("*.ckpt") if p != last]
        if damage and last.is_file() and others and rng.random() < damage:
            data = last.read_bytes()  # as if a copy of the run stopped midway
            last.write_bytes(data[: rng.randrange(len(data))])
            cut[last] = last.read_bytes()
            figures["kill-and-resume: last.ckpt cut short on purpose"] += 1
    else:
        (run_dir,) = logdir.iterdir()
        if any((run_dir / "checkpoints").glob("*.ckpt")):
            proc = _main(["-r", str(run_dir), *COMMON, "lightning.callbacks.chaos=null"])
        else:
            shutil.rmtree(run_dir)
            proc = _main(["-b", TOY, "-l", str(logdir), *COMMON, "--trainer.max_steps", str(STEPS)])
        assert proc.returncode == 0, proc.stderr[-3000:]
        (run_dir,) = logdir.iterdir()
    partial = list((run_dir / "checkpoints").glob(".*.tmp"))
    assert partial == [], f"partial writes left after the resume: {partial}"
    if record.is_file():
        for line in record.read_text().splitlines():
            figures[f"kill-and-resume: kills in phase {json.loads(line)['phase']}"] += 1
    return run_dir


def _count_checkpoints(
    run_dir: Path, figures: Counter, cut: dict[Path, bytes] | None = None
) -> None:
    """Every checkpoint file a kill left is readable (temporary files of a cut write aside, and
    the files the harness cut on purpose while no launch has rewritten them)."""
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return
    for ckpt in folder.glob("*.ckpt"):
        if cut and ckpt in cut and ckpt.read_bytes() == cut[ckpt]:
            continue
        figures["kill-and-resume: checkpoints checked after a round"] += 1
        problem = checkpoint_problem(ckpt)
        if problem is not None:
            figures["kill-and-resume: corrupt checkpoints"] += 1
        assert problem is None, f"{ckpt}: {problem}"


def _assert_bit_equal(run_dir: Path, expected: dict[str, torch.Tensor], figures: Counter) -> None:
    last = run_dir / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == STEPS
    got = _weights(last)
    assert got.keys() == expected.keys()
    for k in expected:
        assert torch.equal(got[k], expected[k]), f"{k} differs from the uninterrupted run"
    figures["kill-and-resume: loops with final weights bit-equal"] += 1


def test_killed_while_writing_a_checkpoint_resumes_bit_exactly(uninterrupted, tmp_path, figures):
    """The fast case: one launch killed halfway through writing its step-4 checkpoint."""
    logdir = tmp_path / "logs"
    record = tmp_path / "kills.jsonl"
    seed = next(s for s in range(1000) if _phase(s) == ("checkpoint_write", 3))
    proc = _main(["-b", TOY, "-l", str(logdir), *COMMON, "--trainer.max_steps", str(STEPS),
                  *_chaos(seed, record)])  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert json.loads(record.read_text())["phase"] == "checkpoint_write"
    (run_dir,) = logdir.iterdir()
    folder = run_dir / "checkpoints"
    assert [p.name for p in folder.glob(".*.tmp")], "the kill was to land inside a write"
    _count_checkpoints(run_dir, figures)
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == 2
    resumed = run(
        parse_command(["-r", str(run_dir), *COMMON, "lightning.callbacks.chaos=null"]).spec
    )
    assert resumed.global_step == STEPS
    _assert_bit_equal(run_dir, uninterrupted, figures)
    assert list(folder.glob(".*.tmp")) == []  # the resume removed the partial write
    figures["kill-and-resume: SIGKILLs"] += 1
    figures["kill-and-resume: kills in phase checkpoint_write"] += 1


def _phase(seed: int) -> tuple[str, int]:
    from chaos import ChaosKill

    c = ChaosKill(seed, STEPS)
    return c.phase, c.offset


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(10))
def test_kill_and_resume_loop(seed, uninterrupted, tmp_path, figures) -> None:
    """Kills 0-5 steps after each (re)start: several kills per loop before 16 steps are done."""
    run_dir = kill_and_resume(tmp_path / "logs", seed, rounds=12, figures=figures, damage=0.3)
    _assert_bit_equal(run_dir, uninterrupted, figures)
