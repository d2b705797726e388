"""Caching of frozen encoder outputs (first-stage latents, text embeddings) keyed by item index.

Two entry points, both running the encoder only on items not cached yet:

- `EncodingCache.encode(indices, inputs, encode_fn)`: batch-level, for the LightningModule
  (the encoder stays on its device; the data set adds the index with `WithIndex`).
- `CachedEncodings(dataset, encode_fn, key, ...)`: a Dataset wrapper adding `encode_fn` of
  `item[key]` under `out_key`; `precompute()` fills the cache in batches before training.

Entries live in memory and, with `cache_dir`, on disk as safetensors files under
`cache_dir/{name}-{fingerprint}/`, where the fingerprint hashes the encoder config (and
weights), so a changed encoder never reads stale entries. For a KL first stage, cache the
posterior moments (`posterior.parameters`), not a sample, and sample at use time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset

logger = logging.getLogger(__name__)

EncodeFn = Callable[[Any], torch.Tensor]


def fingerprint(config: Any = None, module: torch.nn.Module | None = None, length: int = 16) -> str:
    """Hex digest of an encoder config (dict/OmegaConf/str) and, optionally, its weights."""
    h = hashlib.sha256()
    if config is not None:
        if hasattr(config, "_metadata"):  # OmegaConf container
            from omegaconf import OmegaConf

            config = OmegaConf.to_container(config, resolve=True)
        h.update(json.dumps(config, sort_keys=True, default=str).encode())
    if module is not None:
        for name, t in sorted(module.state_dict().items()):
            h.update(name.encode())
            h.update(str((tuple(t.shape), t.dtype)).encode())
            h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:length]


def _select(inputs: Any, rows: list[int]) -> Any:
    """Rows of a batch: tensor/ndarray indexing, or a list for sequences (e.g. captions)."""
    if isinstance(inputs, torch.Tensor):
        return inputs[torch.as_tensor(rows, dtype=torch.long, device=inputs.device)]
    if isinstance(inputs, np.ndarray):
        return inputs[rows]
    return [inputs[j] for j in rows]


def collate_inputs(values: list[Any]) -> Any:
    """A batch as encode_fn receives it: stacked arrays/tensors [B, ...], else a list (captions)."""
    if isinstance(values[0], np.ndarray):
        return np.stack(values)
    if isinstance(values[0], torch.Tensor):
        return torch.stack(values)
    return list(values)


def _as_int_list(indices: Any) -> list[int]:
    if isinstance(indices, torch.Tensor):
        return [int(i) for i in indices.reshape(-1).tolist()]
    return [int(i) for i in indices]


class EncodingCache:
    """Tensors keyed by item index for one encoder (name + fingerprint); memory and/or disk."""

    def __init__(
        self,
        name: str,
        fingerprint: str = "",
        cache_dir: str | os.PathLike | None = None,
        memory: bool = True,
    ):
        if cache_dir is None and not memory:
            raise ValueError("EncodingCache needs memory=True or a cache_dir (or both)")
        self.name, self.fingerprint, self.memory = name, fingerprint, memory
        self._mem: dict[int, torch.Tensor] = {}
        self.dir = None
        if cache_dir is not None:
            self.dir = Path(cache_dir) / (f"{name}-{fingerprint}" if fingerprint else name)
            self.dir.mkdir(parents=True, exist_ok=True)
        self.hits = self.misses = 0

    def _path(self, index: int) -> Path:
        return self.dir / f"{index:09d}.safetensors"

    def get(self, index: int) -> torch.Tensor | None:
        """Cached value of item `index` (CPU tensor), or None."""
        value = self._mem.get(index)
        if value is None and self.dir is not None and self._path(index).is_file():
            value = load_file(self._path(index))["value"]
            if self.memory:
                self._mem[index] = value
        return value

    def put(self, index: int, value: torch.Tensor) -> None:
        """Store `value` (detached, on CPU) for item `index`; disk writes are atomic."""
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"cache '{self.name}' stores tensors, got {type(value).__name__}; make encode_fn "
                "return a tensor (for a KL first stage: posterior.parameters)"
            )
        value = value.detach().to("cpu").contiguous()
        if self.memory:
            self._mem[index] = value
        if self.dir is not None:
            fd, tmp = tempfile.mkstemp(dir=self.dir, suffix=".tmp")
            os.close(fd)
            save_file({"value": value}, tmp)
            os.replace(tmp, self._path(index))

    def __contains__(self, index: int) -> bool:
        return index in self._mem or (self.dir is not None and self._path(index).is_file())

    def encode(
        self, indices: Any, inputs: Any, encode_fn: EncodeFn, device: torch.device | None = None
    ) -> torch.Tensor:
        """encode_fn(inputs) stacked over the batch [B, ...], calling encode_fn only on uncached rows.

        Runs under no_grad (frozen encoders only). The result is on `device`, else on the
        encoder's output device, else on the CPU (everything cached and no device given).
        """
        keys = _as_int_list(indices)
        values: list[torch.Tensor | None] = [self.get(k) for k in keys]
        missing = [j for j, v in enumerate(values) if v is None]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        out_device = device
        if missing:
            with torch.no_grad():
                fresh = encode_fn(_select(inputs, missing))
            if not isinstance(fresh, torch.Tensor) or fresh.shape[0] != len(missing):
                raise TypeError(
                    f"encode_fn for cache '{self.name}' must return a tensor with one row per "
                    f"input ({len(missing)}), got {getattr(fresh, 'shape', type(fresh).__name__)}"
                )
            out_device = out_device or fresh.device
            fresh_cpu = fresh.detach().to("cpu")  # one transfer for the batch
            for j, row, row_cpu in zip(missing, fresh.detach(), fresh_cpu):
                self.put(keys[j], row_cpu.clone())  # own storage, not a view of the batch
                values[j] = row
        return torch.stack([v.to(out_device or "cpu") for v in values])  # [B, ...]


class WithIndex(Dataset):
    """Adds the item index under `index_key`, so a model can look up cached encodings."""

    def __init__(self, dataset: Dataset, index_key: str = "index"):
        self.dataset, self.index_key = dataset, index_key

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = dict(self.dataset[i])
        item[self.index_key] = i
        return item


class CachedEncodings(Dataset):
    """Dataset wrapper: item[out_key] = encode_fn([item[key]])[0], computed once per item."""

    def __init__(
        self,
        dataset: Dataset,
        encode_fn: EncodeFn,
        key: str,
        out_key: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        fingerprint: str = "",
        name: str | None = None,
        memory: bool = True,
        drop_input: bool = False,
        allow_random_transforms: bool = False,
    ):
        image_key = getattr(dataset, "image_key", None)
        if (
            key == image_key
            and not getattr(dataset, "deterministic", True)
            and not allow_random_transforms
        ):
            raise ValueError(
                f"caching encodings of '{key}' from a data set with random crop/flip would freeze "
                "one augmentation; use crop='center' and flip=False, or allow_random_transforms=True"
            )
        self.dataset, self.encode_fn, self.key = dataset, encode_fn, key
        self.out_key = out_key or f"{key}_encoded"
        self.drop_input = drop_input
        self.cache = EncodingCache(name or self.out_key, fingerprint, cache_dir, memory)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = dict(self.dataset[i])
        if self.key not in item:
            raise KeyError(f"item {i} has no key {self.key!r} to encode (keys: {sorted(item)})")
        batch = collate_inputs([item[self.key]])
        item[self.out_key] = self.cache.encode([i], batch, self.encode_fn)[0]
        if self.drop_input:
            del item[self.key]
        return item

    def precompute(self, batch_size: int = 64, indices: Sequence[int] | None = None) -> int:
        """Fill the cache in batches (main process, before training); returns items encoded."""
        todo = [
            i for i in (indices if indices is not None else range(len(self))) if i not in self.cache
        ]
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            inputs = collate_inputs([self.dataset[i][self.key] for i in chunk])
            self.cache.encode(chunk, inputs, self.encode_fn)
        logger.info("cache '%s': encoded %d of %d items", self.cache.name, len(todo), len(self))
        return len(todo)
