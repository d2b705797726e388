"""Read checkpoints without executing code: weights-only torch pickles and safetensors.

A torch pickle may name any Python callable; `torch.load(weights_only=True)` only rebuilds tensors
and containers. Training checkpoints also hold Lightning extras (callback states keyed by callback
classes in Lightning 1.x files, OmegaConf containers in `hyper_parameters`, numpy scalars), so we
extend the allow-list with exactly those globals. Lightning classes are never imported: each is
replaced by an inert placeholder type of the same name. Anything else is refused with an
:class:`UnsafeCheckpointError` naming the offending global; `unsafe=True` overrides (trusted files).
"""

from __future__ import annotations

import collections
import importlib
import json
import logging
import os
import pickle
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ldm.checkpoint.formats import SAFETENSORS_SUFFIX, TORCH_SUFFIXES, CheckpointFormatError

logger = logging.getLogger(__name__)

CONFIG_KEY = "ldm_config"  # top-level key (.ckpt) / metadata entry (.safetensors) with our config


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A pickle needs a global outside the allow-list; loading it could run code from the file."""


# Globals that Lightning checkpoints reference only as names (dict keys, inert containers).
# They are replaced by placeholder types so that loading never imports or runs Lightning code.
_LIGHTNING_NAMES = [
    f"{pkg}.callbacks.{mod}.{cls}"
    for pkg in ("pytorch_lightning", "lightning.pytorch")
    for mod, cls in (
        ("model_checkpoint", "ModelCheckpoint"),
        ("early_stopping", "EarlyStopping"),
        ("lr_monitor", "LearningRateMonitor"),
        ("progress.tqdm_progress", "TQDMProgressBar"),
        ("progress.rich_progress", "RichProgressBar"),
        ("stochastic_weight_avg", "StochasticWeightAveraging"),
        ("timer", "Timer"),
        ("gradient_accumulation_scheduler", "GradientAccumulationScheduler"),
    )
]
_ATTRIBUTE_DICT_NAMES = [
    "pytorch_lightning.utilities.parsing.AttributeDict",
    "lightning_fabric.utilities.data.AttributeDict",
    "lightning.fabric.utilities.data.AttributeDict",
]
# OmegaConf containers as they appear in `hyper_parameters` (save_hyperparameters of a config).
_OMEGACONF_NAMES = [
    "omegaconf.dictconfig.DictConfig",
    "omegaconf.listconfig.ListConfig",
    "omegaconf.base.ContainerMetadata",
    "omegaconf.base.Metadata",
    "omegaconf.nodes.AnyNode",
    "omegaconf.nodes.StringNode",
    "omegaconf.nodes.IntegerNode",
    "omegaconf.nodes.FloatNode",
    "omegaconf.nodes.BooleanNode",
    "omegaconf.nodes.BytesNode",
    "omegaconf.nodes.PathNode",
    "omegaconf.nodes.EnumNode",
]
# Side-effect-free constructors of plain data.
_PLAIN_GLOBALS: list[Any] = [
    dict,
    list,
    tuple,
    set,
    frozenset,
    int,
    float,
    str,
    bool,
    bytes,
    complex,
    slice,
    collections.defaultdict,
    collections.OrderedDict,
    (typing.Any, "typing.Any"),
]


def _placeholder(full_name: str, base: type = object) -> type:
    """An inert stand-in type carrying the original qualified name."""
    module, _, name = full_name.rpartition(".")
    return type(name, (base,), {"__module__": module, "__doc__": f"Placeholder for {full_name}."})


def _numpy_globals() -> list[Any]:
    """numpy scalars, dtypes and arrays (both numpy 1.x `numpy.core` and 2.x `numpy._core` names)."""
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy ships with torch installs
        return []
    out: list[Any] = [np.dtype, np.ndarray]
    try:
        core = importlib.import_module("numpy._core.multiarray")
    except ImportError:  # numpy 1.x
        core = importlib.import_module("numpy.core.multiarray")
    for prefix in ("numpy.core.multiarray", "numpy._core.multiarray"):
        out.append((core.scalar, f"{prefix}.scalar"))
        out.append((core._reconstruct, f"{prefix}._reconstruct"))
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        for name in dir(dtypes):
            cls = getattr(dtypes, name)
            if name.endswith("DType") and name not in ("ObjectDType", "VoidDType"):
                out.append((cls, f"numpy.dtypes.{name}"))
    return out


def _omegaconf_globals() -> list[Any]:
    try:
        importlib.import_module("omegaconf")
    except ImportError:  # pragma: no cover
        return []
    out: list[Any] = []
    for full in _OMEGACONF_NAMES:
        module, _, name = full.rpartition(".")
        obj = getattr(importlib.import_module(module), name, None)
        if obj is not None:
            out.append((obj, full))
    return out


_SAFE_GLOBALS: list[Any] | None = None


def safe_globals() -> list[Any]:
    """The allow-list passed to `torch.serialization.safe_globals` for training checkpoints."""
    global _SAFE_GLOBALS
    if _SAFE_GLOBALS is None:
        items: list[Any] = list(_PLAIN_GLOBALS)
        items += [(_placeholder(n), n) for n in _LIGHTNING_NAMES]
        items += [(_placeholder(n, dict), n) for n in _ATTRIBUTE_DICT_NAMES]
        items += [(Path, "pathlib.Path"), (type(Path()), f"pathlib.{type(Path()).__name__}")]
        items += [(os.PathLike, "os.PathLike")]
        import argparse

        items.append(argparse.Namespace)
        items += _numpy_globals() + _omegaconf_globals()
        _SAFE_GLOBALS = items
    return _SAFE_GLOBALS


_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")


def _refuse(path: Path, err: Exception) -> UnsafeCheckpointError:
    """Turn torch's weights-only error into one that names the global and the override."""
    text = str(err)
    match = _GLOBAL_RE.search(text)
    what = f"the global `{match.group(1)}`" if match else "an object outside the allow-list"
    detail = ""
    if not match:
        found = re.search(r"WeightsUnpickler error:\s*(.+?)\n\s*\n", text + "\n\n", re.S)
        detail = f" ({(found.group(1) if found else text).strip()[:300]})"
    return UnsafeCheckpointError(
        f"Refusing to load {path}: its pickle needs {what}{detail}, which could run code from the "
        "file. Only tensors, plain containers and Lightning training extras are allowed. If you "
        "trust this file, pass unsafe=True (command line: --unsafe); better, convert it once to "
        f"safetensors: python scripts/convert.py {path} {path.with_suffix('.safetensors').name} "
        "--unsafe."
    )


