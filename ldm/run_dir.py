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
from ldm.run_spec import UsageError

__all__ = ["claim", "removed_if_unused"]

logger = logging.getLogger("ldm.main")


def _not_a_folder(path: Path) -> UsageError:
    probe = path.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return UsageError(
        f"-l/--logdir: cannot create the run directory {path}: {probe} is a file, not a folder. "
        "Pass -l a folder (it is created when missing)."
    )


def claim(path: Path) -> bool:
    """Create ``path`` (and its parents); False when it already exists."""
    for target, parents in ((path.parent, True), (path, False)):
        try:
            target.mkdir(parents=parents, exist_ok=parents)
        except FileExistsError:
            if parents:  # a file where a folder must be
                raise _not_a_folder(path) from None
            return False  # taken (by another launch in the same second)
        except NotADirectoryError:
            raise _not_a_folder(path) from None
        except OSError as err:
            if is_disk_fault(err):
                raise write_failure(
                    err, path.parent, "the run directory", flag="-l/--logdir"
                ) from None
            raise
    return True


@contextmanager
def removed_if_unused(run_dir: Path, logdir: str | Path) -> Iterator[None]:
    """Remove ``run_dir`` again when the block raises before anything was written into it, and
    the folders between it and ``logdir`` (a ``-p`` project folder) that are left empty."""
    try:
        yield
    except BaseException:
        stop = Path(logdir).absolute()
        folder = run_dir.absolute()
        try:
            while folder != stop and stop in folder.parents and not any(folder.iterdir()):
                folder.rmdir()
                folder = folder.parent
        except OSError:
            logger.debug("could not remove the empty run directory %s", folder)
        raise
