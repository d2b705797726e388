"""Adapters at sampling time: LoRA files merged with their scales and embeddings loaded for a call.

``adapters_applied(model, loras, embeddings)`` is the one place ``generate``, the commands and the
evaluation scripts go through: LoRAs are merged into the weights (each with its scale; the original
tensors come back bit for bit on exit) and textual-inversion embeddings add their tokens to the
model's tokenizers and embedding tables (removed on exit). ``describe`` gives what the PNG
metadata records: name, scale or token, and the file's hash.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from torch import nn

LoraSpec = tuple[str, float]


def split_scale(text: str) -> LoraSpec:
    """``PATH[:SCALE]`` -> (path, scale), scale 1 when absent; ``C:\\x.safetensors``,
    ``a:b/c.safetensors`` and existing files whose names hold a colon stay whole paths.
    LoraError (a usage error) for an infinite scale, or one that is no number after a file."""
    from ldm.adapters.lora_weights import LoraError

    head, sep, tail = text.rpartition(":")
    if not sep or not head or Path(text).exists():
        return text, 1.0
    try:
        scale = float(tail)
    except ValueError:
        if Path(head).is_file() and not any(c in tail for c in "/\\"):
            raise LoraError(
                f"LoRA {text!r}: the scale {tail!r} after {head} is not a number; give "
                f"PATH:SCALE, e.g. {head}:0.8."
            ) from None
        return text, 1.0  # the colon belongs to the path
    if not math.isfinite(scale):
        raise LoraError(f"LoRA {text!r}: the scale must be a finite number.")
    return head, scale


def parse_lora(spec: str | os.PathLike | tuple[Any, Any] | list[Any]) -> LoraSpec:
    """A ``(path, scale)`` pair or ``PATH[:SCALE]`` -> ``(path, scale)``."""
    if isinstance(spec, tuple | list):
        if len(spec) != 2:
            raise ValueError(f"a LoRA is (path, scale), got {spec!r}")
        return str(spec[0]), float(spec[1])
    return split_scale(str(spec))


def _check_files(paths: Sequence[str], flag: str) -> None:
    for path in paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f"{flag} {path}: no such file.")


@contextmanager
def _ema_weights_in(model: nn.Module) -> Iterator[None]:
    """The EMA weights swapped into the model, and ``use_ema`` off so nothing swaps them again
    (a LoRA is merged into the weights the model samples with)."""
    with model.ema_scope():
        model.use_ema = False
        try:
            yield
        finally:
            model.use_ema = True


@contextmanager
def adapters_applied(
    model: nn.Module,
    loras: Sequence[Any] | None = None,
    embeddings: Sequence[str | os.PathLike] | None = None,
    use_ema: bool | None = None,
) -> Iterator[None]:
    """Embeddings loaded and LoRAs merged inside; the model exactly as before outside. A model
    that samples with its EMA weights (``use_ema`` not False) gets the LoRAs merged into those."""
    specs = [parse_lora(s) for s in loras or ()]
    paths = [str(p) for p in embeddings or ()]
    _check_files([p for p, _ in specs], "LoRA")
    _check_files(paths, "embedding")
    with ExitStack() as stack:
        if paths:
            from ldm.adapters.embeddings_loader import load_embeddings

            stack.enter_context(load_embeddings(model, paths))
        if specs:
            from ldm.adapters.lora_apply import apply_loras

            if getattr(model, "use_ema", False) and use_ema is not False:
                stack.enter_context(_ema_weights_in(model))
            stack.enter_context(apply_loras(model, specs))
        yield


def describe(
    loras: Sequence[Any] | None = None, embeddings: Sequence[str | os.PathLike] | None = None
) -> dict[str, Any]:
    """PNG-metadata entries: ``loras`` [{name, scale, hash}], ``embeddings`` [{name, hash}], and
    A1111's ``Lora hashes`` / ``TI hashes`` summaries."""
    from ldm.util import file_hash

    out: dict[str, Any] = {}
    specs = [parse_lora(s) for s in loras or ()]
    if specs:
        out["loras"] = [{"name": Path(p).stem, "scale": s, "hash": file_hash(p)} for p, s in specs]
        out["Lora hashes"] = ", ".join(f"{d['name']}: {d['hash']}" for d in out["loras"])
    if embeddings:
        out["embeddings"] = [
            {"name": Path(p).stem, "hash": file_hash(p)} for p in map(str, embeddings)
        ]
        out["TI hashes"] = ", ".join(f"{d['name']}: {d['hash']}" for d in out["embeddings"])
    return out
