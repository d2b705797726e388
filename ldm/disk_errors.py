"""Writes that fail because of the disk (full, quota, read-only, no permission) -> a message that
names the directory, the free space and the space needed, as a :class:`~ldm.errors.RunFailure`."""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ldm.checkpoint.integrity import human_size
from ldm.errors import RunFailure

__all__ = [
    "check_writable",
    "disk_fault_of",
    "free_bytes",
    "is_disk_fault",
    "write_failure",
    "writing",
]

_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG}
_DENIED = {errno.EROFS, errno.EACCES, errno.EPERM}


def is_disk_fault(err: BaseException) -> bool:
    """An OSError of a full or unwritable disk (not a missing file or a bug)."""
    return isinstance(err, OSError) and err.errno in _FULL | _DENIED


def disk_fault_of(err: BaseException | None) -> OSError | None:
    """The disk-fault OSError behind ``err`` (torch.save wraps it in a RuntimeError), if any."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if is_disk_fault(err):
            return err  # type: ignore[return-value]
        err = err.__cause__ or err.__context__
    return None


def _existing(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(directory: str | os.PathLike) -> int | None:
    """Free bytes on the file system of ``directory`` (or its nearest existing parent)."""
    try:
        return shutil.disk_usage(_existing(Path(directory))).free
    except OSError:
        return None


def write_failure(
    err: OSError, directory: str | os.PathLike, what: str, need: int | None = None, flag: str = ""
) -> RunFailure:
    """The :class:`RunFailure` for ``err`` raised while writing ``what`` into ``directory``."""
    directory = Path(directory)
    where = f"{flag} {directory}" if flag else str(directory)
    if err.errno in _FULL:
        free = free_bytes(directory)
        have = f"{human_size(free)} free" if free is not None else "free space unknown"
        needs = f", {what} needs about {human_size(need)}" if need else ""
        return RunFailure(
            f"disk full while writing {what} to {where} ({have}{needs}; {err.strerror}). "
            "Free some space there or point the output to another disk."
        )
    if err.errno == errno.EROFS:
        problem = "read-only file system"
    else:
        problem = f"permission denied ({err.strerror})"
    hint = f"pass {flag} a writable folder" if flag else "make it writable or use another folder"
    return RunFailure(f"cannot write {what} to {where}: {problem}. Fix: {hint}.")


def check_writable(directory: str | os.PathLike, what: str, flag: str = "") -> None:
    """Create ``directory`` if needed and prove it takes a file; else raise a :class:`RunFailure`."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".ldm-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        if is_disk_fault(err):
            raise write_failure(err, directory, what, flag=flag) from None
        raise


@contextmanager
def writing(directory: str | os.PathLike, what: str, flag: str = "--outdir") -> Iterator[None]:
    """Disk faults raised inside become a :class:`RunFailure` naming ``flag directory``."""
    try:
        yield
    except Exception as err:
        fault = disk_fault_of(err)
        if fault is not None:
            raise write_failure(fault, directory, what, flag=flag) from err
        raise
