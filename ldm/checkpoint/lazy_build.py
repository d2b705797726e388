"""Build a model without allocating or initialising its parameters, then load weights into it.

Inside :func:`parameters_on_meta` every parameter a module registers lives on the meta device (no
memory, random initialisation a no-op) while buffers stay real, so constants computed at
construction (the diffusion schedule, causal masks, position ids) keep their values.
:func:`assign_weights` then puts the checkpoint's tensors in place (cast to the dtype each
parameter was declared with), so loading SDXL needs one copy of the weights instead of two and no
time on random initialisation (accelerate's ``init_empty_weights(include_buffers=False)``; our
own few lines).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

logger = logging.getLogger(__name__)


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Parameters registered inside are created on the meta device."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            kind = type(param)
            module._parameters[name] = kind(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def assign_weights(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load ``state_dict`` into a model built under :func:`parameters_on_meta` (in place, entries
    of ``state_dict`` replaced by their cast copies as it goes); parameters the file lacks (optional
    ones such as OpenCLIP's ``logit_scale``) are materialised as zeros."""
    own = dict(model.named_parameters())
    own.update(dict(model.named_buffers()))
    for key in list(state_dict):
        target = own.get(key)
        value = state_dict[key]
        if target is None or tuple(target.shape) != tuple(value.shape):
            del state_dict[key]  # reported by the key check before; not loaded
            continue
        if value.is_floating_point() and value.dtype != target.dtype:
            state_dict[key] = value.to(target.dtype)
        elif not value.is_floating_point() and target.is_floating_point():
            state_dict[key] = value.to(target.dtype)
    model.load_state_dict(state_dict, strict=False, assign=True)
    left = [name for name, p in model.named_parameters() if p.is_meta]
    for name in left:
        owner_path, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_path) if owner_path else model
        old = owner._parameters[leaf]
        owner._parameters[leaf] = type(old)(
            torch.zeros(old.shape, dtype=old.dtype), requires_grad=old.requires_grad
        )
    if left:
        logger.info("Not in the checkpoint, set to zero: %s", ", ".join(left[:8]))
