"""DataModuleFromConfig's own splitting: per-rank / per-worker indices, the resume position, the
worker seeding, and what each constructor argument does to the DataLoader it builds.

References: torch's ``DistributedSampler`` (the same (seed + epoch) permutation, padding and
striding), the CompVis worker split (worker i of n takes records [i * N // n, (i + 1) * N // n)),
and numpy / random streams seeded by hand.
"""

from __future__ import annotations

import os
import random
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset

import ldm.data.datamodule as dmod
from ldm.data.bucket_sampler import BucketBatchSampler
from ldm.data.datamodule import (
    DataModuleFromConfig,
    ResumableDataLoader,
    ResumableSampler,
    WrappedDataset,
    worker_init_fn,
)
from ldm.util import ConfigError

TOY = {"target": "toy_model.ToyDataset", "params": {"n": 10}}


class _Items(Dataset):
    """n items (their index); records the epochs it is told."""

    def __init__(self, n: int = 10) -> None:
        self.n = n
        self.epochs: list[int] = []

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i

    def set_epoch(self, epoch: int) -> None:
        self.epochs.append(epoch)


class _Bucketed(_Items):
    def __init__(self) -> None:
        super().__init__(6)
        self.item_buckets = ["b", "a", "b", "a", "a", "c"]


class _BucketedNoEpochHook(Dataset):
    """Bucketed items without a ``set_epoch``."""

    item_buckets = ["a", "b", "a"]

    def __len__(self) -> int:
        return 3

    def __getitem__(self, i: int) -> int:
        return i


class _BatchStream(IterableDataset):
    """Yields its own batches; has no ``batch_size`` attribute until told one."""

    yields_batches = True

    def __iter__(self):
        return iter([[0, 1]])


class _Stream(IterableDataset):
    def __init__(self, yields_batches: bool = False, batch_size: int | None = None) -> None:
        self.yields_batches = yields_batches
        self.batch_size = batch_size
        self.item_buckets = ["a"] * 3  # ignored: a stream is never bucket-sampled here

    def __iter__(self):
        return iter(range(3))


# --- worker_init_fn, called in this process with a fake worker info


def _info(**kw: Any) -> SimpleNamespace:
    base = {"seed": 7, "dataset": object(), "num_workers": 1, "id": 0}
    return SimpleNamespace(**{**base, **kw})


def test_worker_init_fn_seeds_numpy_and_random_with_the_worker_seed_mod_2_32(monkeypatch) -> None:
    seed = 3 * 2**32 + 12345  # torch's worker seeds are 64-bit: numpy takes < 2**32
    monkeypatch.setattr(dmod, "get_worker_info", lambda: _info(seed=seed))
    np.random.seed(0)
    random.seed(0)
    worker_init_fn(0)
    assert np.random.rand() == np.random.RandomState(12345).rand()
    assert random.random() == random.Random(12345).random()


def test_worker_init_fn_outside_a_worker_changes_nothing(monkeypatch) -> None:
    monkeypatch.setattr(dmod, "get_worker_info", lambda: None)
    np.random.seed(5)
    random.seed(5)
    worker_init_fn(0)
    assert np.random.rand() == np.random.RandomState(5).rand()
    assert random.random() == random.Random(5).random()


def test_worker_init_fn_splits_compvis_records_contiguously(monkeypatch) -> None:
    # 10 records over 3 workers: 10 // 3 = 3 each, worker i takes [3 i, 3 i + 3)
    shares = []
    for wid in range(3):
        ds = SimpleNamespace(num_records=10, valid_ids=list(range(100, 110)))
        monkeypatch.setattr(
            dmod, "get_worker_info", lambda ds=ds, wid=wid: _info(dataset=ds, num_workers=3, id=wid)
        )
        worker_init_fn(wid)
        shares.append(ds.sample_ids)
    assert shares == [[100, 101, 102], [103, 104, 105], [106, 107, 108]]
    # only one of the two attributes: not a CompVis iterable, left alone
    for ds in (SimpleNamespace(valid_ids=[1, 2]), SimpleNamespace(num_records=2)):
        monkeypatch.setattr(dmod, "get_worker_info", lambda ds=ds: _info(dataset=ds, num_workers=2))
        worker_init_fn(0)
        assert not hasattr(ds, "sample_ids")


