"""Read and write LoRA files against a model's state-dict shapes: `load_lora`, `save_lora`.

A file's module names are looked up among the names of the model's weights (`lora_names`), so a
file for another architecture, an unknown module or a wrong shape is refused with a message that
says what the file was made for, what the model is, and which names or shapes do not fit.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from ldm.adapters.lora_diffusers import read_diffusers, write_diffusers
from ldm.adapters.lora_family import MODELSPEC, SS_VERSION, Family, file_family, model_family
from ldm.adapters.lora_format import DIFFUSERS, FORMATS, KOHYA, detect_format, refuse_embedding
from ldm.adapters.lora_kohya import read_kohya, write_kohya
from ldm.adapters.lora_layout import layout_of
from ldm.adapters.lora_names import Names, Target, by_diffusers, by_kohya, target_names
from ldm.adapters.lora_report import grouped, shape_lines
from ldm.adapters.lora_rows import add_module, split_rows
from ldm.adapters.lora_weights import LoraError, LoraFile, LoraModule, LoraSet
from ldm.checkpoint.safe_load import SAFETENSORS_SUFFIX, CheckpointFormatError, read_checkpoint

logger = logging.getLogger(__name__)

Shapes = Mapping[str, torch.Size]


def read_named(path: str | os.PathLike) -> tuple[dict[str, LoraModule], dict[str, str], str]:
    """(modules by their names in the file, header metadata, format) of a LoRA file."""
    source = Path(path).name
    try:
        ckpt = read_checkpoint(path)
    except CheckpointFormatError as err:  # an A1111 .pt embedding holds nested dicts
        refuse_embedding(err.keys, source)
        raise
    fmt = detect_format(ckpt.state_dict, source)
    if fmt == KOHYA:
        return read_kohya(ckpt.state_dict, source), dict(ckpt.metadata), fmt
    return read_diffusers(ckpt.state_dict, ckpt.metadata, source), dict(ckpt.metadata), fmt


def _fit(m: LoraModule, target: Target, shape: torch.Size) -> LoraModule | str:
    """The module in the target's form (linear <-> 1x1 conv), or what does not fit."""
    down, up = m.down, m.up
    if len(shape) == 2 and down.ndim == 4 and down.shape[2:] == (1, 1):
        down = down[:, :, 0, 0]  # a 1x1-conv LoRA on a linear weight
    if up.ndim == 4 and up.shape[2:] == (1, 1) and down.ndim == 2:
        up = up[:, :, 0, 0]
    if len(shape) == 4 and down.ndim == 2 and shape[2:] == (1, 1):
        down = down[:, :, None, None]  # a linear LoRA on a 1x1 conv
    if len(shape) == 4 and up.ndim == 2:
        up = up[:, :, None, None]
    out = shape[0] if target.rows is None else target.rows[1] - target.rows[0]
    want_down = (down.shape[0], *shape[1:])
    ok = (
        down.ndim == len(shape)
        and tuple(down.shape) == want_down
        and up.shape[:2] == (out, down.shape[0])
        and (up.ndim == 2 or up.shape[2:] == (1, 1))
    )
    if not ok:
        rows = f" rows {target.rows[0]}:{target.rows[1]}" if target.rows else ""
        return (
            f"down {tuple(m.down.shape)}, up {tuple(m.up.shape)}; the model's "
            f"{target.key}{rows} is {tuple(shape)} (out {out}, in {shape[1]})"
        )
    return LoraModule(down, up, m.alpha, target.rows)


def _refuse_family(source: str, made_for: Family, model: Family) -> None:
    if made_for.name and model.name and made_for.name != model.name:
        raise LoraError(
            f"{source} was made for {made_for}; this model is {model}. "
            f"Use a LoRA trained for {model.name}."
        )


def bind(
    named: Mapping[str, LoraModule],
    metadata: dict[str, str],
    fmt: str,
    shapes: Shapes,
    source: str,
    names: dict[Target, Names] | None = None,
    model: Family | None = None,
) -> LoraFile:
    """Modules named as in a file -> a LoraFile keyed by the model's keys; LoraError if they do
    not fit. `names` / `model` default to those of `shapes`."""
    made_for = file_family(named, metadata)
    model = model_family(shapes) if model is None else model
    _refuse_family(source, made_for, model)
    names = target_names(layout_of(shapes), shapes) if names is None else names
    lookup = by_kohya(names) if fmt == KOHYA else by_diffusers(names)
    modules: LoraSet = {}
    unknown, bad = [], []
    for name, m in named.items():
        target = lookup.get(name)
        if target is None:
            unknown.append(name)
            continue
        shape = torch.Size(shapes[target.key])
        fitted = _fit(m, target, shape)
        if isinstance(fitted, str):
            bad.append(f"{name}: {fitted}")
            continue
        add_module(modules, target.key, fitted, shape[0])
    if unknown or bad:
        parts = [f"{source} does not fit this model, {model}; the file was made for {made_for}."]
        if unknown:
            parts.append(
                f"{len(unknown)} module(s) name no weight of the model:\n{grouped(unknown)}"
            )
        if bad:
            parts.append(f"{len(bad)} module(s) have the wrong shape:\n{shape_lines(bad)}")
        parts.append("Use a LoRA trained for this model (same architecture and text encoders).")
        raise LoraError("\n".join(parts))
    return LoraFile(modules, metadata, made_for.name, fmt, source)


