"""Fault-tolerant training: a run that is killed, signalled or crashes can be resumed (``-r``).

Atomic checkpoint writes, a save on signal/exception, RNG state restore. (The file formats of
checkpoints are :mod:`ldm.checkpoint`; recomputing activations in backward is
:mod:`ldm.modules.activation_recompute`.)

- :class:`AtomicCheckpointIO` writes to a temporary file and ``os.replace``s it, so a crash while
  saving never leaves a corrupt ``last.ckpt``.
- :class:`InterruptCheckpoint` saves ``last.ckpt`` at the end of training, when fit raises (SIGTERM arrives as Lightning's
  ``SIGTERMException``; Ctrl-C as ``KeyboardInterrupt``), and on SIGUSR1 (where the platform has
  it, outside SLURM auto-requeue which Lightning handles) saves and stops cleanly at the batch end.
- :class:`RNGStateCheckpoint` stores torch/numpy/python RNG states so a resumed run draws the same
  noise as an uninterrupted one.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.strategies import DDPStrategy, SingleDeviceStrategy

from ldm.disk_errors import disk_fault_of, write_failure
from ldm.errors import RunFailure
from ldm.fit_errors import checkpoint_bytes

logger = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to a temp file in the target folder, fsync, then ``os.replace``."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(
                f"AtomicCheckpointIO.save_checkpoint got storage_options={storage_options!r}, "
                "which it does not support; use a strategy with its own CheckpointIO for that."
            )
        target = Path(path)
        if "://" in str(path):  # remote file systems: no atomic rename, use Lightning's writer
            super().save_checkpoint(checkpoint, path)
            return
        try:
            self._write(checkpoint, target)
        except Exception as err:
            fault = disk_fault_of(err)
            if fault is None:
                raise
            failure = write_failure(
                fault, target.parent, f"checkpoint {target.name}", need=checkpoint_bytes(checkpoint)
            )
            kept = sorted({p.name for p in (target, target.parent / "last.ckpt") if p.exists()})
            note = (
                f"The checkpoints written before are unchanged ({', '.join(kept)}): resume with "
                "-r once there is space."
                if kept
                else "No earlier checkpoint of this run exists."
            )
            raise RunFailure(f"{failure} {note}") from err

    @staticmethod
    def _write(checkpoint: dict[str, Any], target: Path) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def save_now(trainer: pl.Trainer, path: str | Path, all_ranks: bool) -> bool:
    """Save a full checkpoint; collective when ``all_ranks``, else rank 0 alone (DDP only)."""
    if all_ranks or trainer.world_size == 1:
        trainer.save_checkpoint(path)
        return True
    if not isinstance(trainer.strategy, DDPStrategy | SingleDeviceStrategy):
        logger.warning(
            "not saving %s: %s shards its state, which needs every rank.",
            path,
            type(trainer.strategy).__name__,
        )
        return False
    if trainer.is_global_zero:
        checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
        trainer.strategy.checkpoint_io.save_checkpoint(checkpoint, path)
    return True


class InterruptCheckpoint(Callback):
    """Save ``last.ckpt`` on an exception during fit and on SIGUSR1 (then stop cleanly)."""

    def __init__(self, ckptdir: str | Path, signals: tuple[str, ...] = ("SIGUSR1",)) -> None:
        self.ckptdir = Path(ckptdir)
        self.signal_names = signals
        self._requested = False
        self._previous: dict[int, Any] = {}
        self._start_step: int | None = None
        self._saved_step: int | None = None
        self.saved_on: str | None = None

    @property
    def last_path(self) -> Path:
        return self.ckptdir / "last.ckpt"

    def _handler(self, signum: int, frame: Any) -> None:
        logger.info("received %s: saving a checkpoint at the end of this batch", signum)
        self._requested = True

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # under torchrun/SLURM every rank named its own run directory: use rank 0's
        self.ckptdir = Path(trainer.strategy.broadcast(str(self.ckptdir)))
        if stage != "fit" or threading.current_thread() is not threading.main_thread():
            return
        env = trainer._accelerator_connector.cluster_environment
        if getattr(env, "auto_requeue", False) and type(env).__name__ == "SLURMEnvironment":
            return  # Lightning's SLURM handler saves and requeues on the requeue signal
        for name in self.signal_names:
            signum = getattr(signal, name, None)
            if signum is None:
                logger.debug("%s does not exist on this platform; not handled", name)
                continue
            self._previous[signum] = signal.signal(signum, self._handler)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start_step = trainer.global_step

    def _saved_at(self, trainer: pl.Trainer) -> bool:
        """Whether ``last.ckpt`` already holds this step (ours, or a ModelCheckpoint's)."""
        from pytorch_lightning.callbacks import ModelCheckpoint

        step = trainer.global_step
        if self._saved_step == step:
            return True
        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, ModelCheckpoint) and cb.save_last and cb.dirpath:
                same_dir = Path(cb.dirpath).resolve() == self.ckptdir.resolve()
                n = cb._every_n_train_steps
                if same_dir and (cb._last_global_step_saved == step or (n and step % n == 0)):
                    return True
        return False

    def _save(self, trainer: pl.Trainer, all_ranks: bool, why: str) -> bool:
        if save_now(trainer, self.last_path, all_ranks=all_ranks):
            self._saved_step = trainer.global_step
            logger.info("%s: saved %s at step %d", why, self.last_path, trainer.global_step)
            return True
        return False

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        requested = self._requested
        if trainer.world_size > 1:
            requested = trainer.strategy.reduce_boolean_decision(requested, all=False)
        if requested:
            self._requested = False
            self._save(trainer, all_ranks=True, why="signal")
            self.saved_on = "signal"
            trainer.should_stop = True
        elif 0 < trainer.max_steps <= trainer.global_step and not self._saved_at(trainer):
            # the final step: saved here, mid-epoch, so that a resume with a larger max_steps
            # continues with the next batch (after on_train_end Lightning marks the epoch done)
            self._save(trainer, all_ranks=True, why="max_steps reached")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A finished run's ``last.ckpt`` holds its final weights (step-based saves may lag)."""
        step = trainer.global_step
        if self._start_step is None or step <= self._start_step or self._saved_at(trainer):
            return
        self._save(trainer, all_ranks=True, why="training ended")

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if self._start_step is None or trainer.global_step <= self._start_step:
            return  # nothing trained in this launch: keep the checkpoint we resumed from
        if isinstance(exception, RunFailure) or disk_fault_of(exception) is not None:
            logger.warning("not saving %s: the disk fault that stopped the run", self.last_path)
            return
        from pytorch_lightning.utilities.exceptions import SIGTERMException

        every_rank = isinstance(exception, SIGTERMException)  # Lightning broadcast it to all
        try:
            if self._save(
                trainer, all_ranks=every_rank, why=f"{type(exception).__name__} during fit"
            ):
                self.saved_on = type(exception).__name__
        except Exception:  # never hide the original exception
            logger.exception("could not save %s after %r", self.last_path, exception)


