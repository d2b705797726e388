"""One training/evaluation run: ``run(spec: RunSpec) -> RunResult``.

Resolves the run directory, merges the configs, builds model, data and Trainer, fits (and tests),
and logs a summary. No command-line parsing here: ``main.py`` turns argv into a
:class:`~ldm.run_spec.RunSpec` (:mod:`ldm.launch_cli`); a sweep (:mod:`ldm.sweep`) builds one per
trial. Learning-rate rule of the original:
``lr = accumulate_grad_batches * devices * num_nodes * batch_size * base_learning_rate``.
"""

from __future__ import annotations

import datetime
import itertools
import logging
import math
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

from ldm.config import ConfigSources, explain, merge_configs, normalize_key
from ldm.engine.sharding import STRATEGY_NAMES, fsdp2_strategy
from ldm.fit_errors import fit_errors
from ldm.run_spec import FINISHED, INTERRUPTED, RunResult, RunSpec, UsageError
from ldm.util import ConfigError

__all__ = [
    "RunPaths",
    "RunResult",
    "RunSpec",
    "UsageError",
    "config_overrides",
    "resolve_paths",
    "run",
    "scale_learning_rate",
    "timestamp",
]

logger = logging.getLogger("ldm.main")


def timestamp() -> str:
    """The current time as the first part of a run directory's name (``2024-01-31T12-00-00``)."""
    return datetime.datetime.now().strftime("%Y-%m-%dT%H-%M-%S")