def load_lora(path: str | os.PathLike, state_dict_shapes: Shapes) -> LoraFile:
    """Read a kohya or diffusers/peft LoRA file for a model with these state-dict shapes."""
    named, metadata, fmt = read_named(path)
    lora = bind(named, metadata, fmt, state_dict_shapes, Path(path).name)
    lora.path = str(path)
    logger.info(
        "%s: %s LoRA (made for %s), %d modules",
        path,
        fmt,
        lora.made_for or "an unknown model",
        len(lora.modules),
    )
    return lora


def name_modules(modules: LoraSet, names: dict[Target, Names], fmt: str) -> dict[str, LoraModule]:
    """Modules keyed by engine keys -> by their names in a `fmt` file (packed weights split)."""
    rows_of: dict[str, list[tuple[int, int]]] = {}
    for t in names:
        if t.rows is not None:
            rows_of.setdefault(t.key, []).append(t.rows)
    out: dict[str, LoraModule] = {}
    unknown = []
    for key, m in modules.items():
        parts = split_rows(m, sorted(rows_of[key])) if key in rows_of else [m]
        for part in parts:
            n = names.get(Target(key, part.rows))
            if n is None:
                unknown.append(key)
                continue
            out[n.kohya[0] if fmt == KOHYA else n.diffusers] = part
    if unknown:
        raise LoraError(
            f"{len(unknown)} LoRA module(s) target weights with no {fmt} name in this model:\n"
            f"{grouped(unknown)}\nLoRA files name U-Net and text-encoder weights only (2-D or conv)."
        )
    return out


def training_metadata(modules: list[LoraModule], family: Family) -> dict[str, str]:
    """sd-scripts-style header: network module, dim, alpha (the commonest of the file's modules),
    base model version, modelspec."""
    ranks = Counter(m.rank for m in modules)
    alphas = Counter(float(m.rank if m.alpha is None else m.alpha) for m in modules)
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(ranks.most_common(1)[0][0] if ranks else 0),
        "ss_network_alpha": str(alphas.most_common(1)[0][0] if alphas else 0.0),
    }
    conv = [m for m in modules if m.down.ndim == 4 and m.down.shape[2:] != (1, 1)]
    if conv:
        conv_dim = Counter(m.rank for m in conv).most_common(1)[0][0]
        conv_alpha = Counter(float(m.alpha or m.rank) for m in conv).most_common(1)[0][0]
        meta["ss_network_args"] = json.dumps({"conv_dim": conv_dim, "conv_alpha": conv_alpha})
    if family.name in SS_VERSION:
        meta["ss_base_model_version"] = SS_VERSION[family.name]
    if family.name in MODELSPEC:
        meta["modelspec.sai_model_spec"] = "1.0.0"
        meta["modelspec.architecture"] = MODELSPEC[family.name]
    return meta


def write_file(path: Path, sd: dict[str, Tensor], metadata: dict[str, str], fmt: str) -> Path:
    """Write a LoRA state dict: .safetensors with its header, or a torch pickle (kohya only)."""
    from ldm.atomic_output import atomic_path
    from ldm.checkpoint.prune import to_saveable

    if path.suffix.lower() == SAFETENSORS_SUFFIX:
        from safetensors.torch import save_file

        with atomic_path(path) as tmp:
            save_file(to_saveable(sd), str(tmp), metadata={"format": "pt", **metadata})
        return path
    if fmt == DIFFUSERS:
        raise LoraError(
            f"{path}: diffusers LoRA files keep their alpha scaling in the safetensors header; "
            "name the output *.safetensors."
        )
    logger.warning("%s: a torch pickle has no header; the metadata is not written.", path)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(sd, f)
    return path


def write_named(
    path: str | os.PathLike,
    modules: LoraSet,
    names: dict[Target, Names],
    format: str,
    family: Family,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write `modules` under their `format` names, with sd-scripts metadata for `family`."""
    if format not in FORMATS:
        raise LoraError(f"format must be one of {', '.join(FORMATS)}, got {format!r}.")
    named = name_modules(modules, names, format)
    header = training_metadata(list(named.values()), family)
    header.update(metadata or {})
    if format == KOHYA:
        sd = write_kohya(named)
    else:
        sd, lora_meta = write_diffusers(named)
        header.update(lora_meta)
    out = write_file(Path(path), sd, header, format)
    logger.info("Wrote %s LoRA %s (%d modules)", format, out, len(named))
    return out


def save_lora(
    path: str | os.PathLike,
    modules: LoraSet,
    state_dict_shapes: Shapes,
    format: str = KOHYA,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write `modules` (keyed by the model's keys) as a kohya or diffusers LoRA file."""
    names = target_names(layout_of(state_dict_shapes), state_dict_shapes)
    family = model_family(state_dict_shapes)
    return write_named(path, modules, names, format, family, metadata)
