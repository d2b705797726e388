"""Sweeps from the command line: ``python main.py --base A.yaml -t --sweep SWEEP.yaml``.

SWEEP.yaml::

    method: grid            # grid: every combination; random: `trials` samples
    trials: 8               # random only (grid: optional cap)
    seed: 0                 # random sampling seed
    metric: val/loss        # ranking metric (default: the model's monitor, else train/loss)
    mode: min               # min or max
    parameters:             # config keys (override syntax) -> values
      model.base_learning_rate: [1.0e-4, 1.0e-3]              # list: grid values / random choice
      model.params.hidden: {values: [8, 16]}
      model.params.dropout: {distribution: uniform, min: 0.0, max: 0.3}        # random only
      model.base_learning_rate: {distribution: log_uniform, min: 1.0e-5, max: 1.0e-3}

Every trial is a normal run directory under ``<logdir>/<timestamp>_<name>_sweep/``, which also gets
``summary.csv`` and ``summary.md`` ranking the trials by the metric. ``--sweep-backend ray`` runs
the trials through Ray Tune when ray is installed, else here one after another (with a log line);
``--sweep-backend local`` (the default) always runs them here.

From Python: ``run_sweep(RunSpec(base=[...], train=True), "sweep.yaml")``. Each trial is the given
:class:`~ldm.run_spec.RunSpec` with its own name and overrides (:func:`trial_spec`), run by
:func:`ldm.launch.run`.
"""

from __future__ import annotations

import csv
import importlib.util
import itertools
import logging
import math
import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from ldm.config import load_yaml
from ldm.launch import config_overrides, run, timestamp
from ldm.run_spec import RunSpec
from ldm.util import ConfigError, did_you_mean

logger = logging.getLogger(__name__)

SWEEP_KEYS = ("method", "trials", "seed", "metric", "mode", "parameters")
DISTRIBUTIONS = ("uniform", "log_uniform", "int_uniform")


@dataclass
class SweepSpec:
    """A parsed sweep file."""

    parameters: dict[str, Any]
    method: str = "grid"
    trials: int | None = None
    seed: int = 0
    metric: str | None = None
    mode: str = "min"
    source: str = "<sweep>"
    names: list[str] = field(default_factory=list)


def load_sweep(path: str | Path) -> SweepSpec:
    """Read and validate a sweep YAML (errors name the file and key)."""
    cfg = load_yaml(path)
    src = str(path)
    for key in cfg:
        if key not in SWEEP_KEYS:
            raise ConfigError(
                f"{src}: unknown key '{key}'{did_you_mean(str(key), SWEEP_KEYS)}. Keys: {', '.join(SWEEP_KEYS)}."
            )
    params = cfg.get("parameters")
    if not isinstance(params, DictConfig) or not params:
        raise ConfigError(
            f"{src}: 'parameters' must map config keys to values, e.g. model.base_learning_rate: [1.0e-4, 1.0e-3]."
        )
    method = str(cfg.get("method", "grid"))
    if method not in ("grid", "random"):
        raise ConfigError(f"{src}: method: expected 'grid' or 'random', found {method!r}.")
    mode = str(cfg.get("mode", "min"))
    if mode not in ("min", "max"):
        raise ConfigError(f"{src}: mode: expected 'min' or 'max', found {mode!r}.")
    parsed: dict[str, Any] = {}
    for key, value in params.items():
        parsed[str(key)] = _parse_param(src, str(key), value, method)
    trials = cfg.get("trials")
    if method == "random" and not isinstance(trials, int):
        raise ConfigError(
            f"{src}: trials: random sampling needs an integer number of trials, found {trials!r}."
        )
    return SweepSpec(parsed, method, trials, int(cfg.get("seed", 0)), cfg.get("metric"), mode, src)


