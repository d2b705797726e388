"""CompVis LR schedules: values from their formulas and use through LambdaLR, stepped per step."""

import math

import pytest
import torch

from ldm.lr_scheduler import (
    LambdaLinearScheduler,
    LambdaWarmUpCosineScheduler,
    LambdaWarmUpCosineScheduler2,
)


def test_warmup_cosine_absolute_lr():
    s = LambdaWarmUpCosineScheduler(
        warm_up_steps=10, lr_min=0.1, lr_max=1.0, lr_start=0.0, max_decay_steps=110
    )
    assert s(0) == 0.0
    assert s(5) == pytest.approx(0.5)
    assert s(10) == pytest.approx(1.0)
    assert s(60) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 2)))
    assert s(110) == pytest.approx(0.1)
    assert s(10_000) == pytest.approx(0.1)


def test_cycles_of_cosine_scheduler2():
    s = LambdaWarmUpCosineScheduler2(
        warm_up_steps=[2, 4],
        f_min=[0.1, 0.0],
        f_max=[1.0, 0.5],
        f_start=[0.0, 0.2],
        cycle_lengths=[10, 20],
    )
    assert s(1) == pytest.approx(0.5)
    assert s(6) == pytest.approx(0.1 + 0.45 * (1 + math.cos(0.5 * math.pi)))
    # second cycle starts after step 10: warm-up from 0.2 to 0.5 over 4 steps
    assert s(12) == pytest.approx(0.2 + 0.3 / 4 * 2)
    assert s(30) == pytest.approx(0.0, abs=1e-12)


def test_sd_linear_warmup_config():
    """SD v1/v2 configs: f from 1e-6 to 1 over 10k steps, then constant 1 (f_min = f_max)."""
    s = LambdaLinearScheduler(
        warm_up_steps=[10000],
        cycle_lengths=[10000000000000],
        f_start=[1e-6],
        f_max=[1.0],
        f_min=[1.0],
    )
    assert s(0) == pytest.approx(1e-6)
    assert s(5000) == pytest.approx(1e-6 + (1 - 1e-6) / 2)
    assert s(10000) == pytest.approx(1.0)
    assert s(10**6) == pytest.approx(1.0)
    decaying = LambdaLinearScheduler(
        warm_up_steps=[0], cycle_lengths=[100], f_start=[1.0], f_max=[1.0], f_min=[0.0]
    )
    assert decaying(25) == pytest.approx(0.75)


def test_lambda_lr_steps_per_step():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=2.0)
    s = LambdaLinearScheduler(
        warm_up_steps=[4], cycle_lengths=[100], f_start=[0.0], f_max=[1.0], f_min=[1.0]
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda=s.schedule)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0, 2.0])


def test_mismatched_cycle_lists_are_rejected():
    with pytest.raises(ValueError, match="one entry per cycle"):
        LambdaLinearScheduler(
            warm_up_steps=[1, 2], cycle_lengths=[10], f_start=[0.0], f_max=[1.0], f_min=[1.0]
        )