@dataclass
class RunPaths:
    """Where a run writes: ``run_dir`` = ``<logdir>/<now>_<name>`` (``nowname`` is its name)."""

    now: str
    nowname: str
    run_dir: Path
    ckpt: Path | None = None
    resume_configs: list[str] = field(default_factory=list)

    @property
    def ckptdir(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def cfgdir(self) -> Path:
        return self.run_dir / "configs"


def resolve_paths(spec: RunSpec) -> RunPaths:
    """New run directory, or the existing one of ``-r`` with its checkpoint and saved configs.

    ``spec.now`` None: the current time, with ``-1``, ``-2``, ... appended while that name is taken
    (a new directory; with ``-r``, new config file names in the run's ``configs/``). ``spec.now``
    given: used as is, so every process of one run resolves the same paths.
    """
    joining = spec.now is not None
    now = spec.now if spec.now is not None else timestamp()
    if spec.resume:
        target = Path(spec.resume)
        if not target.exists():
            raise UsageError(
                f"-r {spec.resume}: no such file or directory. Give a run directory "
                "(logs/<timestamp>_<name>) or a checkpoint inside its checkpoints/ folder."
            )
        if target.is_file():
            run_dir = target.parent.parent if target.parent.name == "checkpoints" else target.parent
            ckpt = target
        else:
            run_dir = target
            ckpt = target / "checkpoints" / "last.ckpt"
            found = sorted(p.name for p in (target / "checkpoints").glob("*.ckpt"))
            if not ckpt.is_file() and not found:  # else the newest other one (resume_fallback)
                raise UsageError(
                    f"-r {spec.resume}: {ckpt} does not exist (checkpoints there: "
                    f"{', '.join(found) or 'none'}). Pass one of them: -r {target}/checkpoints/NAME."
                )
        configs = sorted(str(p) for p in (run_dir / "configs").glob("*.yaml"))
        base = now
        for i in itertools.count(1):  # two launches within one second keep both config files
            if joining or not (run_dir / "configs" / f"{now}-project.yaml").exists():
                break
            now = f"{base}-{i}"
        return RunPaths(now, run_dir.name, run_dir, ckpt, configs)
    if spec.name:
        name = "_" + spec.name
    elif spec.base:
        name = "_" + Path(spec.base[0]).stem
    else:
        name = ""
    parent = Path(spec.logdir) / spec.project if spec.project else Path(spec.logdir)
    nowname = now + name + spec.postfix
    if not joining:  # a new run never reuses a directory: claimed by creating it
        from ldm.run_dir import claim

        base = now
        for i in itertools.count(1):
            if claim(parent / nowname):
                break
            now = f"{base}-{i}"
            nowname = now + name + spec.postfix
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


def _eval_ckpt(spec: RunSpec, ckpt_path: str | None) -> dict[str, Any]:
    """Without training, validate / test the resumed checkpoint's weights (``-r``)."""
    if spec.train or not ckpt_path:
        return {}
    return {"ckpt_path": ckpt_path, "weights_only": True}


def config_overrides(spec: RunSpec) -> list[str]:
    """``spec.overrides`` with ``trainer.x=1`` and a bare Trainer argument ``x=1`` written as
    ``lightning.trainer.x=1`` (the command line does the same for ``--trainer.x 1``)."""
    from ldm.trainer_setup import trainer_cli_args

    trainer_args = trainer_cli_args()
    out = []
    for tok in spec.overrides:
        key, eq, value = tok.partition("=")
        out.append(f"{normalize_key(key, trainer_args)}{eq}{value}")
    return out


def load_config(spec: RunSpec, paths: RunPaths) -> tuple[DictConfig, ConfigSources]:
    """Merge the resumed run's configs, ``--base`` files and overrides."""
    files = [*paths.resume_configs, *spec.base]
    if not files:
        raise UsageError("no config given: pass -b/--base CONFIG.yaml (or -r RUN_DIR).")
    return merge_configs(files, config_overrides(spec))


def run(spec: RunSpec) -> RunResult:
    """Run ``spec``: merge configs, build model/data/Trainer, fit (and test), log a summary.

    The single entry of the library for training and evaluation runs (``main.py``, sweeps and
    Python code call it). User mistakes raise :class:`~ldm.util.ConfigError`; a disk that is
    full or read-only, :class:`~ldm.errors.RunFailure`.
    """
    from ldm.run_dir import removed_if_unused

    paths = resolve_paths(spec)
    if spec.now is not None or spec.resume:  # not claimed here (main.py claimed it)
        return _run(spec, paths)
    with removed_if_unused(paths.run_dir, spec.logdir):
        return _run(spec, paths)


def _run(spec: RunSpec, paths: RunPaths) -> RunResult:
    from pytorch_lightning.utilities.model_helpers import is_overridden

    from ldm.data.datamodule import DataModuleFromConfig
    from ldm.disk_errors import check_writable
    from ldm.resume_fallback import resume_checkpoint
    from ldm.trainer_setup import translate_trainer_config

    config, sources = load_config(spec, paths)
    lightning_config = config.pop("lightning", None)
    if lightning_config is None:
        lightning_config = OmegaConf.create()
    if not isinstance(lightning_config, DictConfig):
        raise ConfigError(
            f"lightning{sources.where('lightning')}: expected a mapping (trainer, callbacks, "
            f"...), found {lightning_config!r}."
        )
    trainer_kwargs, legacy_ckpt = translate_trainer_config(
        lightning_config.get("trainer", {}), sources
    )
    ckpt_path = str(resume_checkpoint(paths.ckpt)) if paths.ckpt else legacy_ckpt
    if spec.train:
        flag = "-r" if spec.resume else "-l/--logdir"
        check_writable(paths.run_dir, "the run's logs and checkpoints", flag=flag)
    pl.seed_everything(spec.seed, workers=True)
    try:
        if "model" not in config:
            raise ConfigError(
                "the merged config has no 'model' section ({target, params}); add one."
            )
        _drop_latent_options(config, sources)
        model = _build(config, "model", sources)
        data = _build(config, "data", sources) if "data" in config else None
    except ConfigError as err:
        raise explain(err, sources) from err
    if spec.train and data is None:
        raise ConfigError(
            "training needs a 'data' section (target: main.DataModuleFromConfig, ...)."
        )
    if isinstance(data, DataModuleFromConfig):
        trainer_kwargs.setdefault(
            "use_distributed_sampler", False
        )  # the module splits ranks itself
    _manual_optimization_settings(model, trainer_kwargs)
    trainer, interrupt = build_trainer(spec, paths, config, lightning_config, trainer_kwargs, model)
    lr = set_learning_rate(spec, config, model, trainer)

    start = time.time()
    if spec.train:
        fit_kwargs: dict[str, Any] = {"datamodule": data}
        if ckpt_path:
            logger.info("resuming from %s", ckpt_path)
            fit_kwargs.update(ckpt_path=ckpt_path, weights_only=True)
        try:
            with fit_errors(paths.run_dir, ckpt_path, trainer):
                trainer.fit(model, **fit_kwargs)
        except pickle.UnpicklingError as err:
            raise ConfigError(
                f"-r: {ckpt_path} holds pickled Python objects that safe loading (weights_only) "
                f"refuses: {err}. Resume from a checkpoint written by this trainer, or load the "
                "weights with model.params.ckpt_path=... in a new run (-n NAME)."
            ) from err
        except Exception:
            if spec.debug and trainer.is_global_zero and sys.stdin.isatty():
                pdb.post_mortem()
            raise
    if spec.validate and not trainer.interrupted:
        has_val = isinstance(data, DataModuleFromConfig) and "validation" in data.dataset_configs
        if not (has_val and is_overridden("validation_step", model)):
            raise UsageError(
                "validate: the config has no validation split (data.params.validation) or the "
                "model no validation_step."
            )
        trainer.validate(model, datamodule=data, **_eval_ckpt(spec, ckpt_path))
    has_test = isinstance(data, DataModuleFromConfig) and "test" in data.dataset_configs
    if (
        not spec.no_test
        and not trainer.interrupted
        and has_test
        and is_overridden("test_step", model)
    ):
        trainer.test(model, datamodule=data, **_eval_ckpt(spec, ckpt_path))
    elif not spec.train and not spec.validate:
        logger.warning(
            "nothing was run: without -t (train) main.py only validates (--validate) or tests "
            "(a data.params.test split%s); add -t to %s.",
            ", and --no-test is set" if spec.no_test else "",
            "continue training this run" if spec.resume else "train",
        )
    result = summarize(
        trainer, paths, time.time() - start, lr, interrupt, getattr(model, "monitor", None)
    )
    if spec.debug and not spec.resume and trainer.is_global_zero and paths.run_dir.exists():
        dst = paths.run_dir.parent / "debug_runs" / paths.run_dir.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(paths.run_dir), dst)
        logger.info("debug run moved to %s", dst)
        result.run_dir = dst
        if result.last_ckpt:
            result.last_ckpt = dst / result.last_ckpt.relative_to(paths.run_dir)
        if result.best_ckpt and Path(result.best_ckpt).is_relative_to(paths.run_dir):
            result.best_ckpt = str(dst / Path(result.best_ckpt).relative_to(paths.run_dir))
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


