"""Tar shards cut off midway (an interrupted copy or download): found by their end, handled by
dropping the sample that the cut may have left incomplete.

A tar archive ends with two 512-byte blocks of zeros. A shard cut right after a member ends at a
block boundary as well, and the tar reader then stops without an error: the last sample comes
out without its later members (an image without its caption). So a local shard whose last 1024
bytes are not zeros is *cut*: its complete samples are read, the last one is dropped, and the
shard is counted once as skipped input.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

__all__ = ["all_but_last", "is_cut"]

END_BLOCKS = 1024  # two 512-byte zero blocks


def is_cut(url: str) -> bool:
    """Whether a local tar shard lacks the end-of-archive blocks (remote shards: not checked)."""
    path = url[len("file:") :] if url.startswith("file:") else url
    if "://" in url or url.startswith("pipe:") or not os.path.isfile(path):
        return False
    size = os.path.getsize(path)
    if size < END_BLOCKS or size % 512:
        return True
    with open(path, "rb") as f:
        f.seek(size - END_BLOCKS)
        return f.read(END_BLOCKS).strip(b"\x00") != b""


def all_but_last(
    samples: Iterable[dict[str, Any]], on_drop: Callable[[dict[str, Any] | None, int], None]
) -> Iterator[dict[str, Any]]:
    """Every sample but the last; ``on_drop(last or None, number yielded)`` at the end."""
    held: dict[str, Any] | None = None
    n = 0
    for sample in samples:
        if held is not None:
            yield held
            n += 1
        held = sample
    on_drop(held, n)
