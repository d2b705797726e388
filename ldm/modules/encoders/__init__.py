"""Conditioners: CLIP / OpenCLIP text encoders, a trainable CLIP-style encoder, class embeddings.

Classes load lazily (importing ``transformers`` and ``open_clip`` takes seconds).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "AbstractEncoder": "base",
    "IdentityEncoder": "base",
    "disabled_train": "base",
    "random_weights_allowed": "base",
    "CLIPTokenizer": "tokenizer",
    "get_tokenizer": "tokenizer",
    "FrozenCLIPEmbedder": "clip",
    "FrozenOpenCLIPEmbedder": "open_clip",
    "FrozenOpenCLIPEmbedder2": "open_clip",
    "ConcatTimestepEmbedderND": "size_embedder",
    "ClassEmbedder": "class_embedder",
    "CLIPTextEncoder": "text_transformer",
    "SpatialRescaler": "spatial",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
