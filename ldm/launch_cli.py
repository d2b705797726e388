"""The command line of ``python main.py``: flags and overrides -> a :class:`~ldm.run_spec.RunSpec`.

Keeps the CompVis command line (``-b/--base``, ``-t``, ``-r``, ``-n``, ``-p``, ``-f``, ``-l``, ``-s``,
``--scale_lr``, ``--no-test``, ``-d``) and adds ``--sweep`` / ``--sweep-backend``. Only ``main.py``
calls this module; the library (``ldm.launch.run``, ``ldm.sweep.run_sweep``) takes RunSpecs.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ldm.commands.validation import int_in, non_empty
from ldm.config import split_cli
from ldm.run_spec import RunSpec
from ldm.util import did_you_mean


def str2bool(v: Any) -> bool:
    """``yes/true/t/y/1`` -> True, ``no/false/f/n/0`` -> False."""
    if isinstance(v, bool):
        return v
    if v.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if v.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), found {v!r}")


EPILOG = """\
overrides (any config key, after the flags or between them):
  model.params.x=1          dotlist form
  --model.params.x=1        flag form with '='
  --model.params.x 1        flag form with a separate value
  --trainer.devices 2       Trainer arguments: same as lightning.trainer.devices=2
  --max_steps 20            a bare Trainer argument (legacy: --gpus 0,)

examples:
  python main.py --base configs/txt2img.yaml -t
  python main.py --base A.yaml B.yaml -t model.base_learning_rate=1e-4 --trainer.max_steps 20
  python main.py -r logs/2024-01-01T00-00-00_txt2img -t          # continue a run
  python main.py --base A.yaml -t --sweep sweep.yaml             # grid/random sweep
"""


def get_parser() -> argparse.ArgumentParser:
    """The CompVis flags, plus ``--sweep`` / ``--sweep-backend``."""
    p = argparse.ArgumentParser(
        prog="main.py",
        description="Train latent diffusion models and autoencoders from CompVis-style YAML configs.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    p.add_argument("-b", "--base", nargs="*", metavar="CONFIG.yaml", default=[],
                   help="config files, merged left to right; later files and overrides win")  # fmt: skip
    p.add_argument("-t", "--train", type=str2bool, nargs="?", const=True, default=False,
                   help="train (fit); without it only the test split is run")  # fmt: skip
    p.add_argument("-r", "--resume", type=str, default="", metavar="RUN_DIR|CKPT",
                   help="continue a run: its directory (uses checkpoints/last.ckpt) or a checkpoint "
                        "inside it; restores weights, optimizer, schedulers, EMA, step counters "
                        "and data position, and keeps writing to the same run directory")  # fmt: skip
    p.add_argument("-n", "--name", type=str, default="",
                   help="run name: logs/<timestamp>_<name> (default: first config's file name); "
                        "not with -r")  # fmt: skip
    p.add_argument("-p", "--project", type=str, default=None,
                   help="group runs under <logdir>/<project>/ and name the W&B project")  # fmt: skip
    p.add_argument("-f", "--postfix", type=str, default="",
                   help="appended to the run directory name")  # fmt: skip
    p.add_argument("-l", "--logdir", type=non_empty, default="logs",
                   help="parent folder of run directories (default: logs)")  # fmt: skip
    p.add_argument("-s", "--seed", type=int_in(0, 2**32 - 1), default=23,
                   help="seed for seed_everything (default: 23)")  # fmt: skip
    p.add_argument("--scale_lr", type=str2bool, nargs="?", const=True, default=True,
                   help="lr = accumulate_grad_batches * devices * num_nodes * batch_size * "
                        "base_learning_rate (default: true; --scale_lr false uses base lr)")  # fmt: skip
    p.add_argument("--no-test", type=str2bool, nargs="?", const=True, default=False,
                   help="skip the test split after training")  # fmt: skip
    p.add_argument("-d", "--debug", type=str2bool, nargs="?", const=True, default=False,
                   help="debug: verbose logging, post-mortem debugger on errors, run moved to "
                        "<logdir>/debug_runs, W&B offline")  # fmt: skip
    p.add_argument("--sweep", type=str, default=None, metavar="SWEEP.yaml",
                   help="run a sweep: grid or random sampling over config keys (see ldm/sweep.py)")  # fmt: skip
    p.add_argument("--sweep-backend", choices=("local", "ray"), default="local",
                   help="'local': trials one after another here; 'ray': Ray Tune (pip install -e '.[sweep]')")  # fmt: skip
    p.add_argument("--ray-address", type=str, default=None, metavar="HOST:PORT",
                   help="with --sweep-backend ray: join this Ray cluster (started with 'ray start "
                        "--head'); default: a Ray instance on this machine")  # fmt: skip
    p.add_argument("--sweep-resume", type=str, default=None, metavar="SWEEP_DIR",
                   help="with --sweep: continue the interrupted sweep in this folder (its "
                        "finished trials are kept, the others run)")  # fmt: skip
    return p


@dataclass(frozen=True)
class Command:
    """What one ``python main.py ...`` asks for: a run, or a sweep of runs built around it."""

    spec: RunSpec
    #: ``--sweep SWEEP.yaml``: run the trials of this file instead of ``spec`` itself.
    sweep: str | None = None
    #: ``--sweep-backend``: ``local`` or ``ray``.
    sweep_backend: str = "local"
    #: ``--ray-address``: an existing Ray cluster to run the trials on.
    ray_address: str | None = None
    #: ``--sweep-resume``: the folder of an interrupted sweep to continue.
    sweep_resume: str | None = None


def parse_flags(
    parser: argparse.ArgumentParser, argv: Sequence[str], hint: str
) -> tuple[argparse.Namespace, list[str]]:
    """(the parser's flags, the config overrides) of a command line; an unknown flag is an
    argparse error with a suggestion and ``hint``."""
    from ldm.trainer_setup import trainer_cli_args

    own = [s for a in parser._actions for s in a.option_strings]
    one_value = [s for a in parser._actions if a.nargs is None and a.type for s in a.option_strings]
    rest, overrides = split_cli(list(argv), own, trainer_cli_args(), one_value)
    opt, unknown = parser.parse_known_args(rest)
    if unknown:
        bad = unknown[0]
        parser.error(f"unrecognized argument {bad!r}{did_you_mean(bad, own)}{hint}")
    return opt, overrides


def parse_command(argv: Sequence[str]) -> Command:
    """Split overrides from flags, parse flags into a RunSpec; unknown flags get a suggestion."""
    parser = get_parser()
    opt, overrides = parse_flags(
        parser,
        argv,
        ". Config overrides need a dotted key (model.params.x=1 or --model.params.x 1).",
    )
    spec = RunSpec(
        base=opt.base,
        overrides=overrides,
        train=opt.train,
        resume=opt.resume,
        name=opt.name,
        project=opt.project,
        postfix=opt.postfix,
        logdir=opt.logdir,
        seed=opt.seed,
        scale_lr=opt.scale_lr,
        no_test=opt.no_test,
        debug=opt.debug,
    )
    if (opt.ray_address or opt.sweep_resume) and not opt.sweep:
        parser.error("--ray-address and --sweep-resume go with --sweep SWEEP.yaml")
    if opt.ray_address and opt.sweep_backend != "ray":
        parser.error("--ray-address needs --sweep-backend ray")
    return Command(
        spec,
        sweep=opt.sweep,
        sweep_backend=opt.sweep_backend,
        ray_address=opt.ray_address,
        sweep_resume=opt.sweep_resume,
    )
