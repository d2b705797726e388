"""The sampling defaults a model was evaluated with: recorded in our checkpoints, used by
``generate`` and the sampling commands when the user gives none."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

#: What ``generate`` uses when neither the call nor the model says (the CompVis command's defaults).
FALLBACK = {"sampler": "ddim", "steps": 50, "guidance_scale": 7.5}
KEYS = ("sampler", "steps", "guidance_scale", "options", "precision")


def check_sampling_defaults(
    value: Mapping[str, Any] | None, where: str = "sampling_defaults"
) -> dict[str, Any]:
    """A plain dict with only the known keys, validated (sampler name, positive steps)."""
    if value is None:
        return {}
    out = dict(value)
    unknown = sorted(set(out) - set(KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; expected some of {list(KEYS)}")
    if "steps" in out and (int(out["steps"]) < 1):
        raise ValueError(f"{where}.steps must be >= 1, found {out['steps']}")
    if "options" in out:
        out["options"] = dict(out["options"] or {})
    if "sampler" in out:  # another name of a sampler (an alias) is stored as the registered one
        from ldm.samplers import resolve_sampler

        try:
            out["sampler"], options = resolve_sampler(out["sampler"], out.get("options"))
        except ValueError as err:
            raise ValueError(f"{where}.sampler: {err}") from None
        if options:
            out["options"] = options
    if "precision" in out:
        from ldm.engine.precision import check_precision

        out["precision"] = check_precision(out["precision"], f"{where}.precision")
    return out


def resolve_sampling(
    model: Any,
    sampler: str | None,
    steps: int | None,
    guidance_scale: float | None,
    options: Mapping[str, Any],
) -> tuple[str, int, float, dict[str, Any]]:
    """Call arguments, else the model's recorded defaults, else ``FALLBACK``. The sampler comes
    back as its registered name, with the options its name implies ("DPM++ 2M Karras": dpmpp_2m
    with karras=True; an explicit option contradicting the name raises ValueError)."""
    from ldm.samplers import resolve_sampler

    rec = dict(getattr(model, "sampling_defaults", None) or {})
    implied: dict[str, Any] = {}
    if sampler is not None:
        given = sampler
        sampler, implied = resolve_sampler(given)
        resolve_sampler(given, options)  # the call's options against the name
    name = sampler or rec.get("sampler") or FALLBACK["sampler"]
    opts: dict[str, Any] = {}
    if sampler is None or sampler == rec.get("sampler"):
        opts.update(rec.get("options") or {})  # recorded options belong to the recorded sampler
    opts.update(implied)
    opts.update(options)
    return (
        name,
        int(steps if steps is not None else rec.get("steps", FALLBACK["steps"])),
        float(
            guidance_scale
            if guidance_scale is not None
            else rec.get("guidance_scale", FALLBACK["guidance_scale"])
        ),
        opts,
    )


def defaults_from_config(config: Mapping[str, Any] | None) -> dict[str, Any]:
    """Sampling defaults of a run made before they were recorded: ``model.params.sampling_defaults``,
    else the settings of its ``ShapesEvaluation`` callback (what the run was judged with)."""
    if not config:
        return {}
    params = (config.get("model") or {}).get("params") or {}
    if params.get("sampling_defaults"):
        return check_sampling_defaults(params["sampling_defaults"])
    callbacks = ((config.get("lightning") or {}).get("callbacks")) or {}
    for cb in callbacks.values():
        if isinstance(cb, Mapping) and str(cb.get("target", "")).endswith("ShapesEvaluation"):
            p = cb.get("params") or {}
            out = {
                "sampler": p.get("sampler", "dpmpp_2m"),
                "steps": int(p.get("steps", 20)),
                "guidance_scale": float(p.get("guidance_scale", 4.0)),
            }
            if p.get("sampler_options"):
                out["options"] = dict(p["sampler_options"])
            return out
    return {}


def defaults_from_run_dir(ckpt_path: str | Path) -> dict[str, Any]:
    """Sampling defaults of ``<run>/checkpoints/<file>``: the settings ``final_scores.json`` records
    the run was judged with, else the ShapesEvaluation in ``<run>/configs/*-lightning.yaml``."""
    path = Path(ckpt_path)
    if path.parent.name != "checkpoints":
        return {}
    run = path.parent.parent
    scores = run / "final_scores.json"
    if scores.is_file():
        try:
            sampling = json.loads(scores.read_text()).get("sampling") or {}
        except (OSError, ValueError):
            sampling = {}
        out = {
            k: sampling[k]
            for k in ("sampler", "steps", "guidance_scale", "precision")
            if k in sampling
        }
        extra = {k: v for k, v in sampling.items() if k not in (*out, "seed", "use_ema")}
        if extra:
            out["options"] = extra
        if out:
            return check_sampling_defaults(out, f"{scores}: sampling")
    for cfg_path in sorted((run / "configs").glob("*-lightning.yaml"), reverse=True):
        from omegaconf import OmegaConf

        cfg = OmegaConf.to_container(OmegaConf.load(cfg_path), resolve=True)
        found = defaults_from_config({"lightning": cfg.get("lightning", cfg)})
        if found:
            return found
    return {}
