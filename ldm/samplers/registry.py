"""Name -> sampler function table behind ``ldm.samplers.sample``; other modules add names here.

A registered sampler has the signature of ``ldm.samplers.sample`` without ``sampler``:
``fn(model_fn, x_T, *, steps, alphas_cumprod, parameterization, **options) -> x_0``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

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


def get_sampler(name: str) -> SamplerFn:
    """The sampler registered as ``name``; an unknown name raises ValueError listing the valid ones."""
    try:
        return SAMPLERS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown sampler {name!r}; valid names are: {', '.join(sorted(SAMPLERS))}"
        ) from None
