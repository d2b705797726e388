"""Two "nodes" on this machine (torchrun --nnodes 2, one process each, gloo on 127.0.0.1) train
the toy config with DDP and end with identical weights on every rank."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CFG = ROOT / "tests" / "configs" / "cli" / "toy.yaml"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_with_torchrun_end_with_identical_weights(tmp_path: Path) -> None:
    dump = tmp_path / "weights"
    port = _free_port()
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests" / "fixtures")]),
        LDM_RUN_NOW="2026-01-01T00-00-00",  # the same run directory name on both nodes
        OMP_NUM_THREADS="1",
    )
    procs = []
    for node in range(2):
        args = [
            sys.executable, "-m", "torch.distributed.run",
            "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(node),
            "--master-addr", "127.0.0.1", "--master-port", str(port),
            str(ROOT / "main.py"), "--base", str(CFG), "-t", "--no-test",
            "-l", str(tmp_path / f"logs-node{node}"),
            "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.num_nodes", "2",
            "--trainer.strategy", "ddp", "--trainer.max_steps", "4",
            "lightning.callbacks.image_logger=null",
            "lightning.callbacks.dump.target=toy_model.WeightDump",
            f"lightning.callbacks.dump.params.folder={dump}",
        ]  # fmt: skip
        procs.append(
            subprocess.Popen(
                args,
                env=env,
                cwd=tmp_path,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outs = [p.communicate(timeout=400)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
    w0, w1 = torch.load(dump / "rank0.pt"), torch.load(dump / "rank1.pt")
    for k in w0:
        torch.testing.assert_close(w0[k], w1[k], rtol=0, atol=0, msg=k)
    seen0, seen1 = torch.load(dump / "seen0.pt"), torch.load(dump / "seen1.pt")
    assert len(seen0) == len(seen1) == 16 and not set(seen0) & set(seen1)  # the data was split
    # only global rank 0 (node 0) writes the run directory
    assert (tmp_path / "logs-node0").is_dir() and not (tmp_path / "logs-node1").exists()