def _drop_latent_options(config: DictConfig, sources: ConfigSources) -> None:
    """A data config made for latent diffusion (``configs/data/image-folder.yaml`` sets
    ``model.params.cache_latents``) merged over an autoencoder: the autoencoder trains on pixels,
    so the option is dropped with a log line instead of refused."""
    params = OmegaConf.select(config, "model.params")
    if not isinstance(params, DictConfig) or "cache_latents" not in params:
        return
    from ldm.models.autoencoder_base import FirstStageTraining
    from ldm.util import get_obj_from_str

    try:
        cls = get_obj_from_str(str(OmegaConf.select(config, "model.target")))
    except Exception:  # noqa: BLE001 - a bad target is reported by _build
        return
    if isinstance(cls, type) and issubclass(cls, FirstStageTraining):
        params.pop("cache_latents")
        logger.info(
            "model.params.cache_latents%s: %s trains on pixels, there are no latents to cache; "
            "ignored",
            sources.where("model.params.cache_latents"),
            cls.__name__,
        )


def _build(config: DictConfig, section: str, sources: ConfigSources) -> Any:
    """Instantiate a section; a constructor's ValueError becomes a ConfigError naming it."""
    from ldm.util import instantiate_from_config

    try:
        return instantiate_from_config(config[section])
    except ConfigError:
        raise
    except (  # e.g. a negative layer size, a data folder or checkpoint that is not there
        ValueError,
        AssertionError,
        RuntimeError,
        FileNotFoundError,
        NotADirectoryError,
        IsADirectoryError,
    ) as err:
        target = OmegaConf.select(config, f"{section}.target")
        raise ConfigError(
            f"{section}{sources.where(section + '.params')}: building {target} failed: "
            f"{type(err).__name__}: {err}. Check the values under '{section}.params' "
            "(run with -d for the full traceback)."
        ) from err


