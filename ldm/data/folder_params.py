"""Checks of ``ImageFolderDataset``'s parameters: a wrong type from a YAML config (``size: "32"``,
``flip: yes-please``, ``extensions: .png``) is a :class:`ConfigError` naming the parameter, what
was expected and what was found, instead of a failure deep inside the transform."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ldm.util import ConfigError

WHERE = "data.params.<split>.params"


def _fail(name: str, expected: str, found: Any, fix: str = "") -> ConfigError:
    return ConfigError(
        f"{WHERE}.{name}: expected {expected}, found {found!r} ({type(found).__name__})"
        + (f"; {fix}" if fix else "")
    )


def check_size(size: Any) -> int | None:
    """``size``: None or a whole number of pixels >= 1 (32.0 is accepted as 32)."""
    if size is None:
        return None
    whole = isinstance(size, float) and size.is_integer()
    if isinstance(size, bool) or not (isinstance(size, int) or whole) or size < 1:
        fix = "write it without quotes, e.g. size: 256" if isinstance(size, str) else ""
        raise _fail(
            "size", "a whole number of pixels >= 1 (or null: keep each image's size)", size, fix
        )
    return int(size)


def check_flip(flip: Any) -> bool | float:
    """``flip``: true / false, or the probability of a horizontal flip in [0, 1]."""
    if isinstance(flip, bool):
        return flip
    if isinstance(flip, int | float) and 0.0 <= float(flip) <= 1.0:
        return float(flip)
    raise _fail("flip", "true, false or a probability in [0, 1]", flip)


def check_extensions(extensions: Any) -> tuple[str, ...]:
    """``extensions``: one extension or a list of them; the leading dot is optional (png = .png)."""
    items: Iterable[Any] = (extensions,) if isinstance(extensions, str) else extensions
    try:
        items = tuple(items)
    except TypeError:
        raise _fail(
            "extensions", "a file extension or a list of them, e.g. [.png, .jpg]", extensions
        ) from None
    if not items or not all(isinstance(e, str) and e.strip(". ") for e in items):
        raise _fail(
            "extensions", "a file extension or a list of them, e.g. [.png, .jpg]", extensions
        )
    return tuple("." + e.strip().lstrip(".").lower() for e in items)


def check_optional_int(name: str, value: Any, minimum: int = 0) -> int | None:
    """None or an int >= `minimum` (not a bool, not a string)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _fail(name, f"a whole number >= {minimum} (or null)", value)
    return value


def check_bool(name: str, value: Any) -> bool:
    """true or false (a YAML boolean, not a string)."""
    if not isinstance(value, bool):
        raise _fail(name, "true or false", value)
    return value


def check_background(background: Any) -> tuple[int, int, int]:
    """``background``: three channel values 0..255 (RGB) that transparency is composited on."""
    try:
        rgb = tuple(background)
    except TypeError:
        rgb = ()
    if len(rgb) != 3 or not all(
        isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255 for c in rgb
    ):
        raise _fail("background", "three values 0..255, e.g. [255, 255, 255]", background)
    return rgb  # type: ignore[return-value]
