"""Collation that names what breaks the CompVis data contract (DESIGN.md, contracts item 5).

``default_collate`` fails with messages such as ``default_collate: ... found <class
'NoneType'>`` that name neither the item key nor the data set. :class:`CheckedCollate` wraps it:
such a failure becomes a :class:`~ldm.util.ConfigError` naming the key, the offending value's type
and the data set, with the contract and the fix; optionally the first batch it builds is checked
against the image convention (:func:`ldm.data.item_contract.check_batch`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import default_collate

from ldm.data.item_contract import CONTRACT, check_batch
from ldm.util import ConfigError

_MISSING = object()
_SCALARS = (int, float, bool, str, bytes, np.number, np.bool_)


def dataset_name(dataset: Any) -> str:
    """``module.Class`` of the user's data set (the wrapped one for ``WrappedDataset``)."""
    inner = getattr(dataset, "__dict__", {}).get("data") if _is_wrapper(dataset) else None
    target = inner if inner is not None else dataset
    cls = type(target)
    name = f"{cls.__module__}.{cls.__qualname__}"
    return f"{name} (in WrappedDataset)" if inner is not None else name


def _is_wrapper(dataset: Any) -> bool:
    return type(dataset).__name__ == "WrappedDataset"


def _type_name(value: Any) -> str:
    if value is _MISSING:
        return "no value (key absent)"
    if isinstance(value, np.ndarray):
        return f"numpy.ndarray (dtype {value.dtype}, shape {tuple(value.shape)})"
    if isinstance(value, torch.Tensor):
        return f"torch.Tensor (dtype {value.dtype}, shape {tuple(value.shape)})"
    cls = type(value)
    return (
        cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    )


def _fix_for(value: Any) -> str:
    """What to change in the data set so that ``value`` collates."""
    if value is None:
        return (
            "yield a value in every item (an empty string for a missing caption), or leave such "
            "items out of the data set"
        )
    if type(value).__module__.startswith("PIL."):
        return (
            "convert the image in __getitem__: np.asarray(img.convert('RGB'), dtype=np.float32) "
            "/ 127.5 - 1 (H x W x C float in [-1, 1])"
        )
    if isinstance(value, np.ndarray) and value.dtype == object:
        return "yield numeric arrays (float32 for images), not arrays of Python objects"
    return "yield tensors, numpy arrays, numbers or strings under this key"


def _shape(value: Any) -> tuple[int, ...] | None:
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return tuple(value.shape)
    return None


def _key_problem(key: Any, values: list[Any]) -> tuple[str, str] | None:
    """(what is wrong, the fix) for one key's values across the batch, or None."""
    present = [v for v in values if v is not _MISSING]
    if len(present) < len(values):
        return (
            f"is missing from {len(values) - len(present)} of {len(values)} items",
            "yield the same keys in every item",
        )
    for value in present:
        if value is None or type(value).__module__.startswith("PIL."):
            return f"holds {_type_name(value)}", _fix_for(value)
        if isinstance(value, np.ndarray) and value.dtype == object:
            return f"holds {_type_name(value)}", _fix_for(value)
        plain = isinstance(value, (np.ndarray, torch.Tensor, Mapping, Sequence, *_SCALARS))
        if not plain:
            return f"holds {_type_name(value)}", _fix_for(value)
    kinds = {type(v) for v in present}
    if len(kinds) > 1 and not all(issubclass(k, (int, float, bool)) for k in kinds):
        names = ", ".join(sorted({_type_name(v).split(" ")[0] for v in present}))
        return f"holds values of different types ({names})", "yield one type under each key"
    shapes = {_shape(v) for v in present}
    if len(shapes) > 1:
        listed = ", ".join(str(s) for s in sorted(shapes, key=str)[:4])
        return (
            f"holds arrays of different shapes ({listed})",
            "give every item the same size (the data set's size/crop parameters), or use "
            "aspect-ratio buckets (item_buckets) so that a batch holds one size",
        )
    return None


def describe_failure(items: Sequence[Any], dataset: str, err: Exception) -> str | None:
    """The message for dict items that ``default_collate`` could not stack; None when no key
    breaks the contract (the failure has another cause, e.g. shared memory in a worker)."""
    if not items or not all(isinstance(item, Mapping) for item in items):
        return None  # not CompVis items: the original error says more than a guess would
    keys: list[Any] = []
    for item in items:
        keys += [k for k in item if k not in keys]
    for key in keys:
        problem = _key_problem(key, [item.get(key, _MISSING) for item in items])
        if problem is not None:
            what, fix = problem
            return (
                f"data set {dataset}: its items cannot be collated into a batch: key '{key}' "
                f"{what}. Fix: {fix}. {CONTRACT} (collate said: {type(err).__name__}: {err})"
            )
    return None


def _check_lists(batch: Mapping[Any, Any], dataset: str) -> None:
    """``default_collate`` passes a None through when the batch's first value is a string."""
    for key, value in batch.items():
        if isinstance(value, list) and any(v is None for v in value):
            nones = sum(v is None for v in value)
            raise ConfigError(
                f"data set {dataset}: key '{key}' holds None in {nones} of {len(value)} items of "
                f"a batch. Fix: {_fix_for(None)}. {CONTRACT}"
            )


class CheckedCollate:
    """``collate`` with failures explained; checks the first batch it builds when ``check``.

    Picklable (worker processes get a copy; each checks its own first batch once).
    ``image_key``: the model's image key (``first_stage_key``) when known, which makes the
    check strict (errors instead of warnings).
    """

    def __init__(
        self,
        dataset: str,
        collate: Callable[[Any], Any] = default_collate,
        image_key: str | None = None,
        check: bool = False,
    ) -> None:
        self.dataset, self.collate = dataset, collate
        self.image_key, self.check = image_key, check

    def __call__(self, items: Any) -> Any:
        try:
            batch = self.collate(items)
        except (TypeError, RuntimeError, KeyError) as err:
            message = (
                describe_failure(items, self.dataset, err) if isinstance(items, list) else None
            )
            if message is None:
                raise
            raise ConfigError(message) from err
        if isinstance(batch, Mapping):
            _check_lists(batch, self.dataset)
        if self.check:
            self.check = False  # the first batch only
            check_batch(batch, self.dataset, self.image_key)
        return batch