def _parse_param(src: str, key: str, value: Any, method: str) -> Any:
    where = f"{src}: parameters.{key}"
    if isinstance(value, ListConfig):
        if len(value) == 0:
            raise ConfigError(f"{where}: empty list of values.")
        return {"values": OmegaConf.to_container(value)}
    if isinstance(value, DictConfig):
        entry = OmegaConf.to_container(value)
        if "values" in entry:
            return entry
        dist = entry.get("distribution")
        if dist not in DISTRIBUTIONS:
            raise ConfigError(
                f"{where}: expected a list, {{values: [...]}} or {{distribution: {'|'.join(DISTRIBUTIONS)}, min, max}}, found {entry}."
            )
        if method == "grid":
            raise ConfigError(
                f"{where}: a distribution needs method: random (grid sweeps take value lists)."
            )
        if (
            not all(isinstance(entry.get(k), int | float) for k in ("min", "max"))
            or entry["min"] > entry["max"]
        ):
            raise ConfigError(
                f"{where}: needs numbers min <= max, found min={entry.get('min')!r}, max={entry.get('max')!r}."
            )
        if dist == "log_uniform" and entry["min"] <= 0:
            raise ConfigError(f"{where}: log_uniform needs min > 0, found {entry['min']}.")
        return entry
    return {"values": [value]}


def sample_trials(sweep: SweepSpec) -> list[dict[str, Any]]:
    """Grid: the Cartesian product (in file order); random: ``trials`` seeded samples."""
    keys = list(sweep.parameters)
    if sweep.method == "grid":
        combos = itertools.product(*(sweep.parameters[k]["values"] for k in keys))
        trials = [dict(zip(keys, combo)) for combo in combos]
        return trials[: sweep.trials] if sweep.trials else trials
    rng = random.Random(sweep.seed)
    out = []
    for _ in range(sweep.trials or 1):
        trial = {}
        for k in keys:
            p = sweep.parameters[k]
            if "values" in p:
                trial[k] = rng.choice(p["values"])
            elif p["distribution"] == "uniform":
                trial[k] = rng.uniform(p["min"], p["max"])
            elif p["distribution"] == "log_uniform":
                trial[k] = math.exp(rng.uniform(math.log(p["min"]), math.log(p["max"])))
            else:
                trial[k] = rng.randint(int(p["min"]), int(p["max"]))
        out.append(trial)
    return out


def _override(key: str, value: Any) -> str:
    text = OmegaConf.to_yaml(OmegaConf.create({"v": value})).strip()[len("v: ") :]
    return f"{key}={text}"


def trial_spec(spec: RunSpec, trial: dict[str, Any], index: int, sweep_dir: Path) -> RunSpec:
    """The run of one trial: ``spec`` with the trial's values as overrides after the command
    line's, named ``trial<NN>`` in the sweep's folder."""
    return replace(
        spec,
        overrides=[*spec.overrides, *(_override(k, v) for k, v in trial.items())],
        logdir=str(sweep_dir),
        name=f"trial{index:02d}",
        project=None,
        postfix="",
        now=None,
    )


def _run_trial(
    spec: RunSpec, trial: dict[str, Any], index: int, sweep_dir: Path, metric: str
) -> dict[str, Any]:
    row: dict[str, Any] = {"trial": index, **trial}
    try:
        result = run(trial_spec(spec, trial, index, sweep_dir))
    except Exception as err:  # noqa: BLE001 - one failing trial must not stop the sweep
        logger.exception("trial %d failed", index)
        row.update(
            status=f"failed: {type(err).__name__}: {err}"[:200], value=None, steps=None, run_dir=""
        )
        return row
    value = result.metrics.get(metric)
    if value is None:
        logger.warning(
            "trial %d did not log %r (logged: %s)", index, metric, ", ".join(result.metrics)
        )
    row.update(status="ok", value=value, steps=result.global_step, run_dir=str(result.run_dir))
    return row


def _metric_name(sweep: SweepSpec, spec: RunSpec) -> str:
    if sweep.metric:
        return str(sweep.metric)
    from ldm.config import merge_configs

    config, _ = merge_configs(spec.base, config_overrides(spec))
    return str(OmegaConf.select(config, "model.params.monitor", default=None) or "train/loss")


