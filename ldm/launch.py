"""The training command line (``python main.py``): flags, run directory, Trainer, fit, summary.

Keeps the CompVis command line (``-b/--base``, ``-t``, ``-r``, ``-n``, ``-p``, ``-f``, ``-l``, ``-s``,
``--scale_lr``, ``--no-test``, ``-d``) on Lightning 2. Learning-rate rule of the original:
``lr = accumulate_grad_batches * devices * num_nodes * batch_size * base_learning_rate``.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import logging
import os
import pdb
import pickle
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf

from ldm.config import ConfigSources, explain, merge_configs, split_cli
from ldm.util import ConfigError, did_you_mean

logger = logging.getLogger("ldm.main")

RUN_NOW_ENV = "LDM_RUN_NOW"  # shared by the processes Lightning launches for one run


class UsageError(ConfigError):
    """A wrong combination of command-line flags."""


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
    p.add_argument("-l", "--logdir", type=str, default="logs",
                   help="parent folder of run directories (default: logs)")  # fmt: skip
    p.add_argument("-s", "--seed", type=int, default=23,
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
                   help="'local': trials one after another here; 'ray': Ray Tune when installed")  # fmt: skip
    return p


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Split overrides from flags, parse flags; unknown flags get a suggestion."""
    from ldm.trainer_setup import trainer_cli_args

    parser = get_parser()
    own = [s for a in parser._actions for s in a.option_strings]
    rest, overrides = split_cli(argv, own, trainer_cli_args())
    opt, unknown = parser.parse_known_args(rest)
    if unknown:
        bad = unknown[0]
        parser.error(
            f"unrecognized argument {bad!r}{did_you_mean(bad, own)}. Config overrides need a dotted key "
            "(model.params.x=1 or --model.params.x 1)."
        )
    if opt.name and opt.resume:
        raise UsageError(
            "-n/--name and -r/--resume cannot be used together: -r continues the run in its existing "
            "directory, whose name is fixed. To start a new, named run from a checkpoint's weights, "
            "use -n NAME with model.params.ckpt_path=PATH instead of -r."
        )
    return opt, overrides


@dataclass
class RunPaths:
    """Where a run writes: ``logdir`` = ``<logdir>/<now>_<name>``."""

    now: str
    nowname: str
    logdir: Path
    ckpt: Path | None = None
    resume_configs: list[str] = field(default_factory=list)

    @property
    def ckptdir(self) -> Path:
        return self.logdir / "checkpoints"

    @property
    def cfgdir(self) -> Path:
        return self.logdir / "configs"


def resolve_paths(opt: argparse.Namespace) -> RunPaths:
    """New run directory, or the existing one of ``-r`` with its checkpoint and saved configs."""
    now = os.environ.get(RUN_NOW_ENV) or datetime.datetime.now().strftime("%Y-%m-%dT%H-%M-%S")
    if opt.resume:
        target = Path(opt.resume)
        if not target.exists():
            raise UsageError(
                f"-r {opt.resume}: no such file or directory. Give a run directory "
                "(logs/<timestamp>_<name>) or a checkpoint inside its checkpoints/ folder."
            )
        if target.is_file():
            logdir = target.parent.parent if target.parent.name == "checkpoints" else target.parent
            ckpt = target
        else:
            logdir = target
            ckpt = target / "checkpoints" / "last.ckpt"
            if not ckpt.is_file():
                found = sorted(p.name for p in (target / "checkpoints").glob("*.ckpt"))
                raise UsageError(
                    f"-r {opt.resume}: {ckpt} does not exist (checkpoints there: "
                    f"{', '.join(found) or 'none'}). Pass one of them: -r {target}/checkpoints/NAME."
                )
        configs = sorted(str(p) for p in (logdir / "configs").glob("*.yaml"))
        base = now
        for i in itertools.count(1):  # two launches within one second keep both config files
            if (
                RUN_NOW_ENV in os.environ
                or not (logdir / "configs" / f"{now}-project.yaml").exists()
            ):
                break
            now = f"{base}-{i}"
        return RunPaths(now, logdir.name, logdir, ckpt, configs)
    if opt.name:
        name = "_" + opt.name
    elif opt.base:
        name = "_" + Path(opt.base[0]).stem
    else:
        name = ""
    parent = Path(opt.logdir) / opt.project if opt.project else Path(opt.logdir)
    nowname = now + name + opt.postfix
    if RUN_NOW_ENV not in os.environ:  # not a rank of a launched run: never reuse a directory
        base = now
        for i in itertools.count(1):
            if not (parent / nowname).exists():
                break
            now = f"{base}-{i}"
            nowname = now + name + opt.postfix
    return RunPaths(now, nowname, parent / nowname)


