"""The error of textual-inversion embedding files that do not fit (a user's file, not a bug)."""

from __future__ import annotations

__all__ = ["EmbeddingError"]


class EmbeddingError(ValueError):
    """An embedding file that cannot be read or does not fit the model; the message names it."""
