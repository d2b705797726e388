"""Training steps/s with and without the latent cache, on mixed-aspect photos with buckets.

    python benchmarks/bench_latent_cache.py [--steps 40] [--batch-size 16] [--size 32]

The model is configs/txt2img.yaml (the shipped KL-f4 first stage); the data a folder written by
``ldm.data.photo_folder`` (84 crops of scikit-image's photos in 7 aspect ratios). Each mode runs
in this process one after the other; the cached mode is timed with a warm cache (its one-off
encoding pass is reported separately). Prints a table of steps/s and the ratio.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf

from ldm.data.datamodule import DataModuleFromConfig
from ldm.data.photo_folder import write_photo_folder
from ldm.util import instantiate_from_config

ROOT = Path(__file__).resolve().parents[1]


def build(cache: Path | None, size: int):
    cfg = OmegaConf.load(ROOT / "configs" / "txt2img.yaml").model
    cfg.params.scale_by_std = False
    cfg.params.scale_factor = 1.0
    if cache is not None:
        cfg.params.cache_latents = {"dir": str(cache)}
    torch.manual_seed(0)
    model = instantiate_from_config(cfg)
    model.learning_rate = 1e-4
    return model


def data(root: Path, batch_size: int, size: int) -> DataModuleFromConfig:
    params = {"root": str(root), "size": size, "flip": True}
    return DataModuleFromConfig(
        batch_size=batch_size,
        num_workers=0,
        seed=0,
        train={"target": "ldm.data.folder.ImageFolderDataset", "params": params},
    )


def fit(model, dm, steps: int) -> float:
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--size", type=int, default=32)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "photos"
        write_photo_folder(root)
        cache = Path(tmp) / "cache"
        cold = fit(build(cache, args.size), data(root, args.batch_size, args.size), 1)  # encodes
        warm_1 = fit(build(cache, args.size), data(root, args.batch_size, args.size), 1)
        t_plain = fit(build(None, args.size), data(root, args.batch_size, args.size), args.steps)
        t_cache = fit(build(cache, args.size), data(root, args.batch_size, args.size), args.steps)
    plain = args.steps / t_plain
    cached = args.steps / t_cache  # includes the (cache-hit) setup pass
    print(f"CPU threads: {torch.get_num_threads()}, {args.steps} steps, batch {args.batch_size}")
    print("| mode | steps/s | ratio |")
    print("|---|---|---|")
    print(f"| images encoded every step | {plain:.2f} | 1.00 |")
    print(f"| cached latents (warm) | {cached:.2f} | {cached / plain:.2f} |")
    print(
        f"one-off encoding pass (168 entries) + 1 step: {cold:.1f} s; warm setup + 1 step: {warm_1:.1f} s"
    )


if __name__ == "__main__":
    main()
