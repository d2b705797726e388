"""``DataModuleFromConfig``: the CompVis data module (``main.DataModuleFromConfig``) on Lightning 2.

Datasets are built from ``{target, params}`` configs per split. The training sampler is
deterministic in (seed, epoch) and splits itself across ranks, so a resumed run sees the same
batches as an uninterrupted one, continuing mid-epoch at the batch where the checkpoint was taken.
"""

from __future__ import annotations

import logging
import math
import os
import random
from collections.abc import Callable, Iterator, Sized
from functools import partial
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import (
    DataLoader,
    Dataset,
    IterableDataset,
    Sampler,
    default_collate,
    default_convert,
    get_worker_info,
)

from ldm.data.bucket_sampler import BucketBatchSampler
from ldm.data.collate import CheckedCollate, dataset_name
from ldm.util import ConfigError, config_path_of, instantiate_from_config

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test", "predict")


class WrappedDataset(Dataset):
    """Wraps any object with ``__len__`` and ``__getitem__`` into a torch Dataset (CompVis).

    Other attribute lookups go to the wrapped data set, so wrapping hides nothing the data module
    and the trainer look for (``item_buckets``, ``set_epoch``, the latent-cache methods).
    """

    def __init__(self, dataset: Any) -> None:
        self.data = dataset

    def __getattr__(self, name: str) -> Any:
        # only called when normal lookup fails; read ``data`` from __dict__ so that a half-built
        # instance (unpickling in a worker process, copy) does not recurse; dunders stay ours
        data = self.__dict__.get("data")
        if data is None or (name.startswith("__") and name.endswith("__")):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(data, name)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, idx: int) -> Any:
        return self.data[idx]


def worker_init_fn(_: int) -> None:
    """Seed numpy/random per worker from torch's worker seed; split CompVis iterable records."""
    info = get_worker_info()
    if info is None:
        return
    seed = info.seed % 2**32
    np.random.seed(seed)
    random.seed(seed)
    dataset = info.dataset
    # CompVis Txt2ImgIterableBaseDataset: each worker takes a contiguous share of the records
    if hasattr(dataset, "valid_ids") and hasattr(dataset, "num_records"):
        split = dataset.num_records // info.num_workers
        dataset.sample_ids = dataset.valid_ids[info.id * split : (info.id + 1) * split]


class ResumableSampler(Sampler[int]):
    """Index order fixed by (seed, epoch), strided over ranks, able to skip a consumed prefix."""

    def __init__(
        self,
        size: int,
        shuffle: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        epoch: int = 0,
        skip: int = 0,
        on_epoch: Callable[[int], None] | None = None,
    ) -> None:
        self.size, self.shuffle, self.seed = size, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self._skip = epoch, skip
        self.on_epoch = on_epoch  # e.g. the data set's set_epoch (caption options)
        if on_epoch is not None:
            on_epoch(epoch)
        self.num_samples = math.ceil(size / world_size)  # padded like DistributedSampler

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at every epoch start; tells ``on_epoch``."""
        self.epoch = epoch
        if self.on_epoch is not None:
            self.on_epoch(epoch)

    def indices(self) -> list[int]:
        """This rank's full index list for the current epoch."""
        if self.shuffle:
            gen = torch.Generator()
            gen.manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.size, generator=gen).tolist()
        else:
            order = list(range(self.size))
        # pad by cycling so every rank gets the same count (also with fewer items than ranks)
        order = [order[k % self.size] for k in range(self.num_samples * self.world_size)]
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        order = self.indices()
        skip, self._skip = self._skip, 0  # the skip applies to the first iteration only
        return iter(order[skip:])

    def __len__(self) -> int:
        return self.num_samples


class ResumableDataLoader(DataLoader):
    """A DataLoader Lightning treats as resumable: the position lives in the trainer's loop state,
    and :class:`ResumableSampler` skips the consumed prefix (see ``DataModuleFromConfig``).

    Starting an iteration draws the workers' base seed from a generator seeded by (``seed``,
    epoch), not from the global random stream: how many loaders were iterated before (a
    validation that a resumed run does not repeat) does not change the training noise.
    """

    def __init__(self, *args: Any, seed: int = 0, **kwargs: Any) -> None:
        kwargs.setdefault("generator", torch.Generator())
        super().__init__(*args, **kwargs)
        self.seed = seed

    def __iter__(self) -> Any:
        order = self.batch_sampler if hasattr(self.batch_sampler, "epoch") else self.sampler
        epoch = int(getattr(order, "epoch", 0))
        self.generator.manual_seed((self.seed * 1_000_003 + epoch) % 2**63)
        return super().__iter__()

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        return None


