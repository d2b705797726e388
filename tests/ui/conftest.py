"""Shared by the UI tests: one random-weight shapes checkpoint for the session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"


@pytest.fixture(scope="session")
def shapes_ckpt(tmp_path_factory) -> Path:
    from shapes_checkpoint import write_shapes_checkpoint

    return write_shapes_checkpoint(tmp_path_factory.mktemp("ckpt") / "shapes.ckpt")
