"""Errors raised inside ``trainer.fit`` that are the user's setting or the machine's fault, not
ours: Lightning's misconfiguration errors and a resumed checkpoint whose sizes do not fit the
model -> ConfigError; a full or read-only disk (checkpoint, log or image writes) -> RunFailure
naming the directory."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ldm.disk_errors import disk_fault_of, write_failure
from ldm.util import ConfigError

__all__ = ["checkpoint_bytes", "disk_fault_of", "fit_errors"]


#: RuntimeErrors of a model whose sizes do not fit its data (channels, widths, image sizes)
_SHAPES = re.compile(
    r"shapes cannot be multiplied|size of tensor a|must match the size|to have \d+ channels|"
    r"expected input\[.*\] to have|Given groups=|size mismatch|Expected size"
)


@contextmanager
def fit_errors(
    run_dir: str | os.PathLike, ckpt_path: str | None = None, trainer: Any = None
) -> Iterator[None]:
    """Translate the errors of a fit writing to ``run_dir`` (resumed from ``ckpt_path``); a
    shape error before the first optimizer step of ``trainer`` is a model/data mismatch."""
    from lightning_fabric.utilities.exceptions import MisconfigurationException

    from ldm.errors import RunFailure

    start = getattr(trainer, "global_step", None)
    try:
        yield
    except RunFailure:
        raise
    except MisconfigurationException as err:
        raise ConfigError(f"lightning: Lightning rejected the settings: {err}") from err
    except ValueError as err:
        if not _raised_by_lightning(err):
            raise
        text = " ".join(str(err).split())
        raise ConfigError(f"lightning.trainer: Lightning rejected the settings: {text}") from err
    except Exception as err:
        if ckpt_path and isinstance(err, RuntimeError) and _SIZE_MISMATCH in str(err):
            first = " ".join(str(err).split("\n", 2)[1:2]).strip()
            raise ConfigError(
                f"-r {ckpt_path}: the checkpoint's weights do not fit the model the config "
                f"builds ({first}). Resume with the run's own model settings (no overrides of "
                "model.params that change sizes), or start a new run from the weights with "
                "model.params.ckpt_path=..."
            ) from err
        first_step = start is not None and trainer.global_step == start
        if first_step and isinstance(err, RuntimeError) and _SHAPES.search(str(err)):
            text = " ".join(str(err).split())[:300]
            raise ConfigError(
                f"model/data: the model's sizes do not fit the data at the first training step "
                f"({text}). Check model.params (channels, widths, image size) against "
                "data.params (run with -d for the traceback)."
            ) from err
        fault = disk_fault_of(err)
        if fault is None:
            raise
        where = Path(fault.filename).parent if fault.filename else Path(run_dir)
        raise write_failure(fault, where, "the run's logs", flag="-l/--logdir") from err


_SIZE_MISMATCH = "Error(s) in loading state_dict"
_LIGHTNING_DIRS = (f"{os.sep}pytorch_lightning{os.sep}", f"{os.sep}lightning_fabric{os.sep}")


def _raised_by_lightning(err: BaseException) -> bool:
    """Whether Lightning's own code raised ``err`` (its checks of the Trainer's settings against
    the data, e.g. a val_check_interval longer than the epoch), not a model or data set."""
    tb = err.__traceback__
    last = None
    while tb is not None:
        last, tb = tb, tb.tb_next
    return last is not None and any(d in last.tb_frame.f_code.co_filename for d in _LIGHTNING_DIRS)


def checkpoint_bytes(obj: Any) -> int:
    """Bytes of the tensors in a checkpoint dict (what writing it needs, roughly)."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(checkpoint_bytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(checkpoint_bytes(v) for v in obj)
    return 0
