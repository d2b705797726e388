"""PNG output with the generation parameters in a tEXt chunk (`parameters`, plus JSON `ldm`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ldm.engine.decode import to_pil  # noqa: F401  (re-exported for the commands)


def parameters_text(p: dict[str, Any]) -> str:
    """A1111-style one-block summary: prompt, negative prompt, then `key: value` pairs."""
    head = [str(p.get("prompt", ""))]
    if p.get("negative_prompt"):
        head.append(f"Negative prompt: {p['negative_prompt']}")
    rest = ", ".join(f"{k}: {v}" for k, v in p.items() if k not in ("prompt", "negative_prompt"))
    return "\n".join(head + [rest])


def save_png(image: Image.Image, path: str | Path, params: dict[str, Any]) -> Path:
    """Save with tEXt chunks `parameters` (human-readable) and `ldm` (JSON)."""
    info = PngInfo()
    info.add_text("parameters", parameters_text(params))
    info.add_text("ldm", json.dumps(params, sort_keys=True))
    path = Path(path)
    image.save(path, pnginfo=info)
    return path


def read_params(path: str | Path) -> dict[str, Any]:
    """The JSON generation parameters of a PNG written by save_png."""
    with Image.open(path) as im:
        return json.loads(im.text["ldm"])  # type: ignore[attr-defined]