class DataModuleFromConfig(pl.LightningDataModule):
    """CompVis ``DataModuleFromConfig``: datasets from target/params for each split."""

    def __init__(
        self,
        batch_size: int,
        train: Any = None,
        validation: Any = None,
        test: Any = None,
        predict: Any = None,
        wrap: bool = False,
        num_workers: int | None = None,
        shuffle_test_loader: bool = False,
        use_worker_init_fn: bool = False,
        shuffle_val_dataloader: bool = False,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ConfigError(
                f"data.params.batch_size: expected a positive integer, found {batch_size!r}."
            )
        if num_workers is not None and (
            not isinstance(num_workers, int) or isinstance(num_workers, bool) or num_workers < 0
        ):
            raise ConfigError(
                f"data.params.num_workers: expected a whole number >= 0 (0: load in the main "
                f"process), found {num_workers!r}."
            )
        self.batch_size = batch_size
        cpus = os.cpu_count() or 1
        self.num_workers = num_workers if num_workers is not None else min(batch_size * 2, cpus)
        if not isinstance(wrap, bool):
            raise ConfigError(
                f"data.params.wrap: expected true or false (wrap each data set in WrappedDataset), "
                f"found {wrap!r} ({type(wrap).__name__}). Write wrap: true or wrap: false, "
                "without quotes."
            )
        self.wrap = wrap
        self.use_worker_init_fn = use_worker_init_fn
        self.shuffle = {"train": True, "validation": shuffle_val_dataloader}
        self.shuffle.update(test=shuffle_test_loader, predict=False)
        self.seed = seed
        given = dict(train=train, validation=validation, test=test, predict=predict)
        self.dataset_configs = {k: v for k, v in given.items() if v is not None}
        self.datasets: dict[str, Any] = {}
        if not self.dataset_configs:
            raise ConfigError(
                "data.params: no split configured; give at least 'train' "
                "({target: ..., params: ...})."
            )
        # Lightning only calls the hooks that exist, as in CompVis
        for split, hook in (
            ("train", "train_dataloader"),
            ("validation", "val_dataloader"),
            ("test", "test_dataloader"),
            ("predict", "predict_dataloader"),
        ):
            if split in self.dataset_configs:
                setattr(self, hook, partial(self._dataloader, split))

    def _build(self, split: str) -> Any:
        cfg = self.dataset_configs[split]
        dataset = instantiate_from_config(cfg)
        if self.wrap and not isinstance(dataset, IterableDataset):  # a stream has no items
            dataset = WrappedDataset(dataset)
        if isinstance(dataset, Sized) and len(dataset) == 0:
            where = config_path_of(cfg, default=f"data.params.{split}")
            raise ConfigError(
                f"{where}: the {split} dataset is empty (0 items). "
                "Check the data path and filters in its params."
            )
        return dataset

    def prepare_data(self) -> None:
        """Build the datasets once on local rank 0 (downloads, caches); reused by ``setup``."""
        for split in self.dataset_configs:
            if split not in self.datasets:
                self.datasets[split] = self._build(split)

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets of every configured split (idempotent)."""
        self.prepare_data()

    def _ranks(self) -> tuple[int, int]:
        """(rank, world_size) when this module splits the data itself, else (0, 1)."""
        trainer = self.trainer  # None until a Trainer attaches this module
        connector = getattr(trainer, "_accelerator_connector", None)
        if trainer is None or getattr(connector, "use_distributed_sampler", True):
            return 0, 1  # Lightning (or nobody) distributes the samples
        return trainer.global_rank, trainer.world_size

    def _position(self) -> tuple[int, int]:
        """(epoch, batches already consumed in it) restored from a checkpoint by the trainer."""
        trainer = self.trainer  # None until a Trainer attaches this module
        if trainer is None:
            return 0, 0
        if not trainer.ckpt_path:
            return trainer.current_epoch, 0
        loop = trainer.fit_loop
        done = loop.epoch_progress.current
        batches = loop.epoch_loop.batch_progress
        if batches.is_last_batch:
            # saved after the last batch of its epoch: Lightning counts that epoch as done when
            # it restores the loops (after this is called) and goes on with the next one, whose
            # iteration must not skip anything
            unfinished = done.started != done.processed
            return trainer.current_epoch + int(unfinished), 0
        # mid-epoch: the batches processed in it. (Not the epoch counters: after a resume from
        # an epoch's last batch Lightning leaves them saying "finished" for the whole next epoch.)
        return trainer.current_epoch, batches.current.processed

    def _image_key(self) -> str | None:
        """The attached model's image key (``first_stage_key``; ``image_key`` of autoencoders)."""
        try:
            module = self.trainer.lightning_module if self.trainer is not None else None
        except (AttributeError, RuntimeError):
            return None
        for name in ("first_stage_key", "image_key"):
            key = getattr(module, name, None)
            if isinstance(key, str):
                return key
        return None

    def _collate(self, split: str, dataset: Any, batched: bool = True) -> CheckedCollate:
        """Collation that names contract violations; the train loader checks its first batch."""
        return CheckedCollate(
            dataset_name(dataset),
            collate=default_collate if batched else default_convert,
            image_key=self._image_key(),
            check=split == "train",
        )

    def _seed(self) -> int:
        return self.seed if self.seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))

    def _bucket_dataloader(
        self, split: str, dataset: Any, buckets: list[Any], init_fn: Any
    ) -> DataLoader:
        """Single-bucket batches (aspect-ratio bucketing), resumable and split over ranks."""
        rank, world = self._ranks()
        epoch, consumed = self._position() if split == "train" else (0, 0)
        if consumed:
            logger.info("resuming %s data at batch %d of epoch %d", split, consumed, epoch)
        batch_sampler = BucketBatchSampler(
            buckets,
            self.batch_size,
            shuffle=self.shuffle[split],
            seed=self._seed(),
            rank=rank,
            world_size=world,
            epoch=epoch,
            skip=consumed,
            on_epoch=getattr(dataset, "set_epoch", None),
        )
        return ResumableDataLoader(
            dataset,
            batch_sampler=batch_sampler,
            collate_fn=self._collate(split, dataset),
            seed=self._seed(),
            num_workers=self.num_workers,
            worker_init_fn=init_fn,
            persistent_workers=self.num_workers > 0,
        )

    def _dataloader(self, split: str) -> DataLoader:
        if split not in self.datasets:
            self.setup()
        dataset = self.datasets[split]
        iterable = isinstance(dataset, IterableDataset)
        if split == "train" and not iterable and len(dataset) < self.batch_size:
            logger.warning(
                "data.params.batch_size %d is larger than the %s set (%d items, %s): every "
                "batch holds at most %d items, while a learning rate scaled by batch size "
                "(--scale_lr) counts %d. Lower data.params.batch_size or add data.",
                self.batch_size,
                split,
                len(dataset),
                type(dataset).__name__,
                len(dataset),
                self.batch_size,
            )
        init_fn = worker_init_fn if (iterable or self.use_worker_init_fn) else None
        buckets = None if iterable else getattr(dataset, "item_buckets", None)
        if buckets is not None:
            return self._bucket_dataloader(split, dataset, buckets, init_fn)
        sampler = None
        if not iterable:
            rank, world = self._ranks()
            epoch, consumed = self._position() if split == "train" else (0, 0)
            if consumed:
                logger.info("resuming %s data at batch %d of epoch %d", split, consumed, epoch)
            sampler = ResumableSampler(
                len(dataset),
                shuffle=self.shuffle[split],
                seed=self._seed(),
                rank=rank,
                world_size=world,
                epoch=epoch,
                skip=consumed * self.batch_size,
                on_epoch=getattr(dataset, "set_epoch", None),
            )
        batch_size: int | None = self.batch_size
        if iterable and getattr(dataset, "yields_batches", False):  # bucketed stream
            if getattr(dataset, "batch_size", None) is None:
                dataset.batch_size = self.batch_size
            batch_size = None
        resumable = {"seed": self._seed()} if sampler is not None else {}
        return (ResumableDataLoader if sampler is not None else DataLoader)(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            collate_fn=self._collate(split, dataset, batched=batch_size is not None),
            num_workers=self.num_workers,
            worker_init_fn=init_fn,
            persistent_workers=self.num_workers > 0,
            **resumable,
        )