def rng_states() -> dict[str, Any]:
    """Global RNG states as tensors and plain numbers (loadable with ``weights_only=True``)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    version, pstate, pgauss = random.getstate()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "python": [version, torch.tensor(pstate, dtype=torch.int64), pgauss],
    }
    if torch.cuda.is_available():
        states["torch.cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Inverse of :func:`rng_states`."""
    torch.set_rng_state(states["torch"])
    name, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, pstate, pgauss = states["python"]
    random.setstate((version, tuple(int(v) for v in pstate.tolist()), pgauss))
    if "torch.cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["torch.cuda"])


class RNGStateCheckpoint(Callback):
    """Keep torch/numpy/python RNG states in the checkpoint; restore them when training resumes.

    Validation during fit leaves the random streams as it found them: a run resumed from a
    checkpoint saved after the last batch of an epoch does not repeat that epoch's validation
    (Lightning goes on with the next epoch), and must draw the same training noise as the run
    that did validate.
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None
        self._before_validation: dict[str, Any] | None = None

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.training or (trainer.state.fn == "fit" and not trainer.sanity_checking):
            self._before_validation = rng_states()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._before_validation is not None:
            states, self._before_validation = self._before_validation, None
            set_rng_states(states)

    def state_dict(self) -> dict[str, Any]:
        return {"rng_states": rng_states()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict.get("rng_states")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # applied here, after the sanity check and the data loader set-up, which draw numbers
        if not self._pending:
            return
        states, self._pending = self._pending, None
        set_rng_states(states)
        if trainer.global_rank > 0:  # the checkpoint holds rank 0's state: decorrelate the ranks
            base = int(torch.randint(0, 2**31 - 1, (1,)).item())
            torch.manual_seed(base + trainer.global_rank)
