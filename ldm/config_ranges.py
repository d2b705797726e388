"""Ranges of the numeric ``lightning.trainer`` values, checked when the config is read, and the
values a constructor parameter's annotation allows (command-line overrides, :mod:`ldm.config`).

Lightning checks some of these only when training starts (``accumulate_grad_batches: 0`` ends in a
ZeroDivisionError there); here a value out of range is a :class:`~ldm.util.ConfigError` that names
the key, the file that set it, the range and the value.
"""

from __future__ import annotations

import collections.abc as abc
import inspect
import math
import os
import types
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

from omegaconf import DictConfig, ListConfig

from ldm.util import ConfigError, get_obj_from_str

if TYPE_CHECKING:
    from ldm.config import ConfigSources

__all__ = [
    "NO_ANNOTATION",
    "check_trainer_ranges",
    "describe_annotation",
    "examples",
    "fits_annotation",
    "parameter_annotation",
]

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


NO_ANNOTATION: Any = inspect.Parameter.empty


def parameter_annotation(target: str, name: str) -> tuple[Any, str]:
    """``(annotation, as written)`` of ``name`` in ``target``'s constructor, following ``**kwargs``
    up the MRO; ``NO_ANNOTATION`` when there is none to read (unannotated, unimportable)."""
    try:
        cls = get_obj_from_str(target)
    except Exception:  # noqa: BLE001 - an unimportable target is reported when it is built
        return NO_ANNOTATION, ""
    for klass in getattr(cls, "__mro__", (cls,)):
        init = klass.__init__ if isinstance(klass, type) else klass
        try:
            params = inspect.signature(init).parameters
        except (TypeError, ValueError):
            break
        if name in params:
            ann = params[name].annotation
            if ann is NO_ANNOTATION and _forwards(init, name):
                continue  # a declared __signature__ (LatentDiffusion): the annotation is above
            if not isinstance(ann, str):
                return ann, inspect.formatannotation(ann)
            try:  # `from __future__ import annotations`: evaluate in the defining module
                return eval(ann, dict(getattr(init, "__globals__", {}))), ann  # noqa: S307
            except Exception:  # noqa: BLE001 - a name only imported for type checking
                return NO_ANNOTATION, ""
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            break
    return NO_ANNOTATION, ""


def _forwards(init: Any, name: str) -> bool:
    """Whether ``init``'s code passes ``name`` on through ``**kwargs`` (it does not declare it)."""
    code = getattr(init, "__code__", None)
    if code is None or not code.co_flags & inspect.CO_VARKEYWORDS:
        return False
    return name not in code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]


def _all_fit(results: Iterable[bool | None]) -> bool | None:
    results = list(results)
    return False if False in results else (None if None in results else True)


def fits_annotation(ann: Any, value: Any) -> bool | None:
    """Whether a YAML value fits a parameter annotation; None when the annotation cannot tell
    (a class such as ``nn.Module``, ``Callable``)."""
    if ann is Any or ann is object or isinstance(ann, TypeVar):
        return True
    if ann is None or ann is type(None):
        return value is None
    origin, args = get_origin(ann), get_args(ann)
    if origin is Annotated:
        return fits_annotation(args[0], value)
    if origin is Union or origin is types.UnionType:
        results = [fits_annotation(a, value) for a in args]
        return True if True in results else (None if None in results else False)
    if origin is Literal:
        return any(type(a) is type(value) and a == value for a in args)
    base = origin or ann
    if not isinstance(base, type):
        return None
    if base is bool:
        return isinstance(value, bool)
    if base is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if base is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if base is str or issubclass(base, os.PathLike | Path):
        return isinstance(value, str)
    if issubclass(base, abc.Mapping):
        if not isinstance(value, DictConfig):
            return False
        return (
            _all_fit(fits_annotation(args[1], value[k]) for k in value) if len(args) == 2 else True
        )
    if issubclass(base, abc.Sequence | abc.Set) and not issubclass(base, str | bytes):
        if not isinstance(value, ListConfig):
            return False
        if base is tuple and args and args[-1] is not Ellipsis:
            return len(args) == len(value) and _all_fit(map(fits_annotation, args, value))
        return _all_fit(fits_annotation(args[0], v) for v in value) if args else True
    return None


def describe_annotation(ann: Any) -> str:
    """``bool | float`` -> ``a boolean or a number`` for messages."""
    origin, args = get_origin(ann), get_args(ann)
    if ann is None or ann is type(None):
        return "null"
    if origin is Annotated:
        return describe_annotation(args[0])
    if origin is Union or origin is types.UnionType:
        names = dict.fromkeys(describe_annotation(a) for a in args)
        return " or ".join(names)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    base = origin or ann
    names = {bool: "a boolean", int: "a whole number", float: "a number", str: "a string"}
    if base in names:
        return names[base]
    if isinstance(base, type) and issubclass(base, os.PathLike | Path):
        return "a string"
    if isinstance(base, type) and issubclass(base, abc.Mapping):
        return "a mapping"
    if isinstance(base, type) and issubclass(base, abc.Sequence | abc.Set):
        return "a list"
    return f"a {getattr(base, '__name__', base)}"


_EXAMPLES = {
    "a boolean": "true",
    "a whole number": "1",
    "a number": "0.5",
    "a string": "text",
    "a mapping": "{key: value}",
    "a list": "[a, b]",
}


def examples(ann: Any) -> list[str]:
    """Example override values for an annotation (``bool | float`` -> ``true``, ``0.5``)."""
    origin, args = get_origin(ann), get_args(ann)
    if origin is Union or origin is types.UnionType:
        return list(dict.fromkeys(e for a in args for e in examples(a)))
    if origin is Literal:
        return [str(a) for a in args]
    if origin is Annotated:
        return examples(args[0])
    found = _EXAMPLES.get(describe_annotation(ann))
    return [found] if found else []
