"""Name -> sampler function table behind ``ldm.samplers.sample``; other modules add names here.

A registered sampler has the signature of ``ldm.samplers.sample`` without ``sampler``:
``fn(model_fn, x_T, *, steps, alphas_cumprod, parameterization, **options) -> x_0``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from ldm.samplers.aliases import merge_name_options, resolve_sampler_name

SamplerFn = Callable[..., torch.Tensor]

SAMPLERS: dict[str, SamplerFn] = {}


def register_sampler(
    name: str, fn: SamplerFn | None = None, *, overwrite: bool = False
) -> SamplerFn | Callable[[SamplerFn], SamplerFn]:
    """Add ``fn`` under ``name`` (usable as a decorator); a taken name needs ``overwrite=True``."""

    def _add(f: SamplerFn) -> SamplerFn:
        if name in SAMPLERS and SAMPLERS[name] is not f and not overwrite:
            raise ValueError(
                f"sampler name {name!r} is already registered ({SAMPLERS[name]!r}); "
                "pick another name or pass overwrite=True"
            )
        SAMPLERS[name] = f
        return f

    return _add if fn is None else _add(fn)


def resolve_sampler(
    name: str, options: Mapping[str, Any] | None = None
) -> tuple[str, dict[str, Any]]:
    """(registered name, options) for ``name`` or any other name of it (``ldm.samplers.aliases``:
    "DPM++ 2M Karras", "EulerAncestralDiscreteScheduler", "k_lms", ...): ``options`` plus those the
    name implies (``karras=True`` for a Karras name). Unknown names raise ValueError listing the
    valid ones; an explicit option contradicting the name raises ValueError."""
    canonical, implied = resolve_sampler_name(name, SAMPLERS)
    return canonical, merge_name_options(name, implied, options or {})


def get_sampler(name: str) -> SamplerFn:
    """The sampler registered as ``name`` or an alias of it (case-insensitive; the options an alias
    implies, such as Karras sigmas, come from ``resolve_sampler``); an unknown name raises
    ValueError listing the valid ones."""
    canonical, implied = resolve_sampler_name(name, SAMPLERS)
    if implied:  # the function alone would drop them
        raise ValueError(
            f"sampler {name!r} means {canonical!r} with {implied}; the function alone cannot carry "
            "those options: use resolve_sampler(name, options) or sample(sampler=name, ...)"
        )
    return SAMPLERS[canonical]
