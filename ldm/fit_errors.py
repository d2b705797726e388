"""Errors raised inside ``trainer.fit`` that are the user's setting or the machine's fault, not
ours: Lightning's misconfiguration errors and a resumed checkpoint whose sizes do not fit the
model -> ConfigError; a full or read-only disk (checkpoint, log or image writes) -> RunFailure
naming the directory."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ldm.disk_errors import disk_fault_of, write_failure
from ldm.util import ConfigError

__all__ = ["checkpoint_bytes", "disk_fault_of", "fit_errors"]


@contextmanager
def fit_errors(run_dir: str | os.PathLike, ckpt_path: str | None = None) -> Iterator[None]:
    """Translate the errors of a fit writing to ``run_dir`` (resumed from ``ckpt_path``)."""
    from lightning_fabric.utilities.exceptions import MisconfigurationException

    from ldm.errors import RunFailure

    try:
        yield
    except RunFailure:
        raise
    except MisconfigurationException as err:
        raise ConfigError(f"lightning: Lightning rejected the settings: {err}") from err
    except Exception as err:
        if ckpt_path and isinstance(err, RuntimeError) and _SIZE_MISMATCH in str(err):
            first = " ".join(str(err).split("\n", 2)[1:2]).strip()
            raise ConfigError(
                f"-r {ckpt_path}: the checkpoint's weights do not fit the model the config "
                f"builds ({first}). Resume with the run's own model settings (no overrides of "
                "model.params that change sizes), or start a new run from the weights with "
                "model.params.ckpt_path=..."
            ) from err
        fault = disk_fault_of(err)
        if fault is None:
            raise
        where = Path(fault.filename).parent if fault.filename else Path(run_dir)
        raise write_failure(fault, where, "the run's logs", flag="-l/--logdir") from err


_SIZE_MISMATCH = "Error(s) in loading state_dict"


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
