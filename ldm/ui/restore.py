"""Dropping one of our PNGs on the page: its settings back, read with ``ldm.commands.pngmeta``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ldm.commands.pngmeta import read_params
from ldm.ui.errors import UiError
from ldm.ui.safety import DEFAULT_MAX_UPLOAD_MB, decode_upload
from ldm.ui.settings import MODES


def _size(text: Any) -> tuple[int, int] | None:
    try:
        w, h = (int(v) for v in str(text).lower().split("x"))
    except ValueError:
        return None
    return w, h


def _by_stem(names: list[str], available: dict[str, Path]) -> tuple[list[str], list[str]]:
    """Picker entries whose file stem is one of ``names``, and the names not found."""
    found, missing = [], []
    for name in names:
        match = [key for key, path in available.items() if path.stem == name]
        (found if match else missing).append(match[0] if match else name)
    return found, missing


def settings_from_png(
    path: str | Path,
    checkpoints: list[str] | None = None,
    loras: dict[str, Path] | None = None,
    embeddings: dict[str, Path] | None = None,
    max_bytes: int = DEFAULT_MAX_UPLOAD_MB << 20,
) -> dict[str, Any]:
    """The ``Settings`` fields recorded in a PNG written by the sampling commands or the UI (only
    those present), plus ``notes``: what could not be restored (a checkpoint, LoRA or embedding
    this server does not offer)."""
    decode_upload(path, max_bytes, what="PNG")
    try:
        p = read_params(path)
    except (KeyError, AttributeError):
        raise UiError(
            "This image carries no ldm settings (only PNGs written by ldm-txt2img / ldm-img2img / "
            "ldm-inpaint or this UI do)."
        ) from None
    except json.JSONDecodeError as err:
        raise UiError(f"The PNG's ldm settings are damaged: {err}") from None
    if not isinstance(p, dict):
        raise UiError("The PNG's ldm settings are not a JSON object.")
    out: dict[str, Any] = {}
    notes: list[str] = []
    for key in ("prompt", "negative_prompt", "sampler"):
        if isinstance(p.get(key), str):
            out[key] = p[key]
    for key, target, kind in (
        ("steps", "steps", int),
        ("scale", "guidance_scale", float),
        ("seed", "seed", int),
        ("strength", "strength", float),
    ):
        if p.get(key) is not None:
            try:
                out[target] = kind(p[key])
            except (TypeError, ValueError):
                notes.append(f"{key} {p[key]!r} is not a number")
    size = _size(p.get("size")) if p.get("size") else None
    if size is not None:
        out["width"], out["height"] = size
    if p.get("mode") in MODES:
        out["mode"] = p["mode"]
    model = p.get("model")
    if model:
        if checkpoints is None or model in checkpoints:
            out["checkpoint"] = model
        else:
            notes.append(f"checkpoint {model} is not offered here")
    recorded = p.get("loras") or []
    if recorded:
        names = [str(d.get("name")) for d in recorded if isinstance(d, dict)]
        found, missing = _by_stem(names, loras or {})
        out["loras"] = found
        scales = sorted({float(d.get("scale", 1.0)) for d in recorded if isinstance(d, dict)})
        out["lora_scale"] = scales[-1] if scales else 1.0
        if len(scales) > 1:
            notes.append(f"the LoRAs had different scales; {scales[-1]} is used for all here")
        notes += [f"LoRA {m} is not offered here" for m in missing]
    recorded = p.get("embeddings") or []
    if recorded:
        names = [str(d.get("name")) for d in recorded if isinstance(d, dict)]
        found, missing = _by_stem(names, embeddings or {})
        out["embeddings"] = found
        notes += [f"embedding {m} is not offered here" for m in missing]
    out["notes"] = notes
    return out
