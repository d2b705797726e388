"""Batches drawn from one aspect-ratio bucket at a time, resumable and split over ranks.

Per epoch (the order is a function of ``seed`` and ``epoch`` only, the same on every rank): the
items of each bucket are shuffled and cut into batches of ``batch_size`` (the last batch of a
bucket may be smaller), the batch list is made divisible by the number of ranks by halving the
largest batches (so no item is repeated or left out; only when every batch is a single item are
batches repeated), shuffled, and rank r takes batches r, r + world, r + 2 world, ... A DataLoader
hands each batch to one worker, so every item is read once per epoch across ranks and workers.
``skip`` drops the first batches of the first iteration (the consumed part of a resumed epoch).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Iterator, Sequence

import torch
from torch.utils.data import Sampler

logger = logging.getLogger(__name__)


def _split_until_divisible(batches: list[list[int]], world: int) -> list[list[int]]:
    """Halve the largest batches until their number is a multiple of ``world``."""
    batches = [list(b) for b in batches]
    for _ in range(-len(batches) % world):  # each halving adds one batch
        j = max(range(len(batches)), key=lambda k: len(batches[k]))
        big = batches[j]
        if len(big) < 2:
            extra = world - len(batches) % world
            logger.warning(
                "bucket batches: %d single-item batches cannot be shared evenly by %d ranks; "
                "repeating %d of them",
                len(batches),
                world,
                extra,
            )
            return batches + batches[:extra]
        half = (len(big) + 1) // 2
        batches[j : j + 1] = [big[:half], big[half:]]
    return batches


class BucketBatchSampler(Sampler[list[int]]):
    """Single-bucket batches of item indices (``buckets[i]``: the bucket of item i)."""

    def __init__(
        self,
        buckets: Sequence[Hashable],
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        epoch: int = 0,
        skip: int = 0,
        drop_last: bool = False,
        on_epoch: Callable[[int], None] | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.buckets = list(buckets)
        self.batch_size, self.shuffle, self.seed = int(batch_size), shuffle, int(seed)
        self.rank, self.world_size = rank, world_size
        self.epoch, self._skip, self.drop_last = int(epoch), int(skip), drop_last
        self.on_epoch = on_epoch  # e.g. the data set's set_epoch (caption options)
        if on_epoch is not None:
            on_epoch(self.epoch)
        self._groups: dict[Hashable, list[int]] = {}
        for i, b in enumerate(self.buckets):
            self._groups.setdefault(b, []).append(i)
        self._keys = sorted(self._groups, key=repr)  # a fixed bucket order, independent of input
        self._count = len(self.epoch_batches()) // world_size
        self.sampler = EpochRelay(self)  # Lightning sets the epoch on batch_sampler.sampler

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch (shuffling changes with it), and tell ``on_epoch``."""
        self.epoch = int(epoch)
        if self.on_epoch is not None:
            self.on_epoch(self.epoch)

    def epoch_batches(self) -> list[list[int]]:
        """Every rank's batches of the current epoch, in order (rank r takes every world-th)."""
        gen = torch.Generator()
        gen.manual_seed(self.seed + self.epoch)
        batches: list[list[int]] = []
        for key in self._keys:
            idx = self._groups[key]
            if self.shuffle:
                idx = [idx[k] for k in torch.randperm(len(idx), generator=gen).tolist()]
            for start in range(0, len(idx), self.batch_size):
                chunk = idx[start : start + self.batch_size]
                if len(chunk) == self.batch_size or not self.drop_last:
                    batches.append(chunk)
        batches = _split_until_divisible(batches, self.world_size)
        if self.shuffle:
            batches = [batches[k] for k in torch.randperm(len(batches), generator=gen).tolist()]
        return batches

    def indices(self) -> list[list[int]]:
        """This rank's batches of the current epoch."""
        return self.epoch_batches()[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.indices()
        skip, self._skip = self._skip, 0  # the skip applies to the first iteration only
        return iter(batches[skip:])

    def __len__(self) -> int:
        return self._count


class EpochRelay(Sampler[int]):
    """``batch_sampler.sampler`` of a bucketed loader: Lightning calls ``set_epoch`` on it at each
    epoch start and it passes the call on; iterating it gives this rank's indices in order."""

    def __init__(self, batches: BucketBatchSampler) -> None:
        self.batches = batches

    def set_epoch(self, epoch: int) -> None:
        self.batches.set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        return (i for batch in self.batches.indices() for i in batch)

    def __len__(self) -> int:
        return sum(len(b) for b in self.batches.indices())
