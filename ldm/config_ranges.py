"""Ranges of the numeric ``lightning.trainer`` values, checked when the config is read.

Lightning checks some of these only when training starts (``accumulate_grad_batches: 0`` ends in a
ZeroDivisionError there); here a value out of range is a :class:`~ldm.util.ConfigError` that names
the key, the file that set it, the range and the value.
"""

from __future__ import annotations

import math
from typing import Any

from ldm.config import ConfigSources
from ldm.util import ConfigError

__all__ = ["check_trainer_ranges"]

#: integer Trainer arguments -> smallest allowed value (-1 = "unlimited" where Lightning has it)
INT_MIN = {
    "max_epochs": -1,
    "min_epochs": 0,
    "max_steps": -1,
    "min_steps": 0,
    "num_nodes": 1,
    "accumulate_grad_batches": 1,
    "log_every_n_steps": 0,
    "check_val_every_n_epoch": 1,
    "num_sanity_val_steps": -1,
    "reload_dataloaders_every_n_epochs": 0,
}
#: Trainer arguments that take no null (their Lightning default is a number)
NOT_NULL = {
    "accumulate_grad_batches",
    "num_nodes",
    "max_steps",
    "reload_dataloaders_every_n_epochs",
}
#: larger integers overflow inside Lightning (int32 counters, tensors)
INT_MAX = 2**31 - 1
#: "an int counts batches, a float is a fraction of them" Trainer arguments
FRACTION_OR_COUNT = {
    "limit_train_batches",
    "limit_val_batches",
    "limit_test_batches",
    "limit_predict_batches",
    "overfit_batches",
}


def _fail(key: str, sources: ConfigSources, expected: str, value: Any) -> ConfigError:
    where = sources.where(f"lightning.trainer.{key}")
    return ConfigError(
        f"lightning.trainer.{key}{where}: expected {expected}, found {value!r}. "
        f"Fix the value of {key} in that file or on the command line (trainer.{key}=...)."
    )


def _check(key: str, value: Any, sources: ConfigSources) -> None:
    if value is None and key in NOT_NULL:
        raise _fail(key, sources, "a whole number (leave the key out for the default)", value)
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise _fail(key, sources, "a finite number", value)
    if key in INT_MIN and isinstance(value, int) and not INT_MIN[key] <= value <= INT_MAX:
        low = INT_MIN[key]
        extra = " (-1: no limit)" if low == -1 else ""
        raise _fail(key, sources, f"a whole number in [{low}, {INT_MAX}]{extra}", value)
    if (
        isinstance(value, int)
        and abs(value) > INT_MAX
        and key in FRACTION_OR_COUNT | {"val_check_interval"}
    ):
        raise _fail(key, sources, f"a count up to {INT_MAX}", value)
    if key in FRACTION_OR_COUNT:
        if isinstance(value, int) and value < 0:
            raise _fail(key, sources, "a batch count >= 0 or a fraction in [0, 1]", value)
        if isinstance(value, float) and not 0.0 <= value <= 1.0:
            raise _fail(key, sources, "a batch count >= 0 or a fraction in [0, 1]", value)
    if key == "val_check_interval":
        if (isinstance(value, int) and value < 1) or (
            isinstance(value, float) and not 0.0 < value <= 1.0
        ):
            raise _fail(key, sources, "a batch count >= 1 or a fraction in (0, 1]", value)
    if key == "gradient_clip_val" and isinstance(value, int | float) and value < 0:
        raise _fail(key, sources, "a number >= 0 (0: no clipping)", value)


def check_trainer_ranges(trainer_kwargs: dict[str, Any], sources: ConfigSources) -> None:
    """Raise a ConfigError for the first numeric Trainer argument out of its range."""
    for key, value in trainer_kwargs.items():
        _check(key, value, sources)
