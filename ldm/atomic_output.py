"""Outputs that appear whole or not at all: write to a temporary name next to the destination,
then rename. A crash, a full disk or an error midway leaves the destination as it was (absent,
or the previous file) and removes the partial output."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["PARTIAL_MARK", "atomic_path"]

#: part of the temporary names (``.NAME.partial-PID``); a leftover from a killed process has it
PARTIAL_MARK = ".partial-"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def atomic_path(dst: str | os.PathLike, folder: bool = False) -> Iterator[Path]:
    """A temporary path to write ``dst`` (a file, or a folder when ``folder``) at; moved onto
    ``dst`` when the block ends without an exception, removed when it raises."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}{PARTIAL_MARK}{os.getpid()}"
    _remove(tmp)
    try:
        yield tmp
        if folder:
            _replace_folder(tmp, dst)
        else:
            if not tmp.is_file():
                raise FileNotFoundError(f"{tmp}: nothing was written for {dst}")
            with open(tmp, "rb+") as f:  # on disk before the rename makes it visible
                os.fsync(f.fileno())
            os.replace(tmp, dst)
    except BaseException:
        _remove(tmp)
        raise


def _replace_folder(tmp: Path, dst: Path) -> None:
    """``tmp`` becomes ``dst``; an existing ``dst`` is set aside first and removed after."""
    if not dst.exists():
        os.replace(tmp, dst)
        return
    old = dst.parent / f".{dst.name}.old-{os.getpid()}"
    _remove(old)
    os.replace(dst, old)
    try:
        os.replace(tmp, dst)
    except BaseException:
        os.replace(old, dst)
        raise
    _remove(old)
