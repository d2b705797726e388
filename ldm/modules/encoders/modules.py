"""Legacy path ``ldm.modules.encoders.modules`` of CompVis/Stability configs: re-exports, lazily."""

from __future__ import annotations

from typing import Any

from ldm.modules import encoders as _encoders

__all__ = list(_encoders.__all__)


def __getattr__(name: str) -> Any:
    return getattr(_encoders, name)
