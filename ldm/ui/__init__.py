"""A web interface for sampling (``python -m ldm.ui`` / ``ldm-ui``), built on gradio.

The handlers (``ldm.ui.handlers``) are plain functions over ``generate`` and the PNG metadata of
the commands, usable and tested without a browser; ``ldm.ui.app`` lays them out as a gradio
Blocks app and ``ldm.ui.cli`` serves it (docs/ui.md). gradio is optional: ``pip install
"ldm[ui]"``.
"""

from __future__ import annotations

import os
from types import ModuleType

UI_EXTRA = "ui"


def require_gradio() -> ModuleType:
    """The gradio module with its analytics and update checks off; a clear error when missing."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # no telemetry, no version check
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    try:
        import gradio
    except ImportError as err:
        raise ImportError(
            f"The web UI needs gradio: pip install 'ldm[{UI_EXTRA}]' (or pip install gradio)."
        ) from err
    return gradio