def scale_learning_rate(
    base_lr: float, batch_size: int, accumulate: int, devices: int, num_nodes: int, scale: bool
) -> tuple[float, str]:
    """CompVis rule: lr = accumulate * devices * nodes * batch_size * base_lr (or base_lr)."""
    if not scale:
        return base_lr, f"learning rate {base_lr:.2e} (base_learning_rate; --scale_lr false)"
    lr = accumulate * devices * num_nodes * batch_size * base_lr
    msg = (
        f"learning rate {lr:.2e} = {accumulate} (accumulate_grad_batches) * {devices} (devices) * "
        f"{num_nodes} (num_nodes) * {batch_size} (batch_size) * {base_lr:.2e} (base_learning_rate)"
    )
    return lr, msg


@dataclass
class RunResult:
    """What a launch did: where it wrote and the final step and metrics."""

    logdir: Path
    global_step: int
    epochs: int
    elapsed_s: float
    metrics: dict[str, float]
    last_ckpt: Path | None
    best_ckpt: str | None
    best_score: float | None
    interrupted: bool
    learning_rate: float | None


def load_config(
    opt: argparse.Namespace, paths: RunPaths, overrides: list[str]
) -> tuple[DictConfig, ConfigSources]:
    """Merge the resumed run's configs, ``--base`` files and overrides."""
    files = [*paths.resume_configs, *opt.base]
    if not files:
        raise UsageError("no config given: pass -b/--base CONFIG.yaml (or -r RUN_DIR).")
    return merge_configs(files, overrides)


def run(opt: argparse.Namespace, overrides: list[str]) -> RunResult:
    """Merge configs, build model/data/Trainer, fit (and test), and log a summary."""
    paths = resolve_paths(opt)
    owns_now = RUN_NOW_ENV not in os.environ
    os.environ[RUN_NOW_ENV] = paths.now  # ranks started by Lightning's launcher reuse the name
    try:
        return _run(opt, overrides, paths)
    finally:
        if owns_now:
            os.environ.pop(RUN_NOW_ENV, None)


def _run(opt: argparse.Namespace, overrides: list[str], paths: RunPaths) -> RunResult:
    from pytorch_lightning.utilities.model_helpers import is_overridden

    from ldm.data.datamodule import DataModuleFromConfig
    from ldm.trainer_setup import translate_trainer_config

    config, sources = load_config(opt, paths, overrides)
    lightning_config = config.pop("lightning", OmegaConf.create())
    trainer_kwargs, legacy_ckpt = translate_trainer_config(
        lightning_config.get("trainer", {}), sources
    )
    ckpt_path = str(paths.ckpt) if paths.ckpt else legacy_ckpt
    pl.seed_everything(opt.seed, workers=True)
    try:
        if "model" not in config:
            raise ConfigError(
                "the merged config has no 'model' section ({target, params}); add one."
            )
        model = _build(config, "model", sources)
        data = _build(config, "data", sources) if "data" in config else None
    except ConfigError as err:
        raise explain(err, sources) from err
    if opt.train and data is None:
        raise ConfigError(
            "training needs a 'data' section (target: main.DataModuleFromConfig, ...)."
        )
    if isinstance(data, DataModuleFromConfig):
        trainer_kwargs.setdefault(
            "use_distributed_sampler", False
        )  # the module splits ranks itself
    _manual_optimization_settings(model, trainer_kwargs)
    trainer, interrupt = build_trainer(opt, paths, config, lightning_config, trainer_kwargs, model)
    lr = set_learning_rate(opt, config, model, trainer)

    start = time.time()
    if opt.train:
        fit_kwargs: dict[str, Any] = {"datamodule": data}
        if ckpt_path:
            logger.info("resuming from %s", ckpt_path)
            fit_kwargs.update(ckpt_path=ckpt_path, weights_only=True)
        try:
            trainer.fit(model, **fit_kwargs)
        except pickle.UnpicklingError as err:
            raise ConfigError(
                f"-r: {ckpt_path} holds pickled Python objects that safe loading (weights_only) "
                f"refuses: {err}. Resume from a checkpoint written by this trainer, or load the "
                "weights with model.params.ckpt_path=... in a new run (-n NAME)."
            ) from err
        except Exception:
            if opt.debug and trainer.is_global_zero and sys.stdin.isatty():
                pdb.post_mortem()
            raise
    has_test = isinstance(data, DataModuleFromConfig) and "test" in data.dataset_configs
    if (
        not opt.no_test
        and not trainer.interrupted
        and has_test
        and is_overridden("test_step", model)
    ):
        trainer.test(model, datamodule=data)
    result = summarize(trainer, paths, time.time() - start, lr, interrupt)
    if opt.debug and not opt.resume and trainer.is_global_zero and paths.logdir.exists():
        dst = paths.logdir.parent / "debug_runs" / paths.logdir.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(paths.logdir), dst)
        logger.info("debug run moved to %s", dst)
        result.logdir = dst
    return result


