"""EMA weights in SD checkpoints: `model_ema.<name without dots>` shadows `model.<name>`.

CompVis `LitEma` keeps one buffer per parameter of `model` (the DiffusionWrapper) named after the
parameter with every dot removed (`model.diffusion_model.input_blocks.0.0.weight` ->
`model_ema.diffusion_modelinput_blocks00weight`), plus `model_ema.decay` and `model_ema.num_updates`.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

EMA_PREFIX = "model_ema."
EMA_META = ("model_ema.decay", "model_ema.num_updates")


def ema_key(name: str) -> str:
    """`model.a.b.weight` -> `model_ema.abweight` (LitEma naming)."""
    if not name.startswith("model."):
        raise ValueError(f"EMA shadows only `model.*` parameters, got {name!r}.")
    return EMA_PREFIX + name[len("model.") :].replace(".", "")


def has_ema(state_dict: dict[str, torch.Tensor]) -> bool:
    """True when the state dict holds EMA weights (more than the decay/num_updates buffers)."""
    return any(k.startswith(EMA_PREFIX) and k not in EMA_META for k in state_dict)


def strip_ema(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop every `model_ema.*` entry."""
    return {k: v for k, v in state_dict.items() if not k.startswith(EMA_PREFIX)}


def apply_ema(
    state_dict: dict[str, torch.Tensor], *, strict: bool = False
) -> dict[str, torch.Tensor]:
    """Replace `model.*` weights by their EMA copies and drop `model_ema.*` (an EMA-only model)."""
    out = strip_ema(state_dict)
    replaced, absent = 0, []
    for name in list(out):
        if not name.startswith("model."):
            continue
        shadow = state_dict.get(ema_key(name))
        if shadow is None:
            absent.append(name)
            continue
        if shadow.shape != out[name].shape:
            raise ValueError(
                f"EMA weight {ema_key(name)} has shape {list(shadow.shape)}, but {name} has "
                f"{list(out[name].shape)}; the file's EMA does not belong to this model."
            )
        out[name] = shadow
        replaced += 1
    if absent:
        msg = f"{len(absent)} `model.*` weight(s) have no EMA copy (e.g. {absent[:3]})"
        if strict:
            raise KeyError(msg)
        logger.warning("%s; kept the raw weights for those.", msg)
    logger.info("Using EMA weights for %d parameter(s).", replaced)
    return out


def make_ema_entries(
    state_dict: dict[str, torch.Tensor], decay: float = 0.9999
) -> dict[str, torch.Tensor]:
    """The `model_ema.*` entries LitEma would hold for the `model.*` weights (for tests/conversion)."""
    out = {
        ema_key(k): v.clone()
        for k, v in state_dict.items()
        if k.startswith("model.") and v.is_floating_point()
    }
    out["model_ema.decay"] = torch.tensor(decay, dtype=torch.float32)
    out["model_ema.num_updates"] = torch.tensor(0, dtype=torch.int32)
    return out
