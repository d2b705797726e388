"""DataModuleFromConfig (CompVis parameters) and its resumable, rank-splitting sampler."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import Dataset

from ldm.data.datamodule import DataModuleFromConfig, ResumableSampler, WrappedDataset  # noqa: E402
from ldm.util import ConfigError, instantiate_from_config  # noqa: E402


def _cfg(**params: object) -> dict:
    return {
        "target": "main.DataModuleFromConfig",
        "params": {"batch_size": 4, "num_workers": 0, **params},
    }


TRAIN = {"target": "toy_model.ToyDataset", "params": {"n": 10}}


def test_sampler_is_deterministic_per_epoch_and_splits_ranks() -> None:
    s = ResumableSampler(10, shuffle=True, seed=5)
    first = list(s)
    assert sorted(first) == list(range(10)) and first == list(ResumableSampler(10, True, seed=5))
    s.set_epoch(1)
    assert list(s) != first and sorted(s) == list(range(10))
    ranks = [list(ResumableSampler(10, True, seed=5, rank=r, world_size=3)) for r in range(3)]
    assert [len(r) for r in ranks] == [4, 4, 4]  # padded to 12 like DistributedSampler
    assert set().union(*ranks) == set(range(10))
    assert sorted(i for r in ranks for i in r) == sorted(first + first[:2])  # exactly 2 repeats


def test_sampler_skips_a_consumed_prefix_once() -> None:
    full = list(ResumableSampler(12, True, seed=1, epoch=2))
    s = ResumableSampler(12, True, seed=1, epoch=2, skip=8)
    assert list(s) == full[8:]
    assert list(s) == full  # the skip applies to the first iteration only
    assert len(s) == 12


def test_datamodule_builds_only_configured_splits() -> None:
    dm = instantiate_from_config(
        OmegaConf.create({"data": _cfg(train=TRAIN, validation=TRAIN)}).data
    )
    assert isinstance(dm, DataModuleFromConfig)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert [len(b["x"]) for b in batches] == [4, 4, 2]
    assert sorted(int(i) for b in batches for i in b["index"]) == list(range(10))
    val = [int(i) for b in dm.val_dataloader() for i in b["index"]]
    assert val == list(range(10))  # validation is not shuffled by default
    from pytorch_lightning.utilities.model_helpers import is_overridden

    assert is_overridden("train_dataloader", dm) and is_overridden("val_dataloader", dm)
    assert not is_overridden("test_dataloader", dm) and not is_overridden("predict_dataloader", dm)


def test_shuffle_options_wrap_and_iterable() -> None:
    dm = DataModuleFromConfig(
        batch_size=10,
        train=TRAIN,
        test=TRAIN,
        shuffle_test_loader=True,
        wrap=True,
        num_workers=0,
        seed=7,
    )
    dm.setup()
    assert isinstance(dm.datasets["train"], WrappedDataset)
    test_order = [int(i) for i in next(iter(dm.test_dataloader()))["index"]]
    assert test_order != list(range(10)) and sorted(test_order) == list(range(10))
    it = DataModuleFromConfig(
        batch_size=3, train={"target": "toy_model.ToyIterable", "params": {"n": 7}}, num_workers=0
    )
    it.setup()
    loader = it.train_dataloader()
    assert loader.sampler is not None and not isinstance(
        loader.sampler, ResumableSampler
    )  # no shuffle
    assert [int(i) for b in loader for i in b["index"]] == list(range(7))


class _NumpyNoise(Dataset):
    """Each item: (its worker's seed, a numpy draw, a `random` draw)."""

    def __len__(self) -> int:
        return 6

    def __getitem__(self, i: int) -> tuple[int, float, float]:
        seed = torch.utils.data.get_worker_info().seed
        return seed, float(np.random.rand()), random.random()


def test_worker_init_fn_seeds_numpy_and_random_from_the_worker_seed() -> None:
    dm = DataModuleFromConfig(
        batch_size=1,
        train={"target": "tests.data.test_datamodule._NumpyNoise"},
        num_workers=2,
        use_worker_init_fn=True,
    )
    dm.datasets["train"] = _NumpyNoise()
    torch.manual_seed(0)
    draws: dict[int, list[tuple[float, float]]] = {}
    for seed, a, b in dm.train_dataloader():
        draws.setdefault(int(seed), []).append((float(a), float(b)))
    assert len(draws) == 2 and all(len(v) == 3 for v in draws.values())
    for seed, values in draws.items():
        # the streams np.random.seed(seed mod 2^32) and random.seed(seed mod 2^32) give; the
        # DataLoader's own numpy seeding (a SeedSequence of the base seed) gives other numbers
        expect_np = np.random.RandomState(seed % 2**32).rand(3)
        expect_py = random.Random(seed % 2**32)
        assert [a for a, _ in values] == pytest.approx(list(expect_np), abs=0, rel=1e-12)
        assert [b for _, b in values] == [expect_py.random() for _ in range(3)]


def test_errors_are_readable() -> None:
    with pytest.raises(ConfigError, match="batch_size: expected a positive integer, found 0"):
        DataModuleFromConfig(batch_size=0, train=TRAIN)
    with pytest.raises(ConfigError, match="no split configured"):
        DataModuleFromConfig(batch_size=2)
    dm = DataModuleFromConfig(
        batch_size=2, train={"target": "toy_model.ToyDataset", "params": {"n": 0}}
    )
    with pytest.raises(ConfigError, match="train dataset is empty"):
        dm.setup()
    dm = instantiate_from_config(
        OmegaConf.create(
            {"data": _cfg(train={"target": "toy_model.ToyDataset", "params": {"m": 1}})}
        ).data
    )
    with pytest.raises(
        ConfigError, match=r"data.params.train.params.m: ToyDataset has no parameter 'm'"
    ):
        dm.setup()