# --- ResumableSampler against torch's DistributedSampler


@pytest.mark.parametrize("size, world", [(10, 3), (10, 1), (12, 4), (2, 5), (1, 3), (7, 2)])
@pytest.mark.parametrize("shuffle", [False, True])
def test_resumable_sampler_equals_distributed_sampler(size: int, world: int, shuffle: bool) -> None:
    for epoch in (0, 3):
        ours, theirs = [], []
        for rank in range(world):
            s = ResumableSampler(size, shuffle, seed=11, rank=rank, world_size=world, epoch=epoch)
            d = DistributedSampler(range(size), world, rank, shuffle=shuffle, seed=11)
            d.set_epoch(epoch)
            ours.append(list(s))
            theirs.append(list(d))
            assert len(s) == len(d) == -(-size // world)
        assert ours == theirs


def test_resumable_sampler_exact_unshuffled_ranks_and_padding() -> None:
    ranks = [list(ResumableSampler(10, False, rank=r, world_size=3)) for r in range(3)]
    assert ranks == [[0, 3, 6, 9], [1, 4, 7, 0], [2, 5, 8, 1]]
    # fewer items than ranks: every rank still gets one (cycled), as DistributedSampler does
    assert [list(ResumableSampler(2, False, rank=r, world_size=5)) for r in range(5)] == [
        [0],
        [1],
        [0],
        [1],
        [0],
    ]


def test_resumable_sampler_order_is_randperm_of_seed_plus_epoch() -> None:
    expect = torch.randperm(9, generator=torch.Generator().manual_seed(4 + 2)).tolist()
    assert list(ResumableSampler(9, True, seed=4, epoch=2)) == expect
    assert list(ResumableSampler(9, True, seed=5, epoch=1)) == expect
    s = ResumableSampler(9, True, seed=4)
    s.set_epoch(2)
    assert list(s) == expect and s.epoch == 2


def test_resumable_sampler_skip_once_and_epoch_hook() -> None:
    calls: list[int] = []
    s = ResumableSampler(10, False, rank=1, world_size=2, epoch=3, skip=2, on_epoch=calls.append)
    assert calls == [3]
    assert list(s) == [5, 7, 9] and list(s) == [1, 3, 5, 7, 9] and len(s) == 5
    s.set_epoch(4)
    assert calls == [3, 4] and s.epoch == 4
    plain = ResumableSampler(4, False)
    plain.set_epoch(1)
    assert plain.epoch == 1 and list(plain) == [0, 1, 2, 3]
    seed0 = torch.randperm(9, generator=torch.Generator().manual_seed(0)).tolist()
    assert list(ResumableSampler(9, True)) == seed0  # default seed 0


# --- ResumableDataLoader: the workers' base seed from (seed, epoch)


def test_resumable_loader_seeds_its_generator_from_seed_and_epoch() -> None:
    sampler = ResumableSampler(6, True, seed=0)
    loader = ResumableDataLoader(_Items(6), batch_size=2, sampler=sampler, seed=9)
    sampler.set_epoch(3)
    iter(loader)
    assert loader.seed == 9 and loader.generator.initial_seed() == 9 * 1_000_003 + 3
    big = 2**62 + 1  # (2**62 + 1) * 1000003 mod 2**63 = 2**62 + 1000003 (1000003 is odd)
    loader = ResumableDataLoader(_Items(6), batch_size=2, seed=big)  # no epoch: epoch 0
    iter(loader)
    assert loader.generator.initial_seed() == 2**62 + 1_000_003
    bs = BucketBatchSampler(["a"] * 4, 2, epoch=5)
    loader = ResumableDataLoader(_Items(4), batch_sampler=bs, seed=2)
    iter(loader)
    assert loader.generator.initial_seed() == 2 * 1_000_003 + 5
    assert loader.state_dict() == {} and loader.load_state_dict({"x": 1}) is None
    assert ResumableDataLoader(_Items(2)).seed == 0


def test_resumable_loader_base_seed_ignores_the_global_stream() -> None:
    loader = ResumableDataLoader(_Items(6), batch_size=2, seed=4)
    torch.manual_seed(1)
    first = next(iter(loader)).tolist()
    torch.manual_seed(2)
    it = iter(loader)
    gen = torch.Generator().manual_seed(4 * 1_000_003)
    expected = torch.empty((), dtype=torch.int64).random_(generator=gen).item()
    assert it._base_seed == expected and next(it).tolist() == first


# --- DataModuleFromConfig: arguments -> DataLoader


def _dm(**kw: Any) -> DataModuleFromConfig:
    args = {"batch_size": 4, "train": TOY, "num_workers": 0, **kw}
    return DataModuleFromConfig(**args)


def test_constructor_validates_batch_size_and_num_workers() -> None:
    for bad in (0, -1, True, 2.0, "4"):
        with pytest.raises(ConfigError, match="batch_size: expected a positive integer"):
            _dm(batch_size=bad)
    for bad in (-1, True, 1.5, "2"):
        with pytest.raises(ConfigError, match="num_workers: expected a whole number >= 0"):
            _dm(num_workers=bad)
    assert _dm(batch_size=1, num_workers=0).num_workers == 0
    assert _dm(num_workers=3).num_workers == 3


def test_default_num_workers_is_min_of_twice_the_batch_and_the_cpus(monkeypatch) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert _dm(batch_size=3, num_workers=None).num_workers == 6
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    assert _dm(batch_size=3, num_workers=None).num_workers == 4
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert _dm(batch_size=3, num_workers=None).num_workers == 1


def test_hooks_exist_only_for_configured_splits() -> None:
    dm = DataModuleFromConfig(batch_size=2, predict=TOY, num_workers=0)
    assert dm.dataset_configs == {"predict": TOY}
    assert hasattr(dm, "predict_dataloader")
    assert [int(i) for b in dm.predict_dataloader() for i in b["index"]] == list(range(10))
    dm = _dm(validation=None, test=TOY)
    assert set(dm.dataset_configs) == {"train", "test"}
    assert dm.test_dataloader().sampler.shuffle is False


@pytest.mark.parametrize(
    "flags", [{}, {"shuffle_val_dataloader": True, "shuffle_test_loader": True}]
)
def test_shuffle_per_split(flags: dict) -> None:
    dm = _dm(validation=TOY, test=TOY, predict=TOY, **flags)
    on = bool(flags)
    got = {
        "train": dm.train_dataloader().sampler.shuffle,
        "validation": dm.val_dataloader().sampler.shuffle,
        "test": dm.test_dataloader().sampler.shuffle,
        "predict": dm.predict_dataloader().sampler.shuffle,
    }
    assert got == {"train": True, "validation": on, "test": on, "predict": False}


def test_map_dataset_loader_arguments() -> None:
    dm = _dm(batch_size=3, num_workers=2, seed=5)
    dm.datasets["train"] = ds = _Items(10)
    loader = dm.train_dataloader()
    assert type(loader) is ResumableDataLoader
    assert (loader.batch_size, loader.num_workers, loader.seed) == (3, 2, 5)
    assert loader.persistent_workers is True and loader.worker_init_fn is None
    assert loader.drop_last is False
    s = loader.sampler
    assert isinstance(s, ResumableSampler)
    assert (s.size, s.shuffle, s.seed, s.rank, s.world_size, s.epoch) == (10, True, 5, 0, 1, 0)
    assert list(s) == torch.randperm(10, generator=torch.Generator().manual_seed(5)).tolist()
    assert ds.epochs == [0]  # the data set's set_epoch is the sampler's hook
    s.set_epoch(2)
    assert ds.epochs == [0, 2]
    dm = _dm(num_workers=0, use_worker_init_fn=True)
    loader = dm.train_dataloader()  # builds the data sets itself (no setup call)
    assert loader.worker_init_fn is worker_init_fn and loader.persistent_workers is False
    assert isinstance(dm.datasets["train"], Dataset) and len(loader.sampler) == 10


def test_seed_from_argument_else_pl_global_seed_else_zero(monkeypatch) -> None:
    monkeypatch.setenv("PL_GLOBAL_SEED", "11")
    assert _dm(seed=0)._seed() == 0 and _dm(seed=3)._seed() == 3
    assert _dm()._seed() == 11 and _dm().train_dataloader().sampler.seed == 11
    monkeypatch.delenv("PL_GLOBAL_SEED")
    assert _dm()._seed() == 0


def test_iterable_dataset_loader_arguments() -> None:
    dm = _dm(batch_size=2)
    dm.datasets["train"] = _Stream()
    loader = dm.train_dataloader()
    assert type(loader) is DataLoader and loader.batch_size == 2
    assert loader.worker_init_fn is worker_init_fn  # always, for the CompVis record split
    assert not isinstance(loader.batch_sampler, BucketBatchSampler)
    assert [b.tolist() for b in loader] == [[0, 1], [2]]
    dm.datasets["train"] = stream = _Stream(yields_batches=True)
    loader = dm.train_dataloader()
    assert loader.batch_size is None and stream.batch_size == 2  # the stream batches itself
    dm.datasets["train"] = stream = _Stream(yields_batches=True, batch_size=5)
    assert dm.train_dataloader().batch_size is None and stream.batch_size == 5  # kept
    dm.datasets["train"] = stream = _Stream(yields_batches=False, batch_size=5)
    assert dm.train_dataloader().batch_size == 2
    dm.datasets["train"] = stream = _BatchStream()
    assert dm.train_dataloader().batch_size is None and stream.batch_size == 2
    dm = _dm(batch_size=2, num_workers=1)
    dm.datasets["train"] = _Items(4)
    assert dm.train_dataloader().persistent_workers is True


def test_bucketed_dataset_loader_arguments(monkeypatch) -> None:
    dm = _dm(batch_size=2, num_workers=2, seed=4, use_worker_init_fn=True, validation=TOY)
    dm.datasets["train"] = ds = _Bucketed()
    dm.datasets["validation"] = _Bucketed()
    monkeypatch.setattr(dm, "_ranks", lambda: (1, 2))
    monkeypatch.setattr(dm, "_position", lambda: (3, 1))
    loader = dm.train_dataloader()
    assert type(loader) is ResumableDataLoader
    assert (loader.seed, loader.num_workers, loader.persistent_workers) == (4, 2, True)
    assert loader.worker_init_fn is worker_init_fn and loader.batch_size is None
    b = loader.batch_sampler
    assert isinstance(b, BucketBatchSampler)
    got = (b.batch_size, b.shuffle, b.seed, b.rank, b.world_size, b.epoch)
    assert got == (2, True, 4, 1, 2, 3)
    assert ds.epochs == [3]
    full = BucketBatchSampler(ds.item_buckets, 2, seed=4, rank=1, world_size=2, epoch=3)
    assert list(b) == list(full)[1:]  # skips the consumed batches (not items)
    val = dm.val_dataloader().batch_sampler  # no resume position outside training
    assert (val.shuffle, val.epoch, val.rank, val.world_size) == (False, 0, 1, 2)
    assert list(val) == [[4], [5]]
    dm = _dm(batch_size=2, num_workers=0)
    dm.datasets["train"] = _Bucketed()
    loader = dm.train_dataloader()
    assert loader.worker_init_fn is None and loader.persistent_workers is False
    assert sorted(i for b in loader for i in b.tolist()) == list(range(6))  # the data set's items
    dm = _dm(batch_size=2, num_workers=1)
    dm.datasets["train"] = _BucketedNoEpochHook()
    loader = dm.train_dataloader()
    assert loader.persistent_workers is True and loader.batch_sampler.on_epoch is None


def test_train_resume_position_reaches_the_sampler(monkeypatch) -> None:
    dm = _dm(batch_size=3, validation=TOY, seed=1)
    dm.setup()
    monkeypatch.setattr(dm, "_ranks", lambda: (1, 2))
    monkeypatch.setattr(dm, "_position", lambda: (2, 1))
    s = dm.train_dataloader().sampler
    assert (s.rank, s.world_size, s.epoch) == (1, 2, 2)
    d = DistributedSampler(range(10), 2, 1, shuffle=True, seed=1)
    d.set_epoch(2)
    assert list(s) == list(d)[3:]  # 1 batch of 3 consumed
    v = dm.val_dataloader().sampler
    assert (v.rank, v.world_size, v.epoch) == (1, 2, 0) and list(v) == [1, 3, 5, 7, 9]


# --- _ranks and _position from the trainer


def _trainer(**kw: Any) -> SimpleNamespace:
    return SimpleNamespace(global_rank=1, world_size=3, ckpt_path=None, current_epoch=0, **kw)


def test_ranks() -> None:
    dm = _dm(seed=2)
    assert dm._ranks() == (0, 1)  # no trainer
    dm.trainer = _trainer()  # no accelerator connector: Lightning's default (it distributes)
    assert dm._ranks() == (0, 1)
    dm.trainer = _trainer(_accelerator_connector=SimpleNamespace())
    assert dm._ranks() == (0, 1)
    dm.trainer = _trainer(_accelerator_connector=SimpleNamespace(use_distributed_sampler=True))
    assert dm._ranks() == (0, 1)
    dm.trainer = _trainer(_accelerator_connector=SimpleNamespace(use_distributed_sampler=False))
    assert dm._ranks() == (1, 3)
    for rank in range(3):
        dm.trainer.global_rank = rank
        expect = DistributedSampler(range(10), 3, rank, shuffle=True, seed=2)
        assert list(dm.train_dataloader().sampler) == list(expect)


def _fit_trainer(ckpt: str | None, epoch: int, last: bool, started: int, processed: int, done: int):
    batches = SimpleNamespace(is_last_batch=last, current=SimpleNamespace(processed=done))
    loop = SimpleNamespace(
        epoch_progress=SimpleNamespace(
            current=SimpleNamespace(started=started, processed=processed)
        ),
        epoch_loop=SimpleNamespace(batch_progress=batches),
    )
    return SimpleNamespace(ckpt_path=ckpt, current_epoch=epoch, fit_loop=loop)


def test_position() -> None:
    dm = _dm()
    assert dm._position() == (0, 0)
    dm.trainer = _fit_trainer(None, 4, False, 5, 4, 7)  # a fresh fit at epoch 4
    assert dm._position() == (4, 0)
    dm.trainer = _fit_trainer("", 4, False, 5, 4, 7)
    assert dm._position() == (4, 0)
    dm.trainer = _fit_trainer("last.ckpt", 4, False, 5, 4, 7)  # mid-epoch: 7 batches done
    assert dm._position() == (4, 7)
    dm.trainer = _fit_trainer("last.ckpt", 4, True, 5, 4, 7)  # after the epoch's last batch
    assert dm._position() == (5, 0)
    dm.trainer = _fit_trainer("last.ckpt", 4, True, 5, 5, 7)  # counted as done already
    assert dm._position() == (4, 0)


# --- building the data sets


def test_build_wrap_empty_and_prepare_once() -> None:
    dm = _dm(wrap=True, validation={"target": "toy_model.ToyDataset", "params": {"n": 1}})
    sentinel = _Items(3)
    dm.datasets["train"] = sentinel
    dm.setup()
    assert dm.datasets["train"] is sentinel  # built ones are kept
    val = dm.datasets["validation"]
    assert isinstance(val, WrappedDataset) and len(val) == 1 and int(val[0]["index"]) == 0
    it = _dm(train={"target": "toy_model.ToyIterable", "params": {"n": 2}})
    it.setup()  # no __len__: not checked for emptiness
    assert not isinstance(it.datasets["train"], WrappedDataset)
    empty = _dm(train={"target": "toy_model.ToyDataset", "params": {"n": 0}}, wrap=True)
    with pytest.raises(ConfigError, match="data.params.train: the train dataset is empty"):
        empty.setup()
    # the message names where the split's config is in the user's file
    cfg = OmegaConf.create({"mydata": {"train": {"target": "toy_model.ToyDataset"}}})
    cfg.mydata.train.params = {"n": 0}
    with pytest.raises(ConfigError, match="^mydata.train: the train dataset is empty"):
        _dm(train=cfg.mydata.train).setup()
