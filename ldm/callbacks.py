"""Training callbacks with the CompVis names: ``SetupCallback``, ``ImageLogger``, ``CUDACallback``.

``SetupCallback`` creates the run directory and saves the resolved configs (rank 0 only);
``ImageLogger`` calls ``pl_module.log_images(batch, split=...)`` at a step frequency and writes
grids (and captions) under ``<run>/images/<split>/`` on rank 0; ``CUDACallback`` logs epoch time
and peak accelerator memory (harmless on CPU).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torchvision
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_info

from ldm.fault_tolerance import InterruptCheckpoint

logger = logging.getLogger(__name__)

CAPTION_KEYS = ("caption", "txt", "text", "prompt")


def save_config(config: Any, path: Path) -> None:
    """Save a config as YAML, resolved when its interpolations resolve."""
    cfg = config if isinstance(config, DictConfig) else OmegaConf.create(config)
    try:
        OmegaConf.save(cfg, path, resolve=True)
    except Exception as err:  # noqa: BLE001 - unresolvable interpolations: keep them as written
        logger.warning("saving %s unresolved: %s", path, err)
        OmegaConf.save(cfg, path)


class SetupCallback(Callback):
    """Create ``logdir``/``ckptdir``/``cfgdir`` and save the project and lightning configs."""

    def __init__(
        self,
        resume: Any,
        now: str,
        logdir: str,
        ckptdir: str,
        cfgdir: str,
        config: Any,
        lightning_config: Any,
        debug: bool = False,
    ) -> None:
        super().__init__()
        self.resume, self.now, self.debug = resume, now, debug
        self.logdir, self.ckptdir, self.cfgdir = Path(logdir), Path(ckptdir), Path(cfgdir)
        self.config, self.lightning_config = config, lightning_config

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not trainer.is_global_zero:
            return
        for d in (self.logdir, self.ckptdir, self.cfgdir, self.logdir / "images"):
            d.mkdir(parents=True, exist_ok=True)
        if not self.resume:
            self._save_configs()

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A resumed run saves its configs once the checkpoint is restored: a launch whose config
        does not fit the checkpoint leaves the run's configs/ as it was (the launcher merges
        every file there on the next -r)."""
        if trainer.is_global_zero and self.resume:
            self._save_configs()

    def _save_configs(self) -> None:
        project = self.cfgdir / f"{self.now}-project.yaml"
        lightning = self.cfgdir / f"{self.now}-lightning.yaml"
        if not project.exists():
            save_config(self.config, project)
            save_config(OmegaConf.create({"lightning": self.lightning_config}), lightning)
            logger.info("configs saved to %s", self.cfgdir)
            logger.debug("project config:\n%s", OmegaConf.to_yaml(self.config))

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Embed the resolved project config (plain types) so the file loads with no ``--config``."""
        if "model" in self.config:
            checkpoint["ldm_config"] = OmegaConf.to_container(self.config, resolve=True)


def _to_grid(images: torch.Tensor, rescale: bool) -> np.ndarray:
    """[B, C, H, W] in [-1, 1] (or [0, 1]) -> H' x W' x C uint8 grid."""
    grid = torchvision.utils.make_grid(images.float(), nrow=4)
    if rescale:
        grid = (grid + 1.0) / 2.0
    grid = grid.clamp(0, 1).permute(1, 2, 0).squeeze(-1)  # C,H,W -> H,W,C
    return (grid.numpy() * 255).round().astype(np.uint8)


def _captions(batch: Any, pl_module: pl.LightningModule) -> list[str] | None:
    if not isinstance(batch, dict):
        return None
    keys = [getattr(pl_module, "cond_stage_key", None), *CAPTION_KEYS]
    for key in keys:
        value = batch.get(key) if key else None
        if isinstance(value, list | tuple) and value and all(isinstance(v, str) for v in value):
            return list(value)
    return None


class ImageLogger(Callback):
    """Log ``pl_module.log_images`` grids every ``batch_frequency`` steps (CompVis parameters)."""

    def __init__(
        self,
        batch_frequency: int,
        max_images: int,
        clamp: bool = True,
        increase_log_steps: bool = True,
        rescale: bool = True,
        disabled: bool = False,
        log_on_batch_idx: bool = False,
        log_first_step: bool = False,
        log_images_kwargs: dict | None = None,
        save_dir: str | None = None,
    ) -> None:
        super().__init__()
        for name, value, low in (
            ("batch_frequency", batch_frequency, 1),
            ("max_images", max_images, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"ImageLogger: {name} must be a whole number, found {value!r}.")
            if value < low:
                raise ValueError(f"ImageLogger: {name} must be >= {low}, found {value}.")
        self.batch_freq, self.max_images = batch_frequency, max_images
        self.clamp, self.rescale, self.disabled = clamp, rescale, disabled
        self.log_on_batch_idx, self.log_first_step = log_on_batch_idx, log_first_step
        self.log_images_kwargs = dict(log_images_kwargs or {})
        self.save_dir = save_dir
        # 1, 2, 4, ... below the frequency, then every batch_frequency steps (CompVis)
        self.log_steps = {2**n for n in range(int(np.log2(batch_frequency)) + 1)}
        if not increase_log_steps:
            self.log_steps = set()
        self.written: list[Path] = []

    def check_frequency(self, check_idx: int) -> bool:
        """Whether step ``check_idx`` is a logging step."""
        if check_idx == 0:
            return self.log_first_step
        return check_idx % self.batch_freq == 0 or check_idx in self.log_steps

    def _root(self, trainer: pl.Trainer) -> Path:
        return Path(self.save_dir or trainer.default_root_dir) / "images"

    def log_local(
        self, root: Path, split: str, images: dict[str, Any], stem: str, captions: Any
    ) -> None:
        """Write ``<root>/<split>/<key>_<stem>.png`` grids and caption text files."""
        folder = root / split
        folder.mkdir(parents=True, exist_ok=True)
        for key, value in images.items():
            if isinstance(value, torch.Tensor) and value.dim() == 4:
                path = folder / f"{key}_{stem}.png"
                Image.fromarray(_to_grid(value, self.rescale)).save(path)
                self.written.append(path)
            elif isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
                (folder / f"{key}_{stem}.txt").write_text("\n".join(value) + "\n")
        if captions:
            (folder / f"captions_{stem}.txt").write_text("\n".join(captions) + "\n")

    def _to_loggers(self, trainer: pl.Trainer, split: str, images: dict[str, Any]) -> None:
        for lg in trainer.loggers:
            for key, value in images.items():
                if not (isinstance(value, torch.Tensor) and value.dim() == 4):
                    continue
                grid = _to_grid(value, self.rescale)
                tag = f"{split}/{key}"
                exp = lg.experiment
                if hasattr(exp, "add_image"):  # TensorBoard
                    exp.add_image(tag, grid, trainer.global_step, dataformats="HWC")
                elif hasattr(lg, "log_image"):  # W&B
                    lg.log_image(key=tag, images=[grid], step=trainer.global_step)

    def log_img(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batch: Any,
        batch_idx: int,
        split: str,
    ) -> None:
        """Call ``log_images`` (rank 0, eval mode, no grad, own RNG) and write the results."""
        if not callable(getattr(pl_module, "log_images", None)) or self.max_images <= 0:
            return
        if not trainer.is_global_zero:
            return
        was_training = pl_module.training
        pl_module.eval()
        devices = [pl_module.device] if pl_module.device.type != "cpu" else []
        try:
            with (
                torch.no_grad(),
                torch.random.fork_rng(devices=devices, device_type=pl_module.device.type),
            ):
                images = pl_module.log_images(batch, split=split, **self.log_images_kwargs)
        finally:
            if was_training:
                pl_module.train()
        out: dict[str, Any] = {}
        for key, value in images.items():
            if isinstance(value, torch.Tensor):
                value = value[: self.max_images].detach().float().cpu()
                out[key] = value.clamp(-1.0, 1.0) if self.clamp else value
            elif isinstance(value, list | tuple):
                out[key] = list(value)[: self.max_images]
        captions = _captions(batch, pl_module)
        stem = f"gs-{trainer.global_step:06}_e-{trainer.current_epoch:06}_b-{batch_idx:06}"
        self.log_local(
            self._root(trainer), split, out, stem, captions and captions[: self.max_images]
        )
        self._to_loggers(trainer, split, out)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        check_idx = batch_idx if self.log_on_batch_idx else trainer.global_step
        if not self.disabled and self.check_frequency(check_idx):
            self.log_img(trainer, pl_module, batch, batch_idx, split="train")

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        # one grid per validation run, from its first batch (CompVis logged on every val batch)
        if self.disabled or trainer.sanity_checking or batch_idx != 0 or dataloader_idx != 0:
            return
        if trainer.global_step > 0 or self.log_first_step:
            self.log_img(trainer, pl_module, batch, batch_idx, split="val")


class CUDACallback(Callback):
    """Log epoch time and peak accelerator memory (the CompVis name; a no-op for memory on CPU)."""

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if pl_module.device.type != "cpu":
            torch.accelerator.reset_peak_memory_stats(pl_module.device)
        self.start_time = time.time()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch_time = time.time() - getattr(self, "start_time", time.time())
        msg = f"epoch {trainer.current_epoch}: {epoch_time:.2f} s"
        if pl_module.device.type != "cpu":
            torch.accelerator.synchronize(pl_module.device)
            peak = torch.accelerator.max_memory_allocated(pl_module.device) / 2**20
            msg += f", peak memory {peak:.0f} MiB"
        rank_zero_info(msg)


__all__ = ["CUDACallback", "ImageLogger", "InterruptCheckpoint", "SetupCallback"]