_OPERAND_RE = re.compile(r"Unsupported operand (\d+)")


def _is_damage(err: pickle.UnpicklingError) -> bool:
    """A weights-only refusal caused by bytes that are no pickle opcode at all (a damaged file),
    rather than by an opcode or global the allow-list refuses."""
    import pickletools

    match = _OPERAND_RE.search(str(err))
    return match is not None and chr(int(match.group(1))) not in pickletools.code2op


def _torch_load(path: Path, unsafe: bool, map_location: Any) -> Any:
    from ldm.checkpoint.integrity import LOAD_ERRORS, damaged

    try:
        if unsafe:
            logger.warning("Loading %s with unsafe=True: code inside the pickle may run.", path)
            return torch.load(path, map_location=map_location, weights_only=False)
        with torch.serialization.safe_globals(safe_globals()):
            try:
                try:
                    return torch.load(path, map_location=map_location, weights_only=True, mmap=True)
                except RuntimeError as err:  # legacy (non-zip) format: no mmap
                    if "mmap" not in str(err):
                        raise
                    return torch.load(path, map_location=map_location, weights_only=True)
            except pickle.UnpicklingError as err:
                if _is_damage(err):
                    raise damaged(path, err) from None
                raise _refuse(path, err) from None
    except (UnsafeCheckpointError, CheckpointFormatError, FileNotFoundError, PermissionError):
        raise
    except LOAD_ERRORS as err:
        raise damaged(path, err) from err


@dataclass
class LoadedCheckpoint:
    """A checkpoint's flat state dict plus what else the file carried."""

    path: Path
    state_dict: dict[str, torch.Tensor]
    extras: dict[str, Any] = field(default_factory=dict)  # global_step, hyper_parameters, ...
    metadata: dict[str, str] = field(default_factory=dict)  # safetensors header metadata

    @property
    def embedded_config(self) -> dict[str, Any] | None:
        """Our resolved config (`ldm_config`) if the file embeds one, else None."""
        if CONFIG_KEY in self.extras and self.extras[CONFIG_KEY] is not None:
            return _to_plain(self.extras[CONFIG_KEY])
        if CONFIG_KEY in self.metadata:
            return json.loads(self.metadata[CONFIG_KEY])
        return None


