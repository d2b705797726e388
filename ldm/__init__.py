"""ldm: latent diffusion models (the Stable Diffusion family) on current Lightning."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def load_model(*args: Any, **kwargs: Any) -> Any:
    """Load a checkpoint (SD v1/v2, inpainting, or ours) safely; see :func:`ldm.checkpoint.load_model`."""
    from ldm.checkpoint import load_model as _load_model

    return _load_model(*args, **kwargs)


__all__ = ["load_model", "__version__"]
