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

from ldm.malloc_policy import retain_freed_memory
from ldm.models.autoencoder_eval import evaluate_reconstruction
from ldm.util import instantiate_from_config

logger = logging.getLogger("train_autoencoder")


class Budget(pl.Callback):
    """Stop at a process-CPU-time budget; evaluate held-out PSNR/SSIM when wall time passes marks.

    On a shared machine the wall clock says little about the compute a run got: CPU seconds
    (all threads of this process) measure it. Evaluation time is excluded from the CPU budget.
    """

    def __init__(
        self,
        cpu_seconds: float | None,
        eval_at_wall_s: list[float],
        n_crops: int,
        eval_at_cpu_s: list[float] = (),
    ) -> None:
        self.cpu_seconds = cpu_seconds
        self.marks = sorted(eval_at_wall_s)
        self.cpu_marks = sorted(eval_at_cpu_s)
        self.n_crops = n_crops
        self.results: list[dict] = []
        self.eval_cpu = 0.0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.t0, self.c0 = time.time(), time.process_time()

    def _train_cpu(self) -> float:
        return time.process_time() - self.c0 - self.eval_cpu

    def _evaluate(self, pl_module: pl.LightningModule, wall: float, **mark: float) -> None:
        c = time.process_time()
        r = evaluate_reconstruction(pl_module, n_crops=self.n_crops)
        self.eval_cpu += time.process_time() - c
        r.update(
            wall_s=round(wall, 1),
            train_cpu_s=round(self._train_cpu(), 1),
            generator_steps=pl_module.generator_step,
            **mark,
        )
        logger.info("EVAL %s", json.dumps(r))
        self.results.append(r)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        wall = time.time() - self.t0
        while self.marks and wall >= self.marks[0]:
            self._evaluate(pl_module, wall, mark_wall_s=self.marks.pop(0))
        while self.cpu_marks and self._train_cpu() >= self.cpu_marks[0]:
            self._evaluate(pl_module, wall, mark_cpu_s=self.cpu_marks.pop(0))
        if self.cpu_seconds is not None and self._train_cpu() >= self.cpu_seconds:
            logger.info("CPU budget of %.0f s reached after %.0f s wall.", self.cpu_seconds, wall)
            trainer.should_stop = True


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--config", required=True)
    ap.add_argument("--out", default="logs/autoencoder")
    ap.add_argument("--max-minutes", type=float, default=10.0)
    ap.add_argument("--max-steps", type=int, default=-1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave default)")
    ap.add_argument("--eval-crops", type=int, default=256)
    ap.add_argument(
        "--no-val", action="store_true", help="skip validation epochs (max training compute)"
    )
    ap.add_argument(
        "--max-cpu-minutes",
        type=float,
        default=None,
        help="also stop when this process has used this much CPU time (all threads)",
    )
    ap.add_argument(
        "--eval-at-minutes",
        type=float,
        nargs="*",
        default=[],
        help="evaluate held-out PSNR/SSIM when these wall-clock minutes have passed",
    )
    ap.add_argument(
        "--eval-at-cpu-minutes",
        type=float,
        nargs="*",
        default=[],
        help="evaluate held-out PSNR/SSIM when training has used this much CPU time",
    )
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
    trainer_cfg = (
        OmegaConf.to_container(cfg.get("lightning", {}).get("trainer", {}), resolve=True) or {}
    )
    trainer_cfg.pop("benchmark", None)
    if args.no_val:
        trainer_cfg["limit_val_batches"] = 0
    budget = Budget(
        None if args.max_cpu_minutes is None else 60 * args.max_cpu_minutes,
        [60 * m for m in args.eval_at_minutes],
        args.eval_crops,
        [60 * m for m in args.eval_at_cpu_minutes],
    )
    trainer = pl.Trainer(
        callbacks=[budget],
        accelerator="auto",
        devices=1,
        max_time={"minutes": args.max_minutes},
        max_steps=args.max_steps,
        default_root_dir=str(out),
        logger=pl.loggers.CSVLogger(str(out)),
        enable_checkpointing=False,
        **trainer_cfg,
    )
    t0, c0 = time.time(), time.process_time()
    trainer.fit(model, data)
    wall, cpu = time.time() - t0, time.process_time() - c0
    trainer.save_checkpoint(out / "last.ckpt")
    result = evaluate_reconstruction(model, n_crops=args.eval_crops)
    result.update(
        fit_wall_s=round(wall, 1),
        fit_cpu_s=round(cpu, 1),
        train_cpu_s=round(budget._train_cpu(), 1),
        generator_steps=model.generator_step,
        config=args.config,
        intermediate=budget.results,
    )
    (out / "result.json").write_text(json.dumps(result, indent=2))
    logger.info("RESULT %s", json.dumps(result))


if __name__ == "__main__":
    retain_freed_memory()
    main()
