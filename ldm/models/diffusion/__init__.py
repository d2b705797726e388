"""Diffusion LightningModules: DDPM, LatentDiffusion, LatentInpaintDiffusion (lazy imports, so that
importing a helper submodule does not import Lightning)."""

from __future__ import annotations

from typing import Any

__all__ = ["DDPM", "DiffusionWrapper", "LatentDiffusion", "LatentInpaintDiffusion"]

_WHERE = {
    "DDPM": "ldm.models.diffusion.ddpm",
    "DiffusionWrapper": "ldm.models.diffusion.conditioning",
    "LatentDiffusion": "ldm.models.diffusion.latent",
    "LatentInpaintDiffusion": "ldm.models.diffusion.inpaint",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
