"""Sweeps on Ray Tune: each trial a Ray Tune trial with its resources, reporting the metric at
every validation, with ASHA early stopping and Optuna search, on a local Ray instance or a
cluster (``--ray-address``).

Sweep-file keys read here (``ldm.sweep`` validates them)::

    cpus_per_trial: 1          # Ray resources of one trial
    gpus_per_trial: 0
    max_concurrent: null       # trials at once (default: as many as the resources allow)
    scheduler: {type: asha, max_t: 100, grace_period: 1, reduction_factor: 2}   # or: asha
      # time unit: reports (one per validation); max_t must exceed a full trial's validations
    search: optuna             # or {type: optuna, seed: 0}: Optuna proposes `trials` trials

Without ``search`` the trials are the ones the sweep file defines (grid or seeded random), so a
Ray sweep runs the same trials as the local backend. Every trial is a normal run directory in
the sweep's folder; a trial that crashes is recorded as failed and the others go on; a trial
that ASHA stops is recorded as stopped with its last reported value.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

import pytorch_lightning as pl

from ldm.util import ConfigError

logger = logging.getLogger(__name__)

SCHEDULER_KEYS = ("type", "max_t", "grace_period", "reduction_factor", "time_attr")
SEARCH_KEYS = ("type", "seed")


def require_ray() -> None:
    """A clear message when ray[tune] (or optuna) is missing."""
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        raise ConfigError(
            "--sweep-backend ray needs Ray Tune: pip install -e '.[sweep]' (ray[tune] and optuna)."
        )


class TuneReport(pl.Callback):
    """Reports the sweep's metric (and the step) to Ray Tune after every validation."""

    def __init__(self, metric: str) -> None:
        self.metric = metric

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.global_rank != 0:
            return
        value = trainer.callback_metrics.get(self.metric)
        if value is None:
            return
        from ray import tune

        tune.report(
            {
                self.metric: float(value),
                "step": int(trainer.global_step),
                "run_dir": str(trainer.default_root_dir),
            }
        )


def _user_paths() -> list[str]:
    """The driver's import paths outside the Python installation (the project, test fixtures,
    the working directory of CompVis-style targets), for the Ray workers."""
    roots = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    out = []
    for p in sys.path:
        real = os.path.realpath(p or os.getcwd())
        if os.path.isdir(real) and not any(real.startswith(r + os.sep) or real == r for r in roots):
            out.append(real)
    return out


def init_ray(address: str | None = None) -> bool:
    """Connect to ``address`` (a cluster) or start Ray here, with the environment the trials
    need (import paths, no per-trial working directory); False when Ray was already running."""
    require_ray()
    import ray

    os.environ["RAY_CHDIR_TO_TRIAL_DIR"] = "0"
    if ray.is_initialized():
        return False
    env = {
        "RAY_CHDIR_TO_TRIAL_DIR": "0",
        "PYTHONPATH": os.pathsep.join(dict.fromkeys([os.getcwd(), *_user_paths()])),
        **{k: v for k, v in os.environ.items() if k.startswith(("HF_", "LDM_", "PL_"))},
    }
    ray.init(
        address=address,
        runtime_env={"env_vars": env},
        include_dashboard=False,
        log_to_driver=True,
        configure_logging=False,
    )
    return True


