"""Two-process DDP on CPU (gloo): identical weights on both ranks; only rank 0 writes files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CFG = ROOT / "tests" / "configs" / "cli" / "toy.yaml"


@pytest.mark.slow
def test_two_process_ddp_cpu(tmp_path: Path) -> None:
    dump, marks, dirs = tmp_path / "weights", tmp_path / "marks", tmp_path / "run_dirs"
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests" / "fixtures")])
    )
    env.pop("LDM_RUN_NOW", None)
    args = [
        sys.executable, str(ROOT / "main.py"), "--base", str(CFG), "-t", "--no-test",
        "-l", str(tmp_path / "logs"),
        "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
        "--trainer.max_steps", "4",
        "lightning.callbacks.dump.target=toy_model.WeightDump",
        f"lightning.callbacks.dump.params.folder={dump}",
        "lightning.callbacks.image_logger=null",
        "lightning.callbacks.ranked.target=toy_model.RankImageLogger",
        f"lightning.callbacks.ranked.params.folder={marks}",
        "lightning.callbacks.ranked.params.batch_frequency=2",
        "lightning.callbacks.ranked.params.max_images=2",
        "lightning.callbacks.run_dirs.target=toy_model.RunDirRecorder",
        f"lightning.callbacks.run_dirs.params.folder={dirs}",
        "lightning.callbacks.run_dirs.params.delay_s=1.1",
    ]  # fmt: skip
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=500, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    w0, w1 = torch.load(dump / "rank0.pt"), torch.load(dump / "rank1.pt")
    for k in w0:
        torch.testing.assert_close(w0[k], w1[k], rtol=0, atol=0, msg=k)
    # one run directory (both ranks agreed on its name), written by rank 0 only
    (logdir,) = (tmp_path / "logs").iterdir()
    assert (dirs / "rank0.txt").read_text() == (dirs / "rank1.txt").read_text() == str(logdir)
    assert len(list((logdir / "configs").glob("*.yaml"))) == 2
    assert sorted(p.name for p in marks.iterdir()) == ["images_rank0"]
    assert list((logdir / "images" / "train").glob("*.png"))
    # the lr rule saw 2 devices: 1 * 2 * 1 * 4 * 1e-3
    assert "learning rate 8.00e-03 = 1 (accumulate_grad_batches) * 2 (devices)" in proc.stderr
    assert torch.load(logdir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    # the ranks split the 32 items of the epoch between them: 4 steps x 4 items each, no overlap
    seen0, seen1 = set(torch.load(dump / "seen0.pt")), set(torch.load(dump / "seen1.pt"))
    assert len(seen0) == len(seen1) == 16 and not seen0 & seen1