def _manual_optimization_settings(model: Any, trainer_kwargs: dict[str, Any]) -> None:
    """GAN first stages optimize manually: Lightning refuses ``accumulate_grad_batches`` there, so
    the model accumulates itself; under DDP the idle discriminator needs unused-parameter search."""
    if getattr(model, "automatic_optimization", True):
        return
    accumulate = int(trainer_kwargs.get("accumulate_grad_batches", 1) or 1)
    if accumulate > 1:
        if not hasattr(model, "accumulate_grad_batches"):
            raise ConfigError(
                f"lightning.trainer.accumulate_grad_batches={accumulate}: "
                f"{type(model).__name__} uses manual optimization and does not accumulate "
                "gradients itself; remove the setting or use a larger batch."
            )
        trainer_kwargs.pop("accumulate_grad_batches")
        model.accumulate_grad_batches = accumulate
        logger.info(
            "manual optimization: %s accumulates gradients over %d batches itself",
            type(model).__name__,
            accumulate,
        )
    if trainer_kwargs.get("strategy") == "ddp":
        trainer_kwargs["strategy"] = "ddp_find_unused_parameters_true"
        logger.info("manual optimization under DDP: strategy ddp_find_unused_parameters_true")


def _build(config: DictConfig, section: str, sources: ConfigSources) -> Any:
    """Instantiate a section; a constructor's ValueError becomes a ConfigError naming it."""
    from ldm.util import instantiate_from_config

    try:
        return instantiate_from_config(config[section])
    except ConfigError:
        raise
    except (ValueError, AssertionError) as err:
        target = OmegaConf.select(config, f"{section}.target")
        raise ConfigError(
            f"{section}{sources.where(section + '.params')}: building {target} failed: "
            f"{type(err).__name__}: {err}. Check the values under '{section}.params' "
            "(run with -d for the full traceback)."
        ) from err


def build_trainer(
    opt: argparse.Namespace,
    paths: RunPaths,
    config: DictConfig,
    lightning_config: DictConfig,
    trainer_kwargs: dict[str, Any],
    model: pl.LightningModule,
) -> tuple[pl.Trainer, Any]:
    """Trainer with loggers, default + configured callbacks and atomic checkpoint writes."""
    from ldm.callbacks import SetupCallback
    from ldm.fault_tolerance import AtomicCheckpointIO, InterruptCheckpoint, RNGStateCheckpoint
    from ldm.trainer_setup import (
        build_loggers,
        default_callback_configs,
        instantiate_callbacks,
        trainstep_checkpoint_config,
    )

    lightning_config.trainer = OmegaConf.create(trainer_kwargs)
    version = f"csv-resumed-{paths.now}" if opt.resume else "csv"
    loggers = build_loggers(
        lightning_config, paths.logdir, paths.nowname, version, opt.debug, opt.project
    )
    monitor = getattr(model, "monitor", None)
    if monitor:
        logger.info("monitoring %s for the best checkpoints", monitor)
    defaults = OmegaConf.create(default_callback_configs(paths.ckptdir, monitor))
    user = lightning_config.get("callbacks") or OmegaConf.create()
    if "modelcheckpoint" in lightning_config:  # CompVis: its own section
        defaults.checkpoint_callback = OmegaConf.merge(
            defaults.checkpoint_callback, lightning_config.modelcheckpoint
        )
    if "metrics_over_trainsteps_checkpoint" in user:
        defaults.metrics_over_trainsteps_checkpoint = trainstep_checkpoint_config(paths.ckptdir)
    callbacks_cfg = OmegaConf.merge(defaults, user)
    setup = SetupCallback(
        resume=opt.resume,
        now=paths.now,
        logdir=str(paths.logdir),
        ckptdir=str(paths.ckptdir),
        cfgdir=str(paths.cfgdir),
        config=config,
        lightning_config=lightning_config,
        debug=opt.debug,
    )
    interrupt = InterruptCheckpoint(paths.ckptdir)
    callbacks = [setup, *instantiate_callbacks(callbacks_cfg), interrupt, RNGStateCheckpoint()]
    kwargs = dict(trainer_kwargs)
    strategy = kwargs.get("strategy", "auto")
    if isinstance(strategy, str) and not strategy.startswith(("deepspeed", "fsdp")):
        kwargs["plugins"] = [*(kwargs.get("plugins") or []), AtomicCheckpointIO()]
    kwargs.setdefault("default_root_dir", str(paths.logdir))
    # Frozen first and conditioning stages stay in eval mode on purpose (CompVis
    # `disabled_train`); Lightning's start-of-fit warning about them would only alarm users.
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    try:
        trainer = pl.Trainer(logger=loggers, callbacks=callbacks, **kwargs)
    except (ValueError, TypeError) as err:  # Lightning's MisconfigurationException is a ValueError
        raise ConfigError(
            f"lightning.trainer: Lightning rejected the Trainer arguments {kwargs}: {err}"
        ) from err
    return trainer, interrupt


