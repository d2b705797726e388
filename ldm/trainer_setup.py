"""The ``lightning`` config section -> a Lightning 2 ``Trainer`` with loggers and callbacks.

Legacy (Lightning 1.x / CompVis) Trainer arguments are translated with a log line (``gpus: 0,`` ->
``accelerator: gpu, devices: [0]``; ``precision: 16`` -> ``16-mixed``; ``accelerator: ddp`` ->
``strategy: ddp``); unknown arguments and wrong types are errors naming the key and its file.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from ldm.config import ConfigSources
from ldm.util import ConfigError, did_you_mean, instantiate_from_config

logger = logging.getLogger(__name__)

TRAINER_ARGS = [
    n
    for n in inspect.signature(pl.Trainer.__init__).parameters
    if n not in ("self", "logger", "callbacks")
]
#: Lightning 1.x arguments that no longer exist and carry no meaning now (dropped with a warning).
DROPPED_ARGS = {
    "progress_bar_refresh_rate", "weights_summary", "checkpoint_callback", "flush_logs_every_n_steps",
    "terminate_on_nan", "auto_select_gpus", "track_grad_norm", "amp_backend", "amp_level",
    "move_metrics_to_cpu", "multiple_trainloader_mode", "stochastic_weight_avg",
    "prepare_data_per_node", "auto_lr_find", "auto_scale_batch_size", "log_gpu_memory",
    "process_position", "truncated_bptt_steps", "weights_save_path", "reload_dataloaders_every_epoch",
    "ipus", "tpu_cores",
}  # fmt: skip
#: Lightning 1.x arguments that are translated.
TRANSLATED_ARGS = {
    "gpus", "resume_from_checkpoint", "distributed_backend", "replace_sampler_ddp", "num_processes",
}  # fmt: skip
LEGACY_ARGS = DROPPED_ARGS | TRANSLATED_ARGS
LEGACY_STRATEGIES = {
    "ddp",
    "ddp_spawn",
    "ddp2",
    "dp",
    "ddp_sharded",
    "horovod",
    "deepspeed",
    "fsdp",
}
INT_ARGS = {
    "max_epochs", "min_epochs", "max_steps", "min_steps", "num_nodes", "accumulate_grad_batches",
    "log_every_n_steps", "check_val_every_n_epoch", "num_sanity_val_steps",
    "reload_dataloaders_every_n_epochs",
}  # fmt: skip
NUMBER_ARGS = {
    "gradient_clip_val", "limit_train_batches", "limit_val_batches", "limit_test_batches",
    "limit_predict_batches", "val_check_interval", "overfit_batches",
}  # fmt: skip
BOOL_ARGS = {
    "enable_checkpointing", "enable_progress_bar", "enable_model_summary", "inference_mode",
    "detect_anomaly", "barebones", "sync_batchnorm", "use_distributed_sampler",
}  # fmt: skip
PRECISIONS = (
    "32-true", "32", "16-mixed", "bf16-mixed", "16-true", "bf16-true", "64-true", "64",
    "transformer-engine", "transformer-engine-float16",
)  # fmt: skip
PRECISION_ALIASES = {"16": "16-mixed", "bf16": "bf16-mixed"}


def trainer_cli_args() -> list[str]:
    """Names accepted as bare ``--name value`` Trainer flags on the command line."""
    return [*TRAINER_ARGS, *sorted(LEGACY_ARGS)]


def _gpus_to_devices(gpus: Any) -> tuple[str, Any]:
    """Legacy ``gpus`` (``0,``, ``"0,1"``, ``2``, ``-1``, ``[0, 1]``) -> (accelerator, devices)."""
    if gpus is None or gpus == 0 or gpus == "" or gpus == "0":
        return "cpu", "auto"
    if isinstance(gpus, str):
        text = gpus.strip()
        if "," in text:
            ids = [int(x) for x in text.split(",") if x.strip()]
            return "gpu", ids
        return "gpu", int(text)
    if isinstance(gpus, list | tuple) or OmegaConf.is_list(gpus):
        return "gpu", [int(x) for x in gpus]
    return "gpu", int(gpus)


def _fail(key: str, sources: ConfigSources, msg: str) -> ConfigError:
    return ConfigError(f"lightning.trainer.{key}{sources.where('lightning.trainer.' + key)}: {msg}")


def translate_trainer_config(
    trainer_cfg: Any, sources: ConfigSources | None = None
) -> tuple[dict[str, Any], str | None]:
    """Validate and modernise ``lightning.trainer``; returns (Trainer kwargs, legacy resume path)."""
    sources = sources or ConfigSources()
    cfg = (
        OmegaConf.to_container(trainer_cfg, resolve=True)
        if OmegaConf.is_config(trainer_cfg)
        else dict(trainer_cfg or {})
    )
    out: dict[str, Any] = {}
    resume: str | None = None
    for key, value in cfg.items():
        if key in DROPPED_ARGS:
            logger.warning("lightning.trainer.%s was removed in Lightning 2; ignored.", key)
        elif key == "gpus":
            accelerator, devices = _gpus_to_devices(value)
            if accelerator == "gpu" and not torch.cuda.is_available():
                logger.warning(
                    "gpus=%r asked for a GPU but none is available: training on CPU.", value
                )
                accelerator, devices = "cpu", "auto"
            logger.info("legacy gpus=%r -> accelerator=%s, devices=%s", value, accelerator, devices)
            out.setdefault("accelerator", accelerator)
            out.setdefault("devices", devices)
        elif key == "num_processes":
            logger.info("legacy num_processes=%r -> accelerator=cpu, devices=%r", value, value)
            out.setdefault("accelerator", "cpu")
            out.setdefault("devices", value)
        elif key == "resume_from_checkpoint":
            logger.info("legacy resume_from_checkpoint -> trainer.fit(ckpt_path=%s)", value)
            resume = value
        elif key == "distributed_backend":
            out["strategy"] = value
            logger.info("legacy distributed_backend=%r -> strategy=%r", value, value)
        elif key == "replace_sampler_ddp":
            out["use_distributed_sampler"] = value
            logger.info("legacy replace_sampler_ddp -> use_distributed_sampler=%r", value)
        elif key not in TRAINER_ARGS:
            raise _fail(
                key,
                sources,
                f"Trainer has no argument '{key}'{did_you_mean(key, TRAINER_ARGS)}. "
                f"Accepted: {', '.join(TRAINER_ARGS)}.",
            )
        else:
            out[key] = value
    if out.get("accelerator") in LEGACY_STRATEGIES:  # Lightning 1.x: accelerator: ddp
        strategy = out.pop("accelerator")
        strategy = "ddp" if strategy in ("dp", "ddp2", "ddp_sharded", "horovod") else strategy
        logger.info("legacy accelerator=%s -> strategy=%s", strategy, strategy)
        out.setdefault("strategy", strategy)
    _check_types(out, sources)
    return out, resume


def _check_types(out: dict[str, Any], sources: ConfigSources) -> None:
    for key, value in out.items():
        if value is None:
            continue
        if key in INT_ARGS and (isinstance(value, bool) or not isinstance(value, int)):
            raise _fail(key, sources, f"expected an integer, found {value!r}. Fix: {key}: 10")
        if key in NUMBER_ARGS and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise _fail(key, sources, f"expected a number, found {value!r}. Fix: {key}: 1.0")
        if key in BOOL_ARGS and not isinstance(value, bool):
            raise _fail(key, sources, f"expected true or false, found {value!r}.")
    from ldm.config_ranges import check_trainer_ranges

    check_trainer_ranges(out, sources)
    if "precision" in out:
        p = str(out["precision"])
        if p in PRECISION_ALIASES:
            logger.info("precision=%s -> %s", p, PRECISION_ALIASES[p])
            out["precision"] = PRECISION_ALIASES[p]
        elif p not in PRECISIONS:
            raise _fail(
                "precision",
                sources,
                f"unknown precision {p!r}; use one of {', '.join(PRECISIONS)}.",
            )
    strategy = out.get("strategy")
    if isinstance(strategy, str) and strategy.startswith("deepspeed"):
        if importlib.util.find_spec("deepspeed") is None:
            raise _fail(
                "strategy",
                sources,
                f"'{strategy}' needs the deepspeed package: pip install deepspeed.",
            )


def build_loggers(
    lightning_cfg: DictConfig,
    logdir: Path,
    nowname: str,
    version: str,
    debug: bool,
    project: str | None,
) -> list[Any]:
    """CSV always, TensorBoard when installed, plus ``lightning.logger`` (one or a name->config map)."""
    from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

    loggers: list[Any] = [CSVLogger(save_dir=str(logdir), name="", version=version)]
    if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
        loggers.append(
            TensorBoardLogger(save_dir=str(logdir), name="", version=f"tensorboard{version[3:]}")
        )
    cfg = lightning_cfg.get("logger")
    if not cfg:
        return loggers
    entries = {"logger": cfg} if "target" in cfg else dict(cfg)
    for name, entry in entries.items():
        if not entry:
            continue
        entry = OmegaConf.create(OmegaConf.to_container(entry, resolve=True))
        target = str(entry.target)
        params = entry.get("params") or OmegaConf.create()
        if "Wandb" in target:  # CompVis defaults: run name, id, offline in debug mode
            defaults = {"name": nowname, "save_dir": str(logdir), "id": nowname, "offline": debug}
            if project:
                defaults["project"] = project
        elif "CSV" in target or "TensorBoard" in target:
            continue  # already attached
        else:
            defaults = {"save_dir": str(logdir)}
        entry.params = OmegaConf.merge(defaults, params)
        logger.info("logger %s: %s", name, target)
        loggers.append(instantiate_from_config(entry))
    return loggers


def instantiate_callbacks(callbacks_cfg: DictConfig) -> list[pl.Callback]:
    """``lightning.callbacks``: name -> {target, params}; a null entry disables a default."""
    from lightning_fabric.utilities.exceptions import MisconfigurationException

    out = []
    for name in callbacks_cfg:
        entry = callbacks_cfg[name]
        if entry is None or name == "setup_callback":
            continue
        try:
            out.append(instantiate_from_config(entry))
        except MisconfigurationException as err:  # Lightning's callbacks check their arguments
            key = f"lightning.callbacks.{name}"
            if name == "checkpoint_callback":
                key = "lightning.modelcheckpoint (or lightning.callbacks.checkpoint_callback)"
            raise ConfigError(
                f"{key}: {entry.get('target')} rejected its parameters: {err} "
                "Fix the values under its params."
            ) from err
    return out


def default_callback_configs(ckptdir: Path, monitor: str | None) -> dict[str, Any]:
    """CompVis defaults: image logger, LR monitor, CUDA callback, model checkpoint."""
    ckpt_params: dict[str, Any] = {
        "dirpath": str(ckptdir),
        "filename": "{epoch:06}-{step:09}",
        "verbose": True,
        "save_last": True,
        # a resumed (or moved) run overwrites last.ckpt instead of writing last-v1.ckpt
        "enable_version_counter": False,
    }
    if monitor:
        ckpt_params.update(monitor=monitor, save_top_k=3)
    return {
        "image_logger": {
            "target": "ldm.callbacks.ImageLogger",
            "params": {"batch_frequency": 750, "max_images": 4, "clamp": True},
        },
        "learning_rate_logger": {
            "target": "pytorch_lightning.callbacks.LearningRateMonitor",
            "params": {"logging_interval": "step"},
        },
        "cuda_callback": {"target": "ldm.callbacks.CUDACallback"},
        "checkpoint_callback": {
            "target": "pytorch_lightning.callbacks.ModelCheckpoint",
            "params": ckpt_params,
        },
    }


def trainstep_checkpoint_config(ckptdir: Path) -> dict[str, Any]:
    """CompVis ``metrics_over_trainsteps_checkpoint``: keep every N-step weights."""
    return {
        "target": "pytorch_lightning.callbacks.ModelCheckpoint",
        "params": {
            "dirpath": str(ckptdir / "trainstep_checkpoints"),
            "filename": "{epoch:06}-{step:09}",
            "verbose": True,
            "save_top_k": -1,
            "every_n_train_steps": 10000,
            "save_weights_only": True,
        },
    }
