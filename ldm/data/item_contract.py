"""The first batch against the CompVis image convention (DESIGN.md, contracts item 5).

CompVis data sets yield the image under ``first_stage_key`` as H x W x C float in [-1, 1]; the
model rearranges the batch to B x C x H x W itself. A batch that is uint8 (0..255) or channels-first
would train on nonsense or fail much later with a size mismatch, so it is caught here, naming the
key. With the model's image key known the check is strict (errors for what can never be valid
VAE input); without it, tensors that look like image batches only get warnings.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch

from ldm.data.latent_cache import MOMENTS_KEY
from ldm.util import ConfigError

logger = logging.getLogger(__name__)

CONTRACT = (
    "CompVis data items are dicts: the image under the model's first_stage_key as an "
    "H x W x C float array in [-1, 1] (x / 127.5 - 1 for 8-bit pixels), captions as str, "
    "class labels as int."
)
CHANNELS = (1, 3, 4)
FAR = 2.0  # |x| beyond this is never an image in [-1, 1] (resampling overshoot stays well under)
NEAR = 1.5  # beyond this: a warning


def looks_like_images(value: Any) -> bool:
    """A B x H x W x C or B x C x H x W float/uint8 tensor (C in 1, 3, 4)."""
    return (
        isinstance(value, torch.Tensor)
        and value.ndim == 4
        and (value.dtype == torch.uint8 or value.is_floating_point())
        and (value.shape[-1] in CHANNELS or value.shape[1] in CHANNELS)
    )


def _problems(x: torch.Tensor) -> list[tuple[bool, str]]:
    """(always an error, message) for each way ``x`` breaks the convention."""
    found: list[tuple[bool, str]] = []
    if x.ndim == 4 and x.shape[-1] not in CHANNELS and x.shape[1] in CHANNELS:
        found.append(
            (
                True,
                f"has shape {tuple(x.shape)}: the items look channels-first (C x H x W), while "
                "CompVis items are H x W x C (the model moves the channels itself). Fix: return "
                "x.permute(1, 2, 0) (torch) or x.transpose(1, 2, 0) (numpy) from __getitem__",
            )
        )
    if x.dtype == torch.uint8:
        found.append(
            (
                True,
                "is uint8 (0..255 pixels), which the first stage never takes. Fix: return "
                "x.astype(np.float32) / 127.5 - 1 from __getitem__",
            )
        )
    elif x.is_floating_point() and x.numel():
        lo, hi = (float(v) for v in torch.aminmax(x.detach().float()))
        if max(-lo, hi) > NEAR:
            found.append(
                (
                    max(-lo, hi) > FAR,
                    f"has values in [{lo:.3g}, {hi:.3g}], far outside [-1, 1]"
                    + (" (0..255 pixels?)" if lo >= 0 and hi > FAR else "")
                    + ". Fix: scale to [-1, 1] in __getitem__ (x / 127.5 - 1 for 8-bit pixels)",
                )
            )
    return found


def check_batch(batch: Any, dataset: str, image_key: str | None = None) -> None:
    """Raise :class:`ConfigError` (or warn) when the batch's images break the convention.

    ``image_key`` known: only that key is checked, and what can never be valid input to the
    first stage raises. Unknown: every tensor that looks like a batch of images is checked, with
    warnings only (it may be a mask or latents rather than the model's input).
    """
    if not isinstance(batch, Mapping):
        return
    if image_key is not None:
        x = batch.get(image_key)
        if isinstance(x, torch.Tensor):
            _report(image_key, x, dataset, strict=True)
            unit = x.is_floating_point() and x.numel() and float(x.min()) >= 0
            if unit and 0.5 < float(x.max()) <= 1:
                logger.warning(
                    "data set %s: key '%s' has values in [0, 1] only; %s Fix: x * 2 - 1.",
                    dataset,
                    image_key,
                    CONTRACT,
                )
        return
    for key, value in batch.items():
        if key != MOMENTS_KEY and looks_like_images(value):
            _report(key, value, dataset, strict=False)


def _report(key: Any, x: torch.Tensor, dataset: str, strict: bool) -> None:
    problems = _problems(x)
    errors = [msg for fatal, msg in problems if fatal and strict]
    if errors:
        raise ConfigError(f"data set {dataset}: key '{key}' {'; and it '.join(errors)}. {CONTRACT}")
    for _, msg in problems:
        logger.warning("data set %s: key '%s' %s. %s", dataset, key, msg, CONTRACT)
