"""Resuming a run whose ``last.ckpt`` is damaged: the newest readable checkpoint of the run.

A run killed while the disk filled up, a copy of a run directory that stopped halfway, a file
system that lost the last write: ``last.ckpt`` can be truncated or unreadable even though the
checkpoint writes are atomic. Then ``-r RUN_DIR`` says so and resumes from the newest (by
modification time) readable checkpoint in ``RUN_DIR/checkpoints/``; when none is readable it
stops with the list of what it tried. It never starts from scratch silently.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ldm.run_spec import UsageError

__all__ = ["ResumeError", "checkpoint_problem", "resume_checkpoint"]

logger = logging.getLogger("ldm.main")

LAST = "last.ckpt"
#: environment variables that give a process's rank (Lightning's launcher, torchrun, SLURM)
_RANK_VARS = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")


class ResumeError(UsageError):
    """No checkpoint of the run can be resumed from (the message lists each one and why)."""


def checkpoint_problem(path: Path) -> str | None:
    """None when ``path`` is a readable training checkpoint, else what is wrong with it.

    Reads the file's structure and pickle and compares its tensor data with the CRC-32 checksums
    stored in the file (one pass over the file, as a damaged resume would train on). A file that
    safe loading refuses for its pickled objects counts as readable: that is not damage, and the
    resume reports it on its own.
    """
    from ldm.checkpoint.safe_load import (
        CheckpointFormatError,
        UnsafeCheckpointError,
        read_checkpoint,
    )

    if not path.is_file():
        return "does not exist"
    try:
        ckpt = read_checkpoint(path, verify=True)  # the tensors' checksums too
    except UnsafeCheckpointError:
        return None
    except CheckpointFormatError as err:
        text = str(err)
        text = text[len(str(path)) + 2 :] if text.startswith(f"{path}: ") else text
        return text.split(". ")[0].rstrip(".")  # what is wrong, without the advice
    if "global_step" not in ckpt.extras and "loops" not in ckpt.extras:
        return "holds weights only (no training state to resume)"
    return None


def remove_partial_writes(ckptdir: Path) -> int:
    """Delete the temporary files of checkpoint writes that a kill interrupted (``.NAME.*.tmp``,
    see :class:`~ldm.fault_tolerance.AtomicCheckpointIO`); the number removed. Only the first
    process of a run does it, before training starts: no write of this run is under way then
    (the other ranks never write checkpoints of a DDP run)."""
    from ldm.checkpoint.integrity import human_size

    if any(os.environ.get(var, "0") not in ("", "0") for var in _RANK_VARS):
        return 0
    removed, size = 0, 0
    for tmp in ckptdir.glob(".*.ckpt.*.tmp"):
        try:
            size += tmp.stat().st_size
            tmp.unlink()
            removed += 1
        except OSError:
            continue
    if removed:
        logger.info(
            "removed %d partial checkpoint file(s) (%s) left in %s by an interrupted write",
            removed,
            human_size(size),
            ckptdir,
        )
    return removed


def _replace_last(last: Path, good: Path) -> None:
    """The damaged ``last.ckpt`` kept as ``last.ckpt.damaged``; ``last.ckpt`` becomes a copy of
    the checkpoint resumed from (a copy, not a link: damage to one file must not reach the
    other), so that the run has a readable ``last.ckpt`` even if the resumed launch has no step
    left to train. First process only."""
    import shutil

    if any(os.environ.get(var, "0") not in ("", "0") for var in _RANK_VARS):
        return
    tmp = last.parent / f".{last.name}.restore.tmp"
    try:
        tmp.unlink(missing_ok=True)
        shutil.copyfile(good, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if last.exists():
            os.replace(last, last.parent / f"{last.name}.damaged")
        os.replace(tmp, last)
        logger.warning(
            "%s now holds %s; the damaged file is %s.damaged", last, good.name, last.name
        )
    except OSError as err:
        tmp.unlink(missing_ok=True)
        logger.warning("could not replace the damaged %s (%s); resuming anyway", last, err)


def _candidates(ckptdir: Path, exclude: Path) -> list[Path]:
    """The run's other checkpoints, newest first (temporary files of unfinished writes excluded)."""
    found = [
        p
        for p in ckptdir.glob("*.ckpt")
        if p.is_file() and not p.name.startswith(".") and p.resolve() != exclude.resolve()
    ]
    return sorted(found, key=lambda p: (p.stat().st_mtime_ns, p.name), reverse=True)


def resume_checkpoint(ckpt: Path, flag: str = "-r") -> Path:
    """``ckpt`` when readable; for a damaged or missing ``last.ckpt`` the newest readable one of
    its folder (logged); else a :class:`ResumeError` listing every file tried and why."""
    ckpt = Path(ckpt)
    remove_partial_writes(ckpt.parent)
    problem = checkpoint_problem(ckpt)
    if problem is None:
        return ckpt
    if ckpt.name != LAST:
        raise ResumeError(
            f"{flag} {ckpt}: cannot resume from it: {problem}. Pass another checkpoint of the run "
            f"(in {ckpt.parent}) or the run directory."
        )
    logger.warning(
        "%s %s: cannot resume from it: %s. Looking for the newest readable checkpoint in %s.",
        flag,
        ckpt,
        problem,
        ckpt.parent,
    )
    tried = [(ckpt, problem)]
    for path in _candidates(ckpt.parent, ckpt):
        problem = checkpoint_problem(path)
        if problem is None:
            logger.warning("resuming from %s instead of the unreadable %s", path, ckpt.name)
            _replace_last(ckpt, path)
            return path
        logger.warning("%s: cannot resume from it: %s", path, problem)
        tried.append((path, problem))
    lines = "; ".join(f"{p.name}: {why}" for p, why in tried)
    raise ResumeError(
        f"{flag} {ckpt.parent.parent}: no readable checkpoint to resume from (tried {len(tried)}: "
        f"{lines}). Start a new run, or restore the run's checkpoints from a backup."
    )
