"""Learning-rate multipliers for `torch.optim.lr_scheduler.LambdaLR`, with CompVis names and params.

`LambdaWarmUpCosineScheduler` returns an absolute lr; the `*2` / `LambdaLinearScheduler` variants
return a factor f(n) multiplying the base lr, piecewise over cycles (SGDR, Loshchilov & Hutter 2017):
linear warm-up from f_start to f_max, then cosine (or linear) decay to f_min over the cycle.
Configs use them as `scheduler_config: {target: ldm.lr_scheduler.LambdaLinearScheduler, params}`;
the diffusion module wraps `.schedule` in LambdaLR stepped every optimizer step.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

__all__ = [
    "LambdaWarmUpCosineScheduler",
    "LambdaWarmUpCosineScheduler2",
    "LambdaLinearScheduler",
]

logger = logging.getLogger(__name__)


class LambdaWarmUpCosineScheduler:
    """Absolute lr: linear warm-up lr_start -> lr_max, then cosine lr_max -> lr_min at max_decay_steps."""

    def __init__(
        self,
        warm_up_steps: int,
        lr_min: float,
        lr_max: float,
        lr_start: float,
        max_decay_steps: int,
        verbosity_interval: int = 0,
    ) -> None:
        if max_decay_steps <= warm_up_steps:
            raise ValueError(
                f"LambdaWarmUpCosineScheduler: max_decay_steps ({max_decay_steps}) must exceed "
                f"warm_up_steps ({warm_up_steps})."
            )
        self.lr_warm_up_steps = warm_up_steps
        self.lr_start = lr_start
        self.lr_min = lr_min
        self.lr_max = lr_max
        self.lr_max_decay_steps = max_decay_steps
        self.last_lr = 0.0
        self.verbosity_interval = verbosity_interval

    def schedule(self, n: int, **kwargs: object) -> float:
        """lr at optimizer step n."""
        if self.verbosity_interval > 0 and n % self.verbosity_interval == 0:
            logger.info("current step: %d, recent lr-multiplier: %g", n, self.last_lr)
        if n < self.lr_warm_up_steps:
            lr = (self.lr_max - self.lr_start) / self.lr_warm_up_steps * n + self.lr_start
        else:
            t = (n - self.lr_warm_up_steps) / (self.lr_max_decay_steps - self.lr_warm_up_steps)
            t = min(t, 1.0)
            lr = self.lr_min + 0.5 * (self.lr_max - self.lr_min) * (1 + math.cos(t * math.pi))
        self.last_lr = lr
        return lr

    def __call__(self, n: int, **kwargs: object) -> float:
        return self.schedule(n, **kwargs)


class LambdaWarmUpCosineScheduler2:
    """Factor per cycle i: warm-up f_start[i] -> f_max[i], cosine f_max[i] -> f_min[i] over cycle_lengths[i]."""

    def __init__(
        self,
        warm_up_steps: Sequence[int],
        f_min: Sequence[float],
        f_max: Sequence[float],
        f_start: Sequence[float],
        cycle_lengths: Sequence[int],
        verbosity_interval: int = 0,
    ) -> None:
        lists = {
            "warm_up_steps": list(warm_up_steps),
            "f_min": list(f_min),
            "f_max": list(f_max),
            "f_start": list(f_start),
            "cycle_lengths": list(cycle_lengths),
        }
        lengths = {k: len(v) for k, v in lists.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(
                f"{type(self).__name__}: warm_up_steps, f_min, f_max, f_start and cycle_lengths "
                f"need one entry per cycle; got lengths {lengths}."
            )
        self.lr_warm_up_steps = lists["warm_up_steps"]
        self.f_start = lists["f_start"]
        self.f_min = lists["f_min"]
        self.f_max = lists["f_max"]
        self.cycle_lengths = lists["cycle_lengths"]
        self.cum_cycles = [0]
        for length in self.cycle_lengths:
            self.cum_cycles.append(self.cum_cycles[-1] + length)
        self.last_f = 0.0
        self.verbosity_interval = verbosity_interval

    def find_in_interval(self, n: int) -> int:
        """Index of the cycle containing step n (the last cycle beyond the end)."""
        for i, end in enumerate(self.cum_cycles[1:]):
            if n <= end:
                return i
        return len(self.cycle_lengths) - 1

    def _warm_up(self, cycle: int, n: int) -> float:
        span = self.f_max[cycle] - self.f_start[cycle]
        return span / self.lr_warm_up_steps[cycle] * n + self.f_start[cycle]

    def _decay(self, cycle: int, n: int) -> float:
        t = (n - self.lr_warm_up_steps[cycle]) / (
            self.cycle_lengths[cycle] - self.lr_warm_up_steps[cycle]
        )
        t = min(t, 1.0)
        return self.f_min[cycle] + 0.5 * (self.f_max[cycle] - self.f_min[cycle]) * (
            1 + math.cos(t * math.pi)
        )

    def schedule(self, n: int, **kwargs: object) -> float:
        """Multiplier of the base lr at optimizer step n."""
        cycle = self.find_in_interval(n)
        n = n - self.cum_cycles[cycle]
        if self.verbosity_interval > 0 and n % self.verbosity_interval == 0:
            logger.info(
                "current step: %d, recent lr-multiplier: %g, cycle %d", n, self.last_f, cycle
            )
        if n < self.lr_warm_up_steps[cycle]:
            f = self._warm_up(cycle, n)
        else:
            f = self._decay(cycle, n)
        self.last_f = f
        return f

    def __call__(self, n: int, **kwargs: object) -> float:
        return self.schedule(n, **kwargs)


class LambdaLinearScheduler(LambdaWarmUpCosineScheduler2):
    """As LambdaWarmUpCosineScheduler2 but the decay after warm-up is linear:
    f = f_min + (f_max - f_min) (L - n) / L for cycle length L (SD's 10k-step warm-up schedule)."""

    def _decay(self, cycle: int, n: int) -> float:
        length = self.cycle_lengths[cycle]
        return self.f_min[cycle] + (self.f_max[cycle] - self.f_min[cycle]) * (length - n) / length