def build_trainer(
    spec: RunSpec,
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
    version = f"csv-resumed-{paths.now}" if spec.resume else "csv"
    loggers = build_loggers(
        lightning_config, paths.run_dir, paths.nowname, version, spec.debug, spec.project
    )
    monitor = getattr(model, "monitor", None)
    if monitor is not None and not isinstance(monitor, str):
        raise ConfigError(
            f"model.params.monitor: expected the name of a logged metric like val/loss, found "
            f"{monitor!r}."
        )
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
        resume=spec.resume,
        now=paths.now,
        logdir=str(paths.run_dir),
        ckptdir=str(paths.ckptdir),
        cfgdir=str(paths.cfgdir),
        config=config,
        lightning_config=lightning_config,
        debug=spec.debug,
    )
    interrupt = InterruptCheckpoint(paths.ckptdir)
    callbacks = [setup, *instantiate_callbacks(callbacks_cfg), interrupt, RNGStateCheckpoint()]
    kwargs = dict(trainer_kwargs)
    strategy = kwargs.get("strategy", "auto")
    if strategy in STRATEGY_NAMES:  # ours: FSDP2 through Lightning's ModelParallelStrategy
        kwargs["strategy"] = fsdp2_strategy(kwargs.get("devices", 1), kwargs.get("num_nodes", 1))
        logger.info(
            "strategy %s: Lightning's ModelParallelStrategy (ldm.engine.sharding)", strategy
        )
    if isinstance(strategy, str) and not strategy.startswith(
        ("deepspeed", "fsdp", "model_parallel")
    ):
        kwargs["plugins"] = [*(kwargs.get("plugins") or []), AtomicCheckpointIO()]
    kwargs.setdefault("default_root_dir", str(paths.run_dir))
    # Frozen first and conditioning stages stay in eval mode on purpose (CompVis
    # `disabled_train`); Lightning's start-of-fit warning about them would only alarm users.
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    from lightning_fabric.utilities.exceptions import MisconfigurationException

    try:
        trainer = pl.Trainer(logger=loggers, callbacks=callbacks, **kwargs)
    except ImportError as err:  # an accelerator or strategy whose package is not installed
        raise ConfigError(f"lightning.trainer: {err}") from err
    except (ValueError, TypeError, MisconfigurationException) as err:
        raise ConfigError(
            f"lightning.trainer: Lightning rejected the Trainer arguments {kwargs}: {err}"
        ) from err
    return trainer, interrupt


def set_learning_rate(
    spec: RunSpec, config: DictConfig, model: pl.LightningModule, trainer: pl.Trainer
) -> float | None:
    """Apply the CompVis learning-rate rule to ``model.learning_rate`` and log it."""
    base_lr = OmegaConf.select(config, "model.base_learning_rate", default=None)
    if base_lr is None:
        logger.warning(
            "model.base_learning_rate is not set; the model keeps its own learning rate."
        )
        return None
    if (
        isinstance(base_lr, bool)
        or not isinstance(base_lr, int | float)
        or not math.isfinite(base_lr)
        or base_lr < 0
    ):
        raise ConfigError(
            f"model.base_learning_rate: expected a number >= 0 like 1.0e-04, found {base_lr!r}."
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
        spec.scale_lr,
    )
    model.learning_rate = lr
    if trainer.is_global_zero:
        logger.info(msg)
    return lr


def summarize(
    trainer: pl.Trainer,
    paths: RunPaths,
    elapsed: float,
    lr: float | None,
    interrupt: Any,
    monitor: str | None = None,
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
        run_dir=paths.run_dir,
        status=INTERRUPTED if trainer.interrupted or interrupt.saved_on else FINISHED,
        last_ckpt=last if last.exists() else None,
        metrics=metrics,
        monitor=monitor,
        best_ckpt=best_path,
        best_score=best_score,
        global_step=trainer.global_step,
        epochs=trainer.current_epoch,
        elapsed_s=elapsed,
        learning_rate=lr,
    )
    if trainer.is_global_zero:
        state = "stopped early" if result.interrupted else "finished"
        logger.info(
            "%s: %d steps, %d epochs in %.1f s", state, result.global_step, result.epochs, elapsed
        )
        logger.info("run directory: %s", paths.run_dir)
        logger.info(
            "checkpoints:   %s%s", paths.ckptdir, f" (best: {best_path})" if best_path else ""
        )
        logger.info("images:        %s", paths.run_dir / "images")
        logger.info("metrics:       %s", paths.run_dir / "csv" / "metrics.csv")
    return result
