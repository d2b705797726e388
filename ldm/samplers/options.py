"""Option checks of the solver driver (errors that name the sampler and the valid options)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch


class SamplerOptionError(ValueError):
    """An option the chosen sampler does not take (a user's choice of flags, not a bug)."""

    def __init__(self, message: str, unknown: list[str]) -> None:
        super().__init__(message)
        self.unknown = unknown


def split_solver_options(
    sampler: str, solver: Callable[..., Any], options: dict[str, Any], common: tuple[str, ...]
) -> dict[str, Any]:
    """The options ``solver`` accepts as keywords; anything else raises a ValueError listing the valid ones."""
    params = inspect.signature(solver).parameters
    accepted = [n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise SamplerOptionError(
            f"sampler {sampler!r} got unknown option(s) {unknown}; valid options are "
            f"{sorted(set(accepted) | set(common))}",
            unknown,
        )
    return options


def check_x0(x0: torch.Tensor | None, x_T: torch.Tensor, strength: float, mask: Any) -> None:
    """img2img (strength < 1) and inpainting (mask) need the known image x0 shaped like x_T."""
    if x0 is None:
        if strength < 1.0 or mask is not None:
            raise ValueError(
                "strength < 1 (img2img) and mask (inpainting) need x0=<clean latent shaped like x_T>"
            )
        return
    if x0.shape != x_T.shape:
        raise ValueError(f"x0 shape {tuple(x0.shape)} must equal x_T shape {tuple(x_T.shape)}")
