"""The fault-injection suite's figures: each test counts what it tried and what happened; the
totals are printed at the end of the run and, with ``LDM_RELIABILITY_FIGURES=FILE``, written to
FILE as JSON (the numbers in docs/reliability.md come from such a file)."""

from __future__ import annotations

import json
import os
from collections import Counter

import pytest

FIGURES: Counter[str] = Counter()


@pytest.fixture(scope="session")
def figures() -> Counter[str]:
    """Session-wide counters, e.g. ``figures["checkpoint fuzz: cases"] += 1``."""
    return FIGURES


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:  # noqa: ANN001
    if not FIGURES:
        return
    terminalreporter.section("reliability figures")
    for key in sorted(FIGURES):
        terminalreporter.write_line(f"{key}: {FIGURES[key]}")
    path = os.environ.get("LDM_RELIABILITY_FIGURES")
    if path:
        with open(path, "w") as f:
            json.dump(dict(sorted(FIGURES.items())), f, indent=2)
