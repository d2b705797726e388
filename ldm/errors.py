"""How a command ends on a user's mistake or a fault: one message on stderr and an exit code.

Exit code 2 (:data:`USAGE`): something the user gave is wrong (a flag, a value, a config, a file
that is missing, damaged or not a checkpoint). Exit code 1 (:data:`FAILURE`): the run could not go
on for a reason outside the command line (:class:`RunFailure`: disk full, read-only folder, out of
memory). Any other exception is a bug of ours and keeps its traceback: the difference is on purpose.
"""

from __future__ import annotations

import sys

__all__ = ["FAILURE", "USAGE", "RunFailure", "exit_code", "report", "usage_errors"]

#: exit code of a usage error (as argparse uses)
USAGE = 2
#: exit code of a run that failed for a reason outside the command line
FAILURE = 1


class RunFailure(RuntimeError):
    """The run stopped for a reason outside the flags (disk full, read-only folder, out of
    memory); the message names what, where, and what to do."""


def usage_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean "what the user gave is wrong" in every command."""
    from ldm.adapters.embeddings_errors import EmbeddingError
    from ldm.adapters.lora_weights import LoraError
    from ldm.checkpoint.detect import DetectionError
    from ldm.checkpoint.diffusers_config import ConversionError
    from ldm.checkpoint.report import CheckpointMismatchError
    from ldm.checkpoint.safe_load import CheckpointFormatError, UnsafeCheckpointError
    from ldm.data.image_io import BadImageError
    from ldm.util import ConfigError

    return (
        ConfigError,
        CheckpointFormatError,
        CheckpointMismatchError,
        ConversionError,
        DetectionError,
        EmbeddingError,
        LoraError,
        UnsafeCheckpointError,
        BadImageError,
        FileNotFoundError,
        NotADirectoryError,
        IsADirectoryError,
    )


def exit_code(err: BaseException, usage: tuple[type[BaseException], ...] = ()) -> int | None:
    """:data:`USAGE` or :data:`FAILURE` for the errors a command reports; None for a bug."""
    if isinstance(err, RunFailure):
        return FAILURE
    if isinstance(err, usage + usage_errors()):
        return USAGE
    return None


def report(prog: str, err: BaseException, code: int) -> int:
    """Write ``prog: error: message`` to stderr (argparse's form); return ``code``."""
    sys.stderr.write(f"{prog}: error: {err}\n")
    return code
