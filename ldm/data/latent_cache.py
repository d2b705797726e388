"""On-disk cache of first-stage encodings of training images, keyed by content.

An entry's key hashes the image file's bytes and everything the transform did to it (bucket
size, crop, flip, interpolation, background), so a changed file or transform gets a new key; the
entries live under ``<dir>/<encoder fingerprint>/``, so another autoencoder (or other weights)
never reads them. For a KL first stage the entry holds the posterior moments [2C, h, w] (mean and
log-variance; the latent is sampled at use time, so every epoch draws a fresh z as without the
cache); for a VQ first stage the pre-quantization latents. Writes are atomic (temporary file,
then rename), so an interrupted run leaves no partial entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

MOMENTS_KEY = "first_stage_moments"  # batch key of cached encodings
CACHE_FORMAT = 1  # part of every key: bump when the transform code changes what it produces


def default_cache_dir() -> Path:
    """$LDM_CACHE_DIR/latents, else $XDG_CACHE_HOME/ldm/latents, else ~/.cache/ldm/latents."""
    if os.environ.get("LDM_CACHE_DIR"):
        return Path(os.environ["LDM_CACHE_DIR"]) / "latents"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ldm" / "latents"


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def entry_key(content: str, transform: dict[str, Any]) -> str:
    """The key of one cached encoding: content digest + transform description."""
    text = json.dumps({"v": CACHE_FORMAT, "content": content, **transform}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class LatentStore:
    """Encodings by key under ``root/<fingerprint>/<key[:2]>/<key>.safetensors``."""

    def __init__(self, root: str | os.PathLike, fingerprint: str) -> None:
        self.fingerprint = fingerprint
        self.dir = Path(root).expanduser() / fingerprint
        self.dir.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.safetensors"

    def __contains__(self, key: str) -> bool:
        return self.path(key).is_file()

    def get(self, key: str) -> dict[str, torch.Tensor]:
        """The tensors stored under ``key``; a clear error when missing or unreadable."""
        path = self.path(key)
        try:
            return load_file(path)
        except (OSError, KeyError, RuntimeError) as exc:
            raise FileNotFoundError(
                f"latent cache entry {path} is missing or unreadable ({exc}); the cache was "
                "changed during the run. Start the run again: missing entries are re-encoded."
            ) from None

    def put(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        """Store ``tensors`` (moved to the CPU) atomically."""
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        try:
            save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, tmp)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
