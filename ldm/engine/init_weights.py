"""Start a diffusion module from a checkpoint: ignore keys, fit shapes, widen input channels.

Implements CompVis `init_from_ckpt` semantics (`ignore_keys` prefixes, `only_model`,
`make_it_fit`) and SD 2.x LatentFinetuneDiffusion's `finetune_keys`: a 4-channel U-Net input
convolution grows to the module's width with the extra input channels zero-initialised, so the
widened model computes exactly what the checkpoint computed while the new inputs are zero.
Files are read with `ldm.checkpoint.safe_load` (never executes code from the file).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

import torch
from torch import nn

logger = logging.getLogger(__name__)


def drop_ignored(
    sd: dict[str, torch.Tensor], ignore_keys: Iterable[str]
) -> dict[str, torch.Tensor]:
    """Remove every key starting with one of the `ignore_keys` prefixes."""
    prefixes = tuple(ignore_keys or ())
    if not prefixes:
        return sd
    kept = {k: v for k, v in sd.items() if not k.startswith(prefixes)}
    for k in sorted(set(sd) - set(kept)):
        logger.info("Deleting key %s from state_dict.", k)
    return kept


def fit_tensor(old: torch.Tensor, new_shape: torch.Size) -> torch.Tensor:
    """CompVis make_it_fit: tile `old` over the first two axes of new_shape; divide the input axis by
    the number of copies of each old input channel so summed activations keep their scale."""
    if old.ndim != len(new_shape) or (old.ndim > 2 and old.shape[2:] != new_shape[2:]):
        raise ValueError(
            f"make_it_fit can only change the first two axes; checkpoint shape {tuple(old.shape)} "
            f"vs model shape {tuple(new_shape)}."
        )
    rows = torch.arange(new_shape[0]) % old.shape[0]
    new = old[rows]
    if old.ndim == 1:
        return new.clone()
    cols = torch.arange(new_shape[1]) % old.shape[1]
    new = new[:, cols]  # [new_out, new_in, ...]
    copies = torch.bincount(cols, minlength=old.shape[1]).to(new.dtype)[cols]  # [new_in]
    return new / copies.view(1, -1, *([1] * (old.ndim - 2)))


def make_it_fit(
    sd: dict[str, torch.Tensor], module_state: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Reshape checkpoint tensors whose shapes differ from the module's (fit_tensor)."""
    out = dict(sd)
    for name, param in module_state.items():
        if name in sd and sd[name].shape != param.shape:
            logger.info("make_it_fit: %s %s -> %s", name, tuple(sd[name].shape), tuple(param.shape))
            out[name] = fit_tensor(sd[name], param.shape).to(param.dtype)
    return out


def widen_input_channels(
    sd: dict[str, torch.Tensor],
    module_state: Mapping[str, torch.Tensor],
    finetune_keys: Iterable[str] | None,
    keep_dims: int,
) -> dict[str, torch.Tensor]:
    """Zero-initialise new input channels: new[:, :keep_dims] = checkpoint, the rest 0 (SD 2.x)."""
    out = dict(sd)
    for key in finetune_keys or ():
        if key not in sd:
            continue
        if key not in module_state:
            raise KeyError(f"finetune key '{key}' is in the checkpoint but not in the model.")
        target = module_state[key]
        if sd[key].shape == target.shape:
            continue
        if sd[key].shape[1] != keep_dims or sd[key].shape[0] != target.shape[0]:
            raise ValueError(
                f"finetune key '{key}': checkpoint shape {tuple(sd[key].shape)} cannot be widened "
                f"to {tuple(target.shape)} keeping {keep_dims} input channels."
            )
        logger.info(
            "Widening %s from %s to %s (new channels zero).",
            key,
            tuple(sd[key].shape),
            tuple(target.shape),
        )
        new = torch.zeros(target.shape, dtype=sd[key].dtype)
        new[:, :keep_dims] = sd[key]
        out[key] = new
    return out


def report_keys(missing: list[str], unexpected: list[str]) -> None:
    """Log missing/unexpected keys grouped by their first two name components."""
    for label, keys in (("missing", missing), ("unexpected", unexpected)):
        if not keys:
            continue
        groups: dict[str, int] = {}
        for k in keys:
            prefix = ".".join(k.split(".")[:2])
            groups[prefix] = groups.get(prefix, 0) + 1
        summary = ", ".join(f"{p}.* ({n})" for p, n in sorted(groups.items()))
        logger.warning("%d %s keys: %s", len(keys), label, summary)


def load_into(
    module: nn.Module,
    path: str,
    ignore_keys: Iterable[str] = (),
    only_model: bool = False,
    fit: bool = False,
    finetune_keys: Iterable[str] | None = None,
    keep_dims: int = 4,
) -> tuple[list[str], list[str]]:
    """init_from_ckpt: read `path` safely, adapt it, load non-strictly; returns (missing, unexpected)."""
    from ldm.checkpoint.safe_load import load_state_dict

    sd = drop_ignored(load_state_dict(path), ignore_keys)
    target = module.model if only_model else module
    own = target.state_dict()
    if finetune_keys:
        sd = widen_input_channels(sd, own, finetune_keys, keep_dims)
    if fit:
        sd = make_it_fit(sd, own)
    result = target.load_state_dict(sd, strict=False)
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    logger.info(
        "Restored from %s with %d missing and %d unexpected keys",
        path,
        len(missing),
        len(unexpected),
    )
    report_keys(missing, unexpected)
    return missing, unexpected
