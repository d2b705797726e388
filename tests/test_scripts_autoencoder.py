"""Behaviour of scripts/train_autoencoder.py, eval_autoencoder.py and export_first_stage.py.

Each script runs tiny in a subprocess (tiny shapes KL-f4, a few steps / crops) and its reported
numbers are recomputed here independently (scikit-image PSNR/SSIM, the judge, the weights).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from ldm.util import instantiate_from_config

ROOT = Path(__file__).resolve().parents[1]
KEEP = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")


def tiny_config(tmp_path: Path) -> Path:
    """configs/autoencoder/shapes-kl-f4.yaml shrunk: ch 8, batch 4, short datasets, log every step."""
    cfg = OmegaConf.load(ROOT / "configs/autoencoder/shapes-kl-f4.yaml")
    cfg.model.params.ddconfig.ch = 8
    cfg.model.params.ddconfig.norm_num_groups = 4
    cfg.data.params.batch_size = 4
    cfg.data.params.train.params.length = 64
    cfg.data.params.validation.params.length = 4
    cfg.lightning.trainer = {"log_every_n_steps": 1, "num_sanity_val_steps": 0}
    del cfg.lightning.callbacks
    path = tmp_path / "tiny-kl-f4.yaml"
    OmegaConf.save(cfg, path)
    return path


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / script), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def build(config: Path, ckpt: str | None = None) -> torch.nn.Module:
    cfg = OmegaConf.load(config)
    if ckpt is not None:
        cfg.model.params.ckpt_path = ckpt
    return instantiate_from_config(cfg.model).eval()


def random_ckpt(tmp_path: Path, config: Path, seed: int = 1) -> tuple[Path, torch.nn.Module]:
    """A Lightning-style checkpoint ({"state_dict": ...}) of a randomly initialised model."""
    torch.manual_seed(seed)
    model = build(config)
    path = tmp_path / f"random-{seed}.ckpt"
    torch.save({"state_dict": model.state_dict()}, path)
    return path, model


def skimage_scores(x: torch.Tensor, xrec: torch.Tensor) -> tuple[float, float]:
    """Mean PSNR / SSIM of [-1, 1] batches by scikit-image (data_range 2, 7x7 uniform window)."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    p, s = [], []
    for a, b in zip(
        x.permute(0, 2, 3, 1).double().numpy(), xrec.permute(0, 2, 3, 1).double().numpy()
    ):
        p.append(peak_signal_noise_ratio(a, b, data_range=2.0))
        s.append(structural_similarity(a, b, data_range=2.0, channel_axis=-1, win_size=7))
    return float(np.mean(p)), float(np.mean(s))


@torch.no_grad()
def photo_reconstructions(model: torch.nn.Module, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The held-out crops evaluate_reconstruction uses (size 64, seed 4321) and their reconstructions."""
    from ldm.data.photos import PhotoCropsValidation

    ds = PhotoCropsValidation(size=64, length=n, seed=4321)
    x = torch.stack([torch.from_numpy(ds[j]["image"]) for j in range(n)]).permute(0, 3, 1, 2)
    return x, model.reconstruct(x)[0].clamp(-1, 1)


def test_train_autoencoder_trains_saves_and_reports_true_scores(tmp_path):
    config = tiny_config(tmp_path)
    out = tmp_path / "run"
    steps = 8
    r = run(
        "train_autoencoder.py",
        "--config", str(config), "--out", str(out), "--max-steps", str(steps),
        "--eval-crops", "4", "--no-val", "--threads", "1", "--seed", "0",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = torch.load(out / "last.ckpt", map_location="cpu", weights_only=False)
    result = json.loads((out / "result.json").read_text())

    # it stopped at --max-steps and the learning rate is base_lr * batch_size (CompVis scaling)
    assert ckpt["global_step"] == steps
    assert result["generator_steps"] == steps
    lr = ckpt["optimizer_states"][0]["param_groups"][0]["lr"]
    assert lr == pytest.approx(2.0e-5 * 4)

    # the weights moved from the seeded initialisation
    torch.manual_seed(0)
    import pytorch_lightning as pl

    pl.seed_everything(0, workers=True)
    init = build(config).state_dict()
    sd = ckpt["state_dict"]
    assert set(init) <= set(sd)
    moved = [k for k in init if k.startswith("decoder.") and not torch.equal(init[k], sd[k])]
    assert len(moved) > 0.5 * len([k for k in init if k.startswith("decoder.")])

    # the logged training reconstruction loss fell over the steps
    rows = list(csv.DictReader(next(out.rglob("metrics.csv")).open()))
    key = next(k for k in rows[0] if "rec_loss" in k and k.startswith("train"))
    losses = [float(row[key]) for row in rows if row.get(key)]
    assert len(losses) >= steps // 2
    assert np.mean(losses[-2:]) < np.mean(losses[:2])

    # the reported PSNR/SSIM are those of the saved weights, recomputed by scikit-image
    model = build(config, str(out / "last.ckpt"))
    x, xrec = photo_reconstructions(model, 4)
    p, s = skimage_scores(x, xrec)
    assert result["n_crops"] == 4
    assert result["psnr_db"] == pytest.approx(p, abs=2e-3)
    assert result["ssim"] == pytest.approx(s, abs=2e-4)
    # (a script that ignored --ckpt would score a differently seeded init and miss these values)


def test_eval_autoencoder_reports_scikit_image_psnr_ssim(tmp_path):
    config = tiny_config(tmp_path)
    ckpt, model = random_ckpt(tmp_path, config)
    r = run("eval_autoencoder.py", "--config", str(config), "--ckpt", str(ckpt), "--crops", "6")
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    x, xrec = photo_reconstructions(model, 6)
    p, s = skimage_scores(x, xrec)
    assert result["n_crops"] == 6
    assert result["psnr_db"] == pytest.approx(p, abs=2e-3)
    assert result["ssim"] == pytest.approx(s, abs=2e-4)
    # (a script that ignored --ckpt would score a differently seeded init and miss these values)
