"""Train a first-stage autoencoder from a config with a plain Lightning Trainer, then evaluate it.

Example (the issue-4 acceptance run, CPU, at most 10 minutes of training):
    python scripts/train_autoencoder.py --config configs/autoencoder/kl-f4-small.yaml \
        --max-minutes 10 --out logs/kl-f4-small
It reads the `model` and `data` sections (CompVis format), sets model.learning_rate from
base_learning_rate * batch_size * accumulate_grad_batches (CompVis scaling, one device), trains until the time
limit, saves `last.ckpt`, and reports PSNR/SSIM on the held-out validation photos.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf

from ldm.models.autoencoder_eval import evaluate_reconstruction
from ldm.util import instantiate_from_config

logger = logging.getLogger("train_autoencoder")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--out", default="logs/autoencoder")
    ap.add_argument("--max-minutes", type=float, default=10.0)
    ap.add_argument("--max-steps", type=int, default=-1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave default)")
    ap.add_argument("--eval-crops", type=int, default=256)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    pl.seed_everything(args.seed, workers=True)
    cfg = OmegaConf.load(args.config)
    model = instantiate_from_config(cfg.model)
    data = instantiate_from_config(cfg.data)
    bs = int(cfg.data.params.batch_size)
    model.learning_rate = float(cfg.model.base_learning_rate) * bs * model.accumulate_grad_batches
    logger.info("learning rate %.3g", model.learning_rate)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    trainer_cfg = OmegaConf.to_container(cfg.get("lightning", {}).get("trainer", {}), resolve=True) or {}
    trainer_cfg.pop("benchmark", None)
    trainer = pl.Trainer(
        accelerator="auto",
        devices=1,
        max_time={"minutes": args.max_minutes},
        max_steps=args.max_steps,
        default_root_dir=str(out),
        logger=pl.loggers.CSVLogger(str(out)),
        enable_checkpointing=False,
        **trainer_cfg,
    )
    t0 = time.time()
    trainer.fit(model, data)
    wall = time.time() - t0
    trainer.save_checkpoint(out / "last.ckpt")
    result = evaluate_reconstruction(model, n_crops=args.eval_crops)
    result.update(train_wall_s=round(wall, 1), generator_steps=model.generator_step, config=args.config)
    (out / "result.json").write_text(json.dumps(result, indent=2))
    logger.info("RESULT %s", json.dumps(result))


if __name__ == "__main__":
    main()