def claim_index(folder: Path, start: int = 0) -> int:
    """The next free trial number in a sweep folder, claimed atomically (a marker file made with
    O_EXCL), so trials proposed by a search algorithm on any node get distinct run names."""
    n = start
    while True:
        try:
            os.close(os.open(folder / f".trial-{n:04d}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return n
        except FileExistsError:
            n += 1


def scheduler_from(cfg: Any, metric: str, mode: str) -> Any:
    """ASHA from the sweep file's ``scheduler`` (None: FIFO)."""
    if cfg is None:
        return None
    cfg = {"type": cfg} if isinstance(cfg, str) else dict(cfg)
    kind = cfg.pop("type", "asha")
    if kind != "asha":
        raise ConfigError(f"scheduler.type: expected 'asha', found {kind!r}.")
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(
        metric=metric,
        mode=mode,
        time_attr=cfg.pop("time_attr", "training_iteration"),
        max_t=int(cfg.pop("max_t", 100)),
        grace_period=int(cfg.pop("grace_period", 1)),
        reduction_factor=float(cfg.pop("reduction_factor", 2)),
    )


def search_space(parameters: dict[str, Any]) -> dict[str, Any]:
    """The sweep's parameters as Ray Tune distributions (for a search algorithm)."""
    from ray import tune

    space: dict[str, Any] = {}
    for key, p in parameters.items():
        if "values" in p:
            space[key] = tune.choice(list(p["values"]))
        elif p["distribution"] == "uniform":
            space[key] = tune.uniform(p["min"], p["max"])
        elif p["distribution"] == "log_uniform":
            space[key] = tune.loguniform(p["min"], p["max"])
        else:
            space[key] = tune.randint(int(p["min"]), int(p["max"]) + 1)
    return space


def search_from(cfg: Any, metric: str, mode: str) -> Any:
    """Optuna search (``search: optuna``), or None."""
    if cfg is None:
        return None
    cfg = {"type": cfg} if isinstance(cfg, str) else dict(cfg)
    if cfg.get("type") != "optuna":
        raise ConfigError(f"search.type: expected 'optuna', found {cfg.get('type')!r}.")
    try:
        import optuna  # noqa: F401
        from ray.tune.search.optuna import OptunaSearch
    except ImportError:
        raise ConfigError(
            "search: optuna needs optuna: pip install -e '.[sweep]' (ray[tune] and optuna)."
        ) from None
    import optuna

    sampler = optuna.samplers.TPESampler(seed=int(cfg.get("seed", 0)))
    return OptunaSearch(metric=metric, mode=mode, sampler=sampler)


def run_ray(
    spec: Any,
    sweep: Any,
    trials: list[dict[str, Any]],
    todo: list[int],
    sweep_dir: Path,
    metric: str,
    address: str | None = None,
    record: Any = None,
    run_one: Any = None,
) -> list[dict[str, Any]]:
    """Run the trials ``todo`` (indices into ``trials``; with Optuna search, ``len(todo)`` new
    trials) on Ray Tune; returns one summary row per trial. ``record(row)`` is called on the
    driver as each trial ends (the sweep's progress file). ``run_one(spec, values, index,
    sweep_dir, metric) -> row`` runs one trial in a Ray worker (``ldm.sweep.run_trial_reporting``)."""
    require_ray()
    import ray
    from ray import tune

    cwd = os.getcwd()
    started = init_ray(address)
    optuna_search = search_from(sweep.search, metric, sweep.mode)

    def trainable(config: dict[str, Any]) -> None:
        os.chdir(cwd)  # configs name files relative to where the sweep was started
        if "index" in config:
            index, values = int(config["index"]), trials[int(config["index"])]
        else:
            index = claim_index(sweep_dir, start=len(trials))
            values = {k: config[k] for k in sweep.parameters}
        row = run_one(spec, values, index, sweep_dir, metric)
        row["node"] = ray.get_runtime_context().get_node_id()[:12]
        tune.report(
            {
                "row": row,
                "completed": True,
                **({metric: row["value"]} if row.get("value") is not None else {}),
            }
        )

    resources = {"cpu": float(sweep.cpus_per_trial), "gpu": float(sweep.gpus_per_trial)}
    if optuna_search is not None:
        param_space = search_space(sweep.parameters)
        num_samples = len(todo)
    else:
        param_space = {"index": tune.grid_search(todo)}
        num_samples = 1
    tuner = tune.Tuner(
        tune.with_resources(trainable, resources),
        param_space=param_space,
        tune_config=tune.TuneConfig(
            scheduler=scheduler_from(sweep.scheduler, metric, sweep.mode),
            search_alg=optuna_search,
            num_samples=num_samples,
            max_concurrent_trials=sweep.max_concurrent,
        ),
        run_config=tune.RunConfig(
            name="ray", storage_path=str(sweep_dir), verbose=0, log_to_file=True
        ),
    )
    try:
        results = tuner.fit()
        rows = []
        for result in results:
            rows.append(row_of(result, trials, sweep, metric))
            if record is not None:
                record(rows[-1])
    finally:
        if started:
            ray.shutdown()
    return rows


def row_of(result: Any, trials: list[dict[str, Any]], sweep: Any, metric: str) -> dict[str, Any]:
    """A summary row from a Ray Tune result: completed, stopped early, or failed."""
    config = result.config or {}
    metrics = result.metrics or {}
    if "row" in metrics:
        return dict(metrics["row"])
    if "index" in config:
        index = int(config["index"])
        row: dict[str, Any] = {"trial": index, **trials[index]}
    else:
        row = {"trial": None, **{k: config.get(k) for k in sweep.parameters}}
    value = metrics.get(metric)
    if result.error is not None:
        status = f"failed: {type(result.error).__name__}: {result.error}"[:200]
    else:
        status = f"stopped early at step {metrics.get('step')}"
    if isinstance(value, float) and math.isnan(value):
        value = None
    row.update(
        status=status, value=value, steps=metrics.get("step"), run_dir=metrics.get("run_dir", "")
    )
    return row
