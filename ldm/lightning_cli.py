"""The LightningCLI-style front door: ``python -m ldm fit|validate|test --config FILE``.

    python -m ldm fit --config configs/txt2img.yaml --trainer.max_steps 3 --model.ema_decay 0.99
    python -m ldm fit --config configs/txt2img.yaml --print_config      # the resolved config
    python -m ldm test --config cfg.yaml --ckpt_path logs/<run>/checkpoints/last.ckpt

It reads the same CompVis-style YAML as ``main.py`` (files given with ``--config`` merge left to
right) and makes the same run (``ldm.launch.run``: run directory, callbacks, resume). LightningCLI's
names map onto the CompVis keys: ``--trainer.X`` -> ``lightning.trainer.X``; ``--model.X`` ->
``model.params.X`` (``--model.init_args.X`` too; ``--model.class_path`` -> ``model.target``;
``--model.base_learning_rate`` stays); ``--data.X`` likewise; ``--seed_everything N`` -> the seed;
``--ckpt_path`` resumes a fit (``-r``), or names the checkpoint (in its run directory) whose
weights validate / test use.
``--print_config`` prints the merged config in LightningCLI's form (``class_path`` /
``init_args`` for every ``target`` / ``params``) and exits; ``main.py``'s own flags (``-n``,
``-l``, ``--scale_lr``, ...) are accepted as well.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from typing import Any

from omegaconf import OmegaConf

from ldm.config import merge_configs
from ldm.launch import config_overrides
from ldm.launch_cli import parse_flags, str2bool
from ldm.run_spec import RunSpec

SUBCOMMANDS = ("fit", "validate", "test")
SECTION_KEYS = ("target", "params", "base_learning_rate")


def _cli_key(key: str) -> str:
    """A LightningCLI key (model.X, data.X, trainer.X) as the CompVis config key."""
    section, _, rest = key.partition(".")
    if section not in ("model", "data") or not rest:
        return key
    if rest == "class_path":
        return f"{section}.target"
    if rest.startswith("init_args."):
        return f"{section}.params.{rest[len('init_args.') :]}"
    if rest.split(".")[0] in SECTION_KEYS:
        return key
    return f"{section}.params.{rest}"


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ldm",
        description="LightningCLI-style front door over the same configs and runs as main.py.",
        allow_abbrev=False,
    )
    p.add_argument("subcommand", choices=SUBCOMMANDS, help="fit, validate or test")
    p.add_argument("-c", "--config", action="append", default=[], metavar="FILE",
                   help="CompVis-style YAML (repeatable; merged left to right)")  # fmt: skip
    p.add_argument("--print_config", nargs="?", const=True, default=False, type=str2bool,
                   help="print the resolved config (class_path / init_args) and exit")  # fmt: skip
    p.add_argument("--seed_everything", type=int, default=23, help="the run's seed (default 23)")
    p.add_argument("--ckpt_path", type=str, default=None,
                   help="fit: resume this checkpoint; validate / test: load its weights")  # fmt: skip
    p.add_argument("-n", "--name", type=str, default="")
    p.add_argument("-l", "--logdir", type=str, default="logs")
    p.add_argument("-p", "--project", type=str, default=None)
    p.add_argument("--scale_lr", type=str2bool, nargs="?", const=True, default=True)
    return p


def parse(argv: Sequence[str]) -> tuple[RunSpec, bool]:
    """(the run, whether to print the config instead of running)."""
    parser = get_parser()
    opt, overrides = parse_flags(
        parser,
        argv,
        "; config keys go as --trainer.X, --model.X or --data.X (or key.path=value).",
    )
    if not opt.config:
        parser.error(
            "--config FILE is required (a CompVis-style YAML such as configs/txt2img.yaml)"
        )
    overrides = [f"{_cli_key(k)}={v}" for k, _, v in (o.partition("=") for o in overrides)]
    resume = opt.ckpt_path or ""  # its run's configs, then --config files and overrides
    spec = RunSpec(
        base=opt.config if not resume else [],
        overrides=overrides,
        train=opt.subcommand == "fit",
        resume=resume,
        name=opt.name if not resume else "",
        project=opt.project,
        logdir=opt.logdir,
        seed=opt.seed_everything,
        scale_lr=opt.scale_lr,
        no_test=opt.subcommand != "test",
        validate=opt.subcommand == "validate",
    )
    if resume:  # the run directory's configs come first, then --config files as extra layers
        spec = dataclasses.replace(spec, base=opt.config)
    return spec, bool(opt.print_config)


def to_lightning_form(node: Any) -> Any:
    """``{target, params}`` -> ``{class_path, init_args}``, recursively."""
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if k == "target":
                out["class_path"] = v
            elif k == "params" and "target" in node:
                out["init_args"] = to_lightning_form(v)
            else:
                out[k] = to_lightning_form(v)
        return out
    if isinstance(node, list):
        return [to_lightning_form(v) for v in node]
    return node


def resolved_config(spec: RunSpec) -> dict[str, Any]:
    """The merged config of a run (files + overrides), as ``main.py`` builds it."""
    config, _ = merge_configs(spec.base, config_overrides(spec))
    return OmegaConf.to_container(config, resolve=True)


def lightning_config(spec: RunSpec) -> dict[str, Any]:
    """What --print_config shows: LightningCLI's layout of the resolved config."""
    cfg = resolved_config(spec)
    lightning = cfg.pop("lightning", {}) or {}
    out: dict[str, Any] = {"seed_everything": spec.seed, "trainer": lightning.pop("trainer", {})}
    out.update(to_lightning_form(cfg))
    if lightning:
        out["lightning"] = to_lightning_form(lightning)  # callbacks, logger: ours, kept as they are
    return out


def main(argv: Sequence[str] | None = None) -> int:
    import logging

    from ldm.launch import run

    argv = sys.argv[1:] if argv is None else list(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    spec, print_only = parse(argv)
    if print_only:
        sys.stdout.write(OmegaConf.to_yaml(OmegaConf.create(lightning_config(spec))))
        return 0
    run(spec)
    return 0
