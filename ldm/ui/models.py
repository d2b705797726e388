"""Checkpoints of the UI: found in a folder, loaded lazily, one in memory at a time."""

from __future__ import annotations

import gc
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ldm.ui.errors import UiError

logger = logging.getLogger(__name__)

CHECKPOINT_SUFFIXES = (".ckpt", ".safetensors", ".pt", ".pth")

Loader = Callable[[Path, str | None], Any]


def find_checkpoints(folder: str | Path) -> dict[str, Path]:
    """Name -> path of the checkpoint files (and diffusers folders) directly in ``folder``."""
    folder = Path(folder)
    found: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix in CHECKPOINT_SUFFIXES:
            found[p.name] = p
        elif p.is_dir() and (p / "model_index.json").is_file():
            found[p.name] = p
    return found


def checkpoint_table(ckpt: str | None, ckpt_dir: str | None) -> dict[str, Path]:
    """The checkpoints to offer: ``--ckpt`` first (the default), then those of ``--ckpt-dir``."""
    table: dict[str, Path] = {}
    if ckpt is not None:
        path = Path(ckpt)
        if not path.exists():
            raise UiError(f"--ckpt {ckpt}: no such file or folder.")
        table[path.name] = path
    if ckpt_dir is not None:
        if not Path(ckpt_dir).is_dir():
            raise UiError(f"--ckpt-dir {ckpt_dir}: no such folder.")
        for name, path in find_checkpoints(ckpt_dir).items():
            if path.resolve() not in {p.resolve() for p in table.values()}:
                table.setdefault(name, path)
    if not table:
        raise UiError(
            "No checkpoint to serve: give --ckpt PATH or a --ckpt-dir holding .ckpt / "
            ".safetensors files or diffusers folders."
        )
    return table


def _load(path: Path, device: str | None) -> Any:
    from ldm.checkpoint import load_model

    return load_model(path, device=device)


class ModelSlot:
    """One model in memory at a time, loaded on first use; ``lock`` serialises its use.

    ``get(name)`` loads the named checkpoint (dropping the previous one first, so two never share
    the device) and returns it; call it and sample while holding ``lock``."""

    def __init__(
        self, checkpoints: dict[str, Path], device: str | None = None, loader: Loader = _load
    ) -> None:
        if not checkpoints:
            raise UiError("No checkpoint to serve.")
        self.checkpoints = dict(checkpoints)
        self.device = device
        self.loader = loader
        self.lock = threading.RLock()
        self.name: str | None = None
        self.model: Any = None
        self._hashes: dict[str, str] = {}

    @property
    def names(self) -> list[str]:
        return list(self.checkpoints)

    @property
    def default(self) -> str:
        return self.names[0]

    def path(self, name: str | None) -> Path:
        name = name or self.default
        if name not in self.checkpoints:
            raise UiError(f"Unknown checkpoint {name!r}; choose one of: {', '.join(self.names)}.")
        return self.checkpoints[name]

    def get(self, name: str | None = None) -> Any:
        """The model of checkpoint ``name`` (default: the first), loaded now if not in memory."""
        name = name or self.default
        path = self.path(name)
        with self.lock:
            if self.name != name:
                self.release()
                logger.info("Loading %s on %s", path, self.device or "the default device")
                self.model = self.loader(path, self.device)
                self.name = name
            return self.model

    def release(self) -> None:
        """Drop the model in memory (and the device's cached blocks)."""
        with self.lock:
            if self.model is None:
                return
            logger.info("Releasing %s", self.name)
            self.model, self.name = None, None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def file_hash(self, name: str | None) -> str:
        """The short sha256 the PNG metadata records (cached per checkpoint)."""
        name = name or self.default
        if name not in self._hashes:
            from ldm.util import file_hash

            self._hashes[name] = file_hash(self.path(name))
        return self._hashes[name]
