"""Argparse ``type=`` checks for numeric flags and files: a bad value is a usage error (exit 2)
that names the flag, the range expected and the value found, at parse time."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "MAX_SEED",
    "check_image_file",
    "finite_float",
    "int_in",
    "float_in",
    "non_empty",
]

#: seeds are used as ``seed + batch index`` by torch generators (64-bit)
MAX_SEED = 2**63 - 1


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, found {text!r}") from None


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, found {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, found {text!r}")
    return value


def int_in(low: int, high: int | None = None, hint: str = "") -> Callable[[str], int]:
    """An integer ``low <= n (<= high)``; ``hint`` is added to the message."""

    def check(text: str) -> int:
        value = _int(text)
        if value < low or (high is not None and value > high):
            span = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise argparse.ArgumentTypeError(
                f"expected a whole number {span}, found {value}{'; ' + hint if hint else ''}"
            )
        return value

    check.__name__ = "int"  # argparse names the type in some messages
    return check


def float_in(
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    hint: str = "",
) -> Callable[[str], float]:
    """A finite number in the interval (bounds None: unbounded; ``*_open``: bound excluded)."""

    def check(text: str) -> float:
        value = _float(text)
        bad = (low is not None and (value < low or (low_open and value == low))) or (
            high is not None and (value > high or (high_open and value == high))
        )
        if bad:
            left = "-inf" if low is None else f"{low:g}"
            right = "inf" if high is None else f"{high:g}"
            span = f"{'(' if low_open or low is None else '['}{left}, {right}"
            span += ")" if high_open or high is None else "]"
            raise argparse.ArgumentTypeError(
                f"expected a number in {span}, found {text}{'; ' + hint if hint else ''}"
            )
        return value

    check.__name__ = "float"
    return check


def non_empty(text: str) -> str:
    """A non-empty string (a path)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a path, found an empty string")
    return text


def finite_float(text: str) -> float:
    """Any finite number (no nan / inf)."""
    return _float(text)


def check_image_file(path: str) -> str | None:
    """None when ``path`` is an image PIL can read, else what is wrong with it (for a message)."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.exists():
        return "no such file"
    if p.is_dir():
        return "a folder, expected an image file"
    try:
        with Image.open(p) as im:
            im.verify()
        with Image.open(p) as im:  # verify() leaves the image unusable; decode the pixels too
            im.load()
    except UnidentifiedImageError:
        from ldm.checkpoint.integrity import looks_like

        with open(p, "rb") as f:
            head = f.read(512)
        what = looks_like(head) if head else "an empty file"
        return f"not an image{': looks like ' + what if what else ''}"
    except (OSError, SyntaxError, ValueError) as err:  # truncated or damaged image data
        return f"a damaged image ({err})"
    except Image.DecompressionBombError as err:
        return f"refused: {err}"
    return None
