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
import itertools
import json
import logging
import math
import random
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from ldm.config import load_yaml
from ldm.launch import config_overrides, run, timestamp
from ldm.run_spec import RunSpec
from ldm.sweep_ray import SCHEDULER_KEYS, SEARCH_KEYS
from ldm.util import ConfigError, did_you_mean

logger = logging.getLogger(__name__)

SWEEP_KEYS = (
    "method",
    "trials",
    "seed",
    "metric",
    "mode",
    "parameters",
    "cpus_per_trial",
    "gpus_per_trial",
    "max_concurrent",
    "scheduler",
    "search",
)
PROGRESS_FILE = "trials.jsonl"  # one line per finished trial: what --sweep-resume skips
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
    cpus_per_trial: float = 1.0  # Ray backend: resources of one trial
    gpus_per_trial: float = 0.0
    max_concurrent: int | None = None
    scheduler: Any = None  # Ray backend: asha (ldm.sweep_ray)
    search: Any = None  # Ray backend: optuna


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
    out = SweepSpec(parsed, method, trials, int(cfg.get("seed", 0)), cfg.get("metric"), mode, src)
    for key in ("cpus_per_trial", "gpus_per_trial"):
        value = cfg.get(key, getattr(out, key))
        if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"{src}: {key}: expected a number >= 0, found {value!r}.")
        setattr(out, key, float(value))
    concurrent = cfg.get("max_concurrent")
    if concurrent is not None and (not isinstance(concurrent, int) or concurrent < 1):
        raise ConfigError(f"{src}: max_concurrent: expected an integer >= 1, found {concurrent!r}.")
    out.max_concurrent = concurrent
    out.scheduler = _plain_choice(src, "scheduler", cfg.get("scheduler"), ("asha",), SCHEDULER_KEYS)
    out.search = _plain_choice(src, "search", cfg.get("search"), ("optuna",), SEARCH_KEYS)
    if out.search is not None and (out.trials is None or out.trials < 1):
        raise ConfigError(f"{src}: search: optuna proposes `trials` trials; set trials: N.")
    return out


def _plain_choice(
    src: str, key: str, value: Any, types: tuple[str, ...], keys: tuple[str, ...]
) -> Any:
    """``scheduler`` / ``search``: a type name or a mapping with ``type`` and options."""
    if value is None:
        return None
    if isinstance(value, DictConfig):
        value = OmegaConf.to_container(value)
    kind = (
        value if isinstance(value, str) else value.get("type") if isinstance(value, dict) else None
    )
    if kind not in types:
        raise ConfigError(
            f"{src}: {key}: expected one of {list(types)} (or {{type: ..., ...}}), found {value!r}."
        )
    if isinstance(value, dict):
        unknown = sorted(set(value) - set(keys))
        if unknown:
            raise ConfigError(f"{src}: {key}: unknown keys {unknown}; known: {list(keys)}.")
    return value


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


def run_trial_reporting(
    spec: RunSpec, trial: dict[str, Any], index: int, sweep_dir: Path, metric: str
) -> dict[str, Any]:
    """A trial inside Ray Tune: the run reports ``metric`` after every validation."""
    report = [
        "lightning.callbacks.tune_report.target=ldm.sweep_ray.TuneReport",
        f"lightning.callbacks.tune_report.params.metric={metric}",
    ]
    return _run_trial(
        replace(spec, overrides=[*spec.overrides, *report]), trial, index, sweep_dir, metric
    )


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
    spec: RunSpec,
    sweep_file: str | Path,
    backend: str = "local",
    address: str | None = None,
    resume: str | Path | None = None,
) -> list[dict[str, Any]]:
    """Run every trial of ``sweep_file`` around ``spec`` and write the ranked summary.

    ``backend``: ``local`` (one trial after another here) or ``ray`` (Ray Tune; ``address``: an
    existing Ray cluster). ``resume``: the folder of an interrupted sweep: the trials it finished
    (``trials.jsonl``) are kept and only the others run. Returns the rows of the summary, best
    first.
    """
    if spec.resume:
        raise ConfigError("--sweep starts new runs; it cannot be combined with -r/--resume.")
    if backend not in ("local", "ray"):
        raise ConfigError(f"--sweep-backend: expected 'local' or 'ray', found {backend!r}.")
    sweep = load_sweep(sweep_file)
    if backend == "local" and (sweep.scheduler or sweep.search):
        raise ConfigError(
            f"{sweep.source}: scheduler / search need --sweep-backend ray (Ray Tune runs them)."
        )
    trials = sample_trials(sweep)
    metric = _metric_name(sweep, spec)
    spec = replace(spec, base=[str(Path(b).resolve()) for b in spec.base])
    sweep_dir, done = _sweep_folder(spec, sweep_file, resume)
    todo = [i for i in range(len(trials)) if i not in {r["trial"] for r in done}]
    logger.info(
        "sweep %s: %d %s trials ranked by %s (%s) in %s%s",
        sweep.source,
        len(trials),
        sweep.method,
        metric,
        sweep.mode,
        sweep_dir,
        f" ({len(done)} already done, {len(todo)} to run)" if resume else "",
    )
    record = partial(_record, sweep_dir / PROGRESS_FILE)
    rows = list(done)
    if backend == "ray":
        from ldm.sweep_ray import run_ray

        if sweep.search is not None:  # Optuna proposes the trials: only how many is known
            todo, trials = list(range(len(done), int(sweep.trials))), []
        rows += run_ray(
            spec, sweep, trials, todo, sweep_dir, metric, address, record, run_trial_reporting
        )
    else:
        for i in todo:
            rows.append(_run_trial(spec, trials[i], i, sweep_dir, metric))
            record(rows[-1])
    return _finish(rows, sweep, metric, sweep_dir)


def _sweep_folder(
    spec: RunSpec, sweep_file: str | Path, resume: str | Path | None
) -> tuple[Path, list[dict[str, Any]]]:
    """A new, never shared folder for the sweep; or the interrupted one and its finished trials."""
    if resume is not None:
        folder = Path(resume).resolve()
        if not folder.is_dir():
            raise ConfigError(f"--sweep-resume {resume}: no such sweep folder.")
        progress = folder / PROGRESS_FILE
        done = []
        if progress.is_file():
            for n, line in enumerate(progress.read_text().splitlines(), 1):
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    logger.warning(
                        "%s:%d: unreadable line skipped (that trial runs again)", progress, n
                    )
                    continue
                if str(row.get("status", "")).startswith(("ok", "stopped")):
                    done.append(row)
        return folder, done
    name = spec.name or Path(sweep_file).stem
    parent = Path(spec.logdir) / spec.project if spec.project else Path(spec.logdir)
    parent.mkdir(parents=True, exist_ok=True)
    now = timestamp()
    for n in range(1000):  # two sweeps started in the same second get their own folders
        folder = (parent / f"{now}_{name}_sweep{'' if n == 0 else f'-{n}'}").resolve()
        try:
            folder.mkdir()
            return folder, []
        except FileExistsError:
            continue
    raise ConfigError(f"could not create a new sweep folder under {parent}")


def _record(path: Path, row: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row, default=str) + "\n")


def _finish(
    rows: list[dict[str, Any]], spec: SweepSpec, metric: str, sweep_dir: Path
) -> list[dict[str, Any]]:
    ranked = rank_rows(rows, spec.mode)
    csv_path, md_path = write_summary(ranked, list(spec.parameters), metric, sweep_dir)
    logger.info("sweep summary: %s and %s\n%s", csv_path, md_path, md_path.read_text())
    return ranked
