"""Train from CompVis-style YAML configs: ``python main.py --base CONFIG.yaml -t`` (see --help).

The only place the command line is read: argv -> :class:`~ldm.run_spec.RunSpec`
(:mod:`ldm.launch_cli`), then :func:`ldm.launch.run` (or :func:`ldm.sweep.run_sweep` with
``--sweep``). The names CompVis configs use as targets resolve here too: ``main.DataModuleFromConfig``,
``main.ImageLogger``, ``main.SetupCallback``, ``main.CUDACallback``, ``main.WrappedDataset``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

from ldm.callbacks import CUDACallback, ImageLogger, SetupCallback
from ldm.data.datamodule import DataModuleFromConfig, WrappedDataset
from ldm.errors import FAILURE, USAGE, RunFailure
from ldm.launch import resolve_paths, run
from ldm.launch_cli import get_parser, parse_command
from ldm.malloc_policy import retain_freed_memory
from ldm.run_dir import removed_if_unused
from ldm.run_spec import RunSpec
from ldm.sweep import run_sweep
from ldm.util import ConfigError

__all__ = [
    "CUDACallback",
    "DataModuleFromConfig",
    "ImageLogger",
    "SetupCallback",
    "WrappedDataset",
    "get_parser",
    "main",
]

logger = logging.getLogger("ldm.main")

#: Carries the run directory's timestamp from rank 0 to the ranks Lightning starts (see below).
RUN_NOW_ENV = "LDM_RUN_NOW"


@contextmanager
def run_name_shared_with_child_ranks(spec: RunSpec) -> Iterator[RunSpec]:
    """The process-boundary hand-off of the run directory's name to the other ranks of a run.

    Lightning's DDP launcher starts ranks 1..N-1 by executing this script again with the same argv
    and a copy of ``os.environ``. The first process resolves the timestamp of the run directory
    once and exports it in ``LDM_RUN_NOW`` while it runs; a process that finds the variable is such
    a rank and joins that directory. Either way the run gets the value as ``RunSpec.now``: this is
    the only place the variable is read or written.
    """
    inherited = os.environ.get(RUN_NOW_ENV)
    if inherited:
        yield dataclasses.replace(spec, now=inherited)
        return
    paths = resolve_paths(spec)  # a new run's directory is created (claimed) here
    now = paths.now
    os.environ[RUN_NOW_ENV] = now
    try:
        with nullcontext() if spec.resume else removed_if_unused(paths.run_dir, spec.logdir):
            yield dataclasses.replace(spec, now=now)
    finally:
        os.environ.pop(RUN_NOW_ENV, None)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python main.py``; user mistakes print one readable error, exit code 2; a
    full or read-only disk (or another fault outside the flags), exit code 1."""
    argv = sys.argv[1:] if argv is None else argv
    debug = any(a in ("-d", "--debug") for a in argv)
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    sys.path.insert(0, os.getcwd())  # CompVis: classes in the working directory resolve as targets
    try:
        command = parse_command(argv)
        if command.sweep:
            run_sweep(
                command.spec,
                command.sweep,
                backend=command.sweep_backend,
                address=command.ray_address,
                resume=command.sweep_resume,
            )
        else:
            with run_name_shared_with_child_ranks(command.spec) as spec:
                run(spec)
    except ConfigError as err:
        if debug:
            logger.exception("%s", err)
        else:
            logger.error("%s", err)
        return USAGE
    except RunFailure as err:
        logger.error("%s", err, exc_info=debug)
        return FAILURE
    return 0


if __name__ == "__main__":
    retain_freed_memory()  # before anything big is allocated
    sys.exit(main())
