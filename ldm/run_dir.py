"""Claiming a new run directory: created at once, so two launches never share one.

Two runs started in the same second with the same name both see the directory name free; the
first ``mkdir`` wins and the other takes the next name (``-1``, ``-2``, ...). A log folder that
cannot be written is a :class:`~ldm.errors.RunFailure` naming it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ldm.disk_errors import is_disk_fault, write_failure

__all__ = ["claim", "removed_if_unused"]

logger = logging.getLogger("ldm.main")


def claim(path: Path) -> bool:
    """Create ``path`` (and its parents); False when it already exists."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir()
    except FileExistsError:
        return False
    except OSError as err:
        if is_disk_fault(err):
            raise write_failure(err, path.parent, "the run directory", flag="-l/--logdir") from None
        raise
    return True


@contextmanager
def removed_if_unused(run_dir: Path) -> Iterator[None]:
    """Remove ``run_dir`` again when the block raises before anything was written into it."""
    try:
        yield
    except BaseException:
        try:
            if run_dir.is_dir() and not any(run_dir.iterdir()):
                run_dir.rmdir()
        except OSError:
            logger.debug("could not remove the empty run directory %s", run_dir)
        raise
