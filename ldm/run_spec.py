"""A training/evaluation run as a value: :class:`RunSpec` (what to run), :class:`RunResult` (what
it did).

``ldm.launch.run(spec) -> RunResult`` executes one run. ``main.py`` builds the spec from the
command line (:mod:`ldm.launch_cli`), a sweep builds one per trial (:mod:`ldm.sweep`), and Python
code builds them directly::

    from ldm.launch import run
    from ldm.run_spec import RunSpec

    result = run(RunSpec(base=["configs/txt2img.yaml"], train=True, overrides=["trainer.max_steps=20"]))
    result.run_dir, result.last_ckpt, result.status
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ldm.util import ConfigError


class UsageError(ConfigError):
    """A wrong combination of run settings (command-line flags)."""


@dataclass(frozen=True)
class RunSpec:
    """Everything one run needs. Each field is the value of a ``python main.py`` flag.

    ``base`` and ``overrides`` take any sequence (stored as tuples of strings); ``resume`` and
    ``logdir`` take paths (stored as strings).
    """

    #: ``-b/--base``: config files, merged left to right.
    base: Sequence[str | Path] = ()
    #: config overrides ``key.path=value`` applied after the files (``trainer.x`` means
    #: ``lightning.trainer.x``).
    overrides: Sequence[str] = ()
    #: ``-t/--train``: fit; without it only the test split runs.
    train: bool = False
    #: ``-r/--resume``: a run directory or a checkpoint inside it; "" starts a new run.
    resume: str | Path = ""
    #: ``-n/--name``: run directory ``<logdir>/<now>_<name>`` (default: the first config's stem).
    name: str = ""
    #: ``-p/--project``: runs go to ``<logdir>/<project>/``; the W&B project.
    project: str | None = None
    #: ``-f/--postfix``: appended to the run directory name.
    postfix: str = ""
    #: ``-l/--logdir``: the folder that holds run directories.
    logdir: str | Path = "logs"
    #: ``-s/--seed``: for ``seed_everything``.
    seed: int = 23
    #: ``--scale_lr``: lr = accumulate * devices * nodes * batch_size * base_learning_rate.
    scale_lr: bool = True
    #: ``--no-test``: skip the test split after training.
    no_test: bool = False
    #: ``-d/--debug``: post-mortem debugger on errors, run moved to ``<logdir>/debug_runs``.
    debug: bool = False
    #: ``python -m ldm validate``: run the validation split (after fitting, when ``train``).
    validate: bool = False
    #: Timestamp part of the run directory's name. None: the current time, made unique (``-1``,
    #: ``-2``, ...) when taken. Given: used as is, so the processes of one run (DDP ranks) that
    #: are given the same value write to one directory.
    now: str | None = None

    def __post_init__(self) -> None:
        def set_(name: str, value: object) -> None:
            object.__setattr__(self, name, value)

        for name in ("base", "overrides"):
            value = getattr(self, name)
            if isinstance(value, str | Path):
                raise TypeError(f"RunSpec.{name}: expected a list of strings, found {value!r}.")
            set_(name, tuple(str(v) for v in value))
        set_("resume", str(self.resume) if self.resume else "")
        set_("logdir", str(self.logdir))
        if self.now is not None and not self.now:
            raise UsageError("RunSpec.now: an empty timestamp; pass None for the current time.")
        if self.name and self.resume:
            raise UsageError(
                "-n/--name and -r/--resume cannot be used together: -r continues the run in its "
                "existing directory, whose name is fixed. To start a new, named run from a "
                "checkpoint's weights, use -n NAME with model.params.ckpt_path=PATH instead of -r."
            )


#: :attr:`RunResult.status` of a run that ran to its end (max_steps/max_epochs, early stopping).
FINISHED = "finished"
#: :attr:`RunResult.status` of a run stopped early by a signal or Ctrl-C (``last.ckpt`` saved).
INTERRUPTED = "interrupted"


@dataclass
class RunResult:
    """What a run did: where it wrote, how it ended, its last step and metrics."""

    #: the run directory (``<logdir>/<now>_<name>``; under ``debug_runs/`` in debug mode).
    run_dir: Path
    #: :data:`FINISHED` or :data:`INTERRUPTED`.
    status: str
    #: ``<run_dir>/checkpoints/last.ckpt`` when it exists.
    last_ckpt: Path | None
    #: the final logged metrics (``trainer.callback_metrics`` as floats).
    metrics: dict[str, float]
    #: the metric the best checkpoints are chosen by (the model's ``monitor``), if any.
    monitor: str | None
    #: the best checkpoint by ``monitor`` and its score.
    best_ckpt: str | None
    best_score: float | None
    global_step: int
    epochs: int
    elapsed_s: float
    #: the learning rate set on the model (after the ``--scale_lr`` rule); None when unset.
    learning_rate: float | None

    @property
    def interrupted(self) -> bool:
        """Whether the run stopped before its end (signal or Ctrl-C)."""
        return self.status == INTERRUPTED

    @property
    def monitor_value(self) -> float | None:
        """The last logged value of ``monitor``."""
        return self.metrics.get(self.monitor) if self.monitor else None