def _to_plain(obj: Any) -> Any:
    """OmegaConf containers -> dicts/lists; leaves plain data alone."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(obj, (DictConfig, ListConfig)):
            return OmegaConf.to_container(obj, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    return obj


def _split(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Find the state dict inside a loaded pickle: Lightning `state_dict`, or a bare state dict."""
    if not isinstance(obj, dict):
        raise CheckpointFormatError(
            f"{path} holds a {type(obj).__name__}, expected a dict (a state dict or a Lightning "
            "checkpoint with 'state_dict')."
        )
    for key in ("state_dict", "model", "module"):
        inner = obj.get(key)
        if isinstance(inner, dict) and inner and all(isinstance(k, str) for k in inner):
            if any(isinstance(v, torch.Tensor) for v in inner.values()):
                extras = {k: v for k, v in obj.items() if k != key}
                return dict(inner), extras
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        from ldm.checkpoint.file_kinds import not_a_model_hint

        hint = not_a_model_hint(map(str, obj)) if obj else None
        raise CheckpointFormatError(
            f"{path} has no tensors: top-level keys {sorted(map(str, obj))[:10]}; expected "
            "'state_dict' or a flat name -> tensor mapping." + (f" {hint}" if hint else ""),
            keys=tuple(map(str, obj)),
        )
    extras = {k: v for k, v in obj.items() if not isinstance(v, torch.Tensor)}
    return tensors, extras


def read_safetensors_header(path: str | os.PathLike) -> dict[str, Any]:
    """Names -> shapes of a `.safetensors` file (its header only: no tensor is read)."""
    from safetensors import SafetensorError, safe_open

    from ldm.checkpoint.integrity import check_checkpoint_file, damaged

    check_checkpoint_file(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: torch.Size(f.get_slice(k).get_shape()) for k in f.keys()}
    except SafetensorError as err:
        raise damaged(path, err) from None


def _read_safetensors(
    path: Path, map_location: Any
) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    from ldm.checkpoint.integrity import damaged

    device = "cpu" if map_location is None else str(map_location)
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            metadata = dict(f.metadata() or {})
            state = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as err:
        raise damaged(path, err) from None
    return state, {}, metadata


def read_checkpoint(
    path: str | os.PathLike,
    *,
    unsafe: bool = False,
    map_location: Any = "cpu",
    verify: bool = False,
) -> LoadedCheckpoint:
    """Read `.ckpt/.pt/.pth/.bin` (weights-only pickle) or `.safetensors` into a LoadedCheckpoint.

    The file is checked first (:mod:`ldm.checkpoint.integrity`): an empty, cut-off or foreign
    file raises :class:`~ldm.checkpoint.integrity.CorruptCheckpointError` naming what is wrong.
    ``verify``: also compare the tensor data of a torch zip file with its CRC-32 checksums.
    """
    path = Path(path)
    if path.is_dir():
        missing = [n for n in ("model_index.json", "unet/") if not (path / n.rstrip("/")).exists()]
        raise FileNotFoundError(
            f"{path} is a folder, not a checkpoint file, and not a diffusers folder (it has no "
            f"{' and no '.join(missing) or 'readable layout'}). Give a .ckpt / .safetensors file, "
            "or a diffusers folder with model_index.json and unet/, vae/, text_encoder/."
        )
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint not found: {path}")
    from ldm.checkpoint.integrity import check_checkpoint_file

    suffix = path.suffix.lower()
    if suffix != SAFETENSORS_SUFFIX and suffix not in TORCH_SUFFIXES:
        raise CheckpointFormatError(
            f"Unknown checkpoint suffix {suffix!r} for {path}; expected one of "
            f"{', '.join(TORCH_SUFFIXES + (SAFETENSORS_SUFFIX,))}."
        )
    check_checkpoint_file(path, verify=verify)
    if suffix == SAFETENSORS_SUFFIX:
        return LoadedCheckpoint(path, *_read_safetensors(path, map_location))
    obj = _torch_load(path, unsafe, map_location)
    state, extras = _split(obj, path)
    return LoadedCheckpoint(path, state, extras, {})


def load_state_dict(
    path: str | os.PathLike, *, unsafe: bool = False, map_location: Any = "cpu"
) -> dict[str, torch.Tensor]:
    """The flat state dict of a checkpoint file, read safely (for `init_from_ckpt`)."""
    return read_checkpoint(path, unsafe=unsafe, map_location=map_location).state_dict
