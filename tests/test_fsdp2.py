"""FSDP2 (`lightning.trainer.strategy: fsdp2`, Lightning's ModelParallelStrategy + fully_shard) on
two CPU processes with gloo: the same weights and EMA as DDP after the same steps, a consolidated
checkpoint that ldm.load_model reads, and a resumed sharded run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _train(tmp_path: Path, name: str, strategy: str, steps: int, *extra: str) -> Path:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env.pop("LDM_RUN_NOW", None)
    args = [
        sys.executable, str(ROOT / "main.py"), "--base", str(ROOT / "configs" / "txt2img.yaml"),
        "-t", "--no-test", "-l", str(tmp_path / name), "--seed", "5",
        "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", strategy,
        "--trainer.max_steps", str(steps), "data.params.batch_size=4",
        "model.params.unet_config.params.model_channels=32",
        "model.params.unet_config.params.num_head_channels=16",
        "lightning.callbacks.image_logger.params.disabled=true",
        "lightning.callbacks.shapes_evaluation=null", *extra,
    ]  # fmt: skip
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=500, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (run_dir,) = (tmp_path / name).iterdir()
    return run_dir


def _state(run_dir: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    return ckpt["state_dict"]


@pytest.mark.slow
def test_fsdp2_matches_ddp_writes_a_loadable_checkpoint_and_resumes(tmp_path: Path) -> None:
    ddp = _state(_train(tmp_path, "ddp", "ddp", 3))
    fsdp_dir = _train(tmp_path, "fsdp", "fsdp2", 3)
    fsdp = _state(fsdp_dir)
    assert set(fsdp) == set(ddp)  # one full state dict, the same keys as an unsharded run
    trained = [k for k in ddp if k.startswith(("model.", "model_ema.", "cond_stage_model."))]
    assert any(k.startswith("model_ema.diffusion_model") for k in trained)
    for k in trained:
        torch.testing.assert_close(fsdp[k], ddp[k], rtol=1e-4, atol=1e-5, msg=k)
    # the frozen first stage is the shipped one, whole
    torch.testing.assert_close(
        fsdp["first_stage_model.decoder.conv_out.weight"],
        ddp["first_stage_model.decoder.conv_out.weight"],
        rtol=0,
        atol=0,
    )
    import ldm

    (project,) = (fsdp_dir / "configs").glob("*-project.yaml")
    model = ldm.load_model(str(fsdp_dir / "checkpoints" / "last.ckpt"), config=str(project))
    key = "model.diffusion_model.out.2.weight"
    torch.testing.assert_close(model.state_dict()[key], fsdp[key])
    # resume the sharded run for 2 more steps
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    env.pop("LDM_RUN_NOW", None)
    args = [
        sys.executable, str(ROOT / "main.py"), "-r", str(fsdp_dir), "-t", "--no-test",
        "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "fsdp2",
        "--trainer.max_steps", "5",
    ]  # fmt: skip
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=500, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ckpt = torch.load(fsdp_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 5
    assert not torch.equal(ckpt["state_dict"][key], fsdp[key])