def rank_rows(rows: list[dict[str, Any]], mode: str) -> list[dict[str, Any]]:
    """Sort trials best first; failed or metric-less trials last."""
    sign = 1.0 if mode == "min" else -1.0

    def key(r: dict[str, Any]) -> tuple[int, float]:
        v = r.get("value")
        return (
            (1, 0.0)
            if v is None or (isinstance(v, float) and math.isnan(v))
            else (0, sign * float(v))
        )

    ranked = sorted(rows, key=key)
    for i, r in enumerate(ranked, 1):
        r["rank"] = i
    return ranked


def write_summary(
    rows: list[dict[str, Any]], params: list[str], metric: str, folder: Path
) -> tuple[Path, Path]:
    """``summary.csv`` and ``summary.md``: one row per trial, best first."""
    columns = ["rank", "trial", *params, metric, "steps", "status", "run_dir"]
    csv_path, md_path = folder / "summary.csv", folder / "summary.md"
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for r in rows:
            w.writerow([r.get(c) if c != metric else r.get("value") for c in columns])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = []
        for c in columns:
            v = r.get("value") if c == metric else r.get(c)
            cells.append(f"{v:.6g}" if isinstance(v, float) else ("" if v is None else str(v)))
        lines.append("| " + " | ".join(cells) + " |")
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def run_sweep(
    spec: RunSpec, sweep_file: str | Path, backend: str = "local"
) -> list[dict[str, Any]]:
    """Run every trial of ``sweep_file`` around ``spec`` and write the ranked summary.

    ``backend``: ``local`` (one trial after another here) or ``ray`` (Ray Tune when installed).
    Returns the rows of the summary, best first.
    """
    if spec.resume:
        raise ConfigError("--sweep starts new runs; it cannot be combined with -r/--resume.")
    if backend not in ("local", "ray"):
        raise ConfigError(f"--sweep-backend: expected 'local' or 'ray', found {backend!r}.")
    sweep = load_sweep(sweep_file)
    trials = sample_trials(sweep)
    metric = _metric_name(sweep, spec)
    now = timestamp()
    name = spec.name or Path(sweep_file).stem
    parent = Path(spec.logdir) / spec.project if spec.project else Path(spec.logdir)
    sweep_dir = (parent / f"{now}_{name}_sweep").resolve()
    sweep_dir.mkdir(parents=True, exist_ok=True)
    logger.info(
        "sweep %s: %d %s trials ranked by %s (%s) in %s",
        sweep.source,
        len(trials),
        sweep.method,
        metric,
        sweep.mode,
        sweep_dir,
    )
    if backend == "ray":
        if importlib.util.find_spec("ray") is None:
            logger.info(
                "--sweep-backend ray: ray is not installed (pip install 'ray[tune]'); running the %d trials one after another here.",
                len(trials),
            )
        else:
            rows = _run_ray(spec, trials, sweep_dir, metric)
            return _finish(rows, sweep, metric, sweep_dir)
    rows = [_run_trial(spec, t, i, sweep_dir, metric) for i, t in enumerate(trials)]
    return _finish(rows, sweep, metric, sweep_dir)


def _finish(
    rows: list[dict[str, Any]], spec: SweepSpec, metric: str, sweep_dir: Path
) -> list[dict[str, Any]]:
    ranked = rank_rows(rows, spec.mode)
    csv_path, md_path = write_summary(ranked, list(spec.parameters), metric, sweep_dir)
    logger.info("sweep summary: %s and %s\n%s", csv_path, md_path, md_path.read_text())
    return ranked


def _run_ray(
    spec: RunSpec,
    trials: list[dict[str, Any]],
    sweep_dir: Path,
    metric: str,
) -> list[dict[str, Any]]:  # pragma: no cover - needs ray
    """Each trial as a Ray Tune trial (multi-machine when a Ray cluster is connected)."""
    from ray import tune

    def trainable(cfg: dict[str, Any]) -> dict[str, Any]:
        i = cfg["index"]
        row = _run_trial(spec, trials[i], i, sweep_dir, metric)
        return {"row": row}

    tuner = tune.Tuner(trainable, param_space={"index": tune.grid_search(list(range(len(trials))))})
    results = tuner.fit()
    return [r.metrics["row"] for r in results]