def set_learning_rate(
    opt: argparse.Namespace, config: DictConfig, model: pl.LightningModule, trainer: pl.Trainer
) -> float | None:
    """Apply the CompVis learning-rate rule to ``model.learning_rate`` and log it."""
    base_lr = OmegaConf.select(config, "model.base_learning_rate", default=None)
    if base_lr is None:
        logger.warning(
            "model.base_learning_rate is not set; the model keeps its own learning rate."
        )
        return None
    if isinstance(base_lr, bool) or not isinstance(base_lr, int | float):
        raise ConfigError(
            f"model.base_learning_rate: expected a number like 1.0e-04, found {base_lr!r}."
        )
    batch_size = OmegaConf.select(config, "data.params.batch_size", default=1) or 1
    lr, msg = scale_learning_rate(
        float(base_lr),
        int(batch_size),
        int(getattr(model, "accumulate_grad_batches", 0) or trainer.accumulate_grad_batches)
        if not getattr(model, "automatic_optimization", True)
        else int(trainer.accumulate_grad_batches),
        int(trainer.num_devices),
        int(trainer.num_nodes),
        opt.scale_lr,
    )
    model.learning_rate = lr
    if trainer.is_global_zero:
        logger.info(msg)
    return lr


def summarize(
    trainer: pl.Trainer, paths: RunPaths, elapsed: float, lr: float | None, interrupt: Any
) -> RunResult:
    """Log steps, time and where checkpoints, images and metrics are; return them."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    metrics = {}
    for k, v in trainer.callback_metrics.items():
        try:
            metrics[k] = float(v)
        except (TypeError, ValueError):
            continue
    best_path, best_score = None, None
    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.monitor and cb.best_model_path:
            best_path = cb.best_model_path
            best_score = float(cb.best_model_score) if cb.best_model_score is not None else None
            break
    last = paths.ckptdir / "last.ckpt"
    result = RunResult(
        logdir=paths.logdir,
        global_step=trainer.global_step,
        epochs=trainer.current_epoch,
        elapsed_s=elapsed,
        metrics=metrics,
        last_ckpt=last if last.exists() else None,
        best_ckpt=best_path,
        best_score=best_score,
        interrupted=trainer.interrupted or bool(interrupt.saved_on),
        learning_rate=lr,
    )
    if trainer.is_global_zero:
        state = "stopped early" if result.interrupted else "finished"
        logger.info(
            "%s: %d steps, %d epochs in %.1f s", state, result.global_step, result.epochs, elapsed
        )
        logger.info("run directory: %s", paths.logdir)
        logger.info(
            "checkpoints:   %s%s", paths.ckptdir, f" (best: {best_path})" if best_path else ""
        )
        logger.info("images:        %s", paths.logdir / "images")
        logger.info("metrics:       %s", paths.logdir / "csv" / "metrics.csv")
    return result


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python main.py``; user mistakes print one readable error, exit code 2."""
    argv = sys.argv[1:] if argv is None else argv
    debug = any(a in ("-d", "--debug") for a in argv)
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    sys.path.insert(0, os.getcwd())  # CompVis: classes in the working directory resolve as targets
    try:
        opt, overrides = parse_args(argv)
        if opt.sweep:
            from ldm.sweep import run_sweep

            run_sweep(opt, overrides)
        else:
            run(opt, overrides)
    except ConfigError as err:
        if debug:
            logger.exception("%s", err)
        else:
            logger.error("%s", err)
        return 2
    return 0
