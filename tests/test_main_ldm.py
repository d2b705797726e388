"""main.py with a tiny real LatentDiffusion (KL first stage, EMA): train, log images, resume."""

from __future__ import annotations

import csv
from pathlib import Path

import torch

from ldm.launch import run  # noqa: E402
from ldm.launch_cli import parse_command  # noqa: E402

CFG = Path(__file__).parent / "configs" / "cli" / "tiny_ldm.yaml"


def test_tiny_latent_diffusion_trains_logs_and_resumes(tmp_path: Path) -> None:
    args = ["--base", str(CFG), "-t", "--no-test", "-l", str(tmp_path)]
    first = run(parse_command([*args, "--trainer.max_steps", "2", "--trainer.val_check_interval", "2",
                             "lightning.callbacks.image_logger.params.batch_frequency=2"]).spec)  # fmt: skip
    assert first.global_step == 2
    state = torch.load(first.last_ckpt, weights_only=True)
    sd = state["state_dict"]
    assert (
        any(k.startswith("model_ema.") for k in sd) and "model.diffusion_model.out.2.weight" in sd
    )
    assert int(sd["model_ema.num_updates"]) == 2
    imgs = {p.name.split("_gs")[0] for p in (first.run_dir / "images" / "train").glob("*.png")}
    assert {"inputs", "reconstruction", "samples"} <= imgs
    rows = list(csv.DictReader(open(first.run_dir / "csv" / "metrics.csv")))
    assert any(r.get("val/loss_simple_ema") for r in rows)  # the model's monitor was logged
    assert first.best_ckpt and "step=000000002" in first.best_ckpt  # best-by-monitor checkpoint
    # resume (weights_only loading of a real model's checkpoint): EMA and step counters continue
    again = run(
        parse_command(
            ["-r", str(first.run_dir), "-t", "--no-test", "--trainer.max_steps", "3"]
        ).spec
    )
    assert again.run_dir == first.run_dir and again.global_step == 3
    sd2 = torch.load(again.last_ckpt, weights_only=True)["state_dict"]
    assert int(sd2["model_ema.num_updates"]) == 3
    assert not torch.equal(
        sd["model_ema.diffusion_modelout2weight"], sd2["model_ema.diffusion_modelout2weight"]
    )
