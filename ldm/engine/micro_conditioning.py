"""SDXL's micro-conditioning inputs at sampling time (Podell et al. 2023, Sec. 2.2 and 2.5).

A model whose Conditioner reads ``original_size_as_tuple``, ``crop_coords_top_left``,
``target_size_as_tuple`` or ``aesthetic_score`` (sgm's batch keys) gets them here unless the caller
or the batch gives them: original and target size default to the size being generated, the crop
to (0, 0), the aesthetic score to 6.0 (its unconditional value, 2.5, is the embedder's null), the
defaults of diffusers' SDXL pipelines and of sgm's sampling scripts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

#: batch key -> generate() argument
ARGUMENTS = {
    "original_size_as_tuple": "original_size",
    "crop_coords_top_left": "crops_coords_top_left",
    "target_size_as_tuple": "target_size",
    "aesthetic_score": "aesthetic_score",
}
DEFAULT_AESTHETIC_SCORE = 6.0


def _pair(name: str, value: Any) -> tuple[float, float]:
    try:
        pair = tuple(float(v) for v in value)
    except TypeError:
        pair = ()
    if len(pair) != 2:
        raise ValueError(f"{name} must be a pair (height, width) / (top, left), got {value!r}")
    return pair  # type: ignore[return-value]


def fill_micro_conditioning(
    input_keys: Sequence[str],
    inputs: dict[str, Any],
    n: int,
    height: int,
    width: int,
    given: dict[str, Any],
    model_name: str = "this model",
) -> None:
    """Add the micro-conditioning entries the model reads to ``inputs`` (in place): values given
    as generate() arguments (``given``: argument name -> value or None), else those already in
    ``inputs`` (a data batch), else the defaults for a ``height`` x ``width`` image."""
    wanted = {ARGUMENTS[k]: k for k in input_keys if k in ARGUMENTS}
    for arg, value in given.items():
        if value is not None and arg not in wanted:
            raise ValueError(
                f"{arg}={value!r}: {model_name} is not conditioned on it (its conditioning "
                f"inputs: {list(input_keys)}); SDXL base takes original_size, "
                "crops_coords_top_left and target_size, the refiner original_size, "
                "crops_coords_top_left and aesthetic_score."
            )
    defaults = {
        "original_size": (height, width),
        "crops_coords_top_left": (0, 0),
        "target_size": (height, width),
        "aesthetic_score": DEFAULT_AESTHETIC_SCORE,
    }
    for arg, key in wanted.items():
        value = given.get(arg)
        if value is None and key in inputs:
            continue
        value = defaults[arg] if value is None else value
        if arg == "aesthetic_score":
            inputs[key] = torch.full((n,), float(value))
        else:
            inputs[key] = torch.tensor([_pair(arg, value)] * n)  # [n, 2]
