"""Checks of the sampling commands' inputs made before a model is loaded (files, images, device,
output folder) and after (image size against the model's latent grid)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from ldm.commands.validation import check_image_file

__all__ = [
    "CommandError",
    "check_inputs",
    "check_mode",
    "check_size",
    "device_from_flag",
    "read_prompts",
]


class CommandError(Exception):
    """A user mistake on the command line (a flag value, a file): printed without a traceback,
    exit code 2."""


def device_from_flag(name: str | None) -> torch.device:
    """``--device``: a device torch knows and this machine has (default: cuda, mps, cpu)."""
    from ldm.checkpoint.loader import default_device

    if not name:
        return default_device()
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise CommandError(
            f"--device {name}: not a device; use cpu, cuda, cuda:N or mps."
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CommandError(f"--device {name}: no CUDA device here; use --device cpu.")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CommandError(
                f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1})."
            )
    elif device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise CommandError(f"--device {name}: MPS is not available here; use --device cpu.")
    elif device.type != "cpu":
        raise CommandError(f"--device {name}: not supported; use cpu, cuda, cuda:N or mps.")
    return device


def _check_outdir(outdir: str) -> None:
    path = Path(outdir)
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        where = "is a file" if probe == path else f"lies under the file {probe}"
        raise CommandError(f"--outdir {outdir}: {where}; expected a folder.")


def check_inputs(args: argparse.Namespace) -> None:
    """Every file flag exists and is of the right kind; images open; the output folder can be one."""
    if not Path(args.ckpt).exists():
        raise CommandError(f"--ckpt {args.ckpt}: no such file or folder.")
    for flag in ("config", "refiner_config", "from_file"):
        value = getattr(args, flag, None)
        if value is not None and not Path(value).is_file():
            raise CommandError(f"--{flag.replace('_', '-')} {value}: no such file.")
    if args.refiner_config and not args.refiner:
        raise CommandError("--refiner-config needs --refiner.")
    if args.refiner is not None and not Path(args.refiner).exists():
        raise CommandError(f"--refiner {args.refiner}: no such file or folder.")
    for flag in ("init_img", "mask"):
        value = getattr(args, flag, None)
        if value is None:
            continue
        problem = check_image_file(value)
        if problem is not None:
            name = "--init-img" if flag == "init_img" else "--mask"
            raise CommandError(
                f"{name} {value}: {problem}. Give a PNG, JPEG or WebP image"
                + (" (white = repaint, black = keep)." if flag == "mask" else ".")
            )
    _check_adapter_flags(args)
    _check_outdir(args.outdir)


def _check_adapter_flags(args: argparse.Namespace) -> None:
    """--lora PATH[:SCALE] parses and names a file, --embedding files exist: before the model
    loads."""
    from ldm.adapters.sampling import parse_lora

    for spec in getattr(args, "lora", None) or ():
        try:
            path, _ = parse_lora(spec)
        except ValueError as err:
            raise CommandError(f"--lora {spec}: {err}") from err
        if not Path(path).is_file():
            raise CommandError(f"--lora {path}: no such file.")
    for path in getattr(args, "embedding", None) or ():
        if not Path(path).is_file():
            raise CommandError(f"--embedding {path}: no such file.")


def read_prompts(path: str) -> list[str]:
    """The non-empty lines of ``--from-file`` (UTF-8 text)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        line = Path(path).read_bytes()[: err.start].count(b"\n") + 1
        raise CommandError(
            f"--from-file {path}: line {line} is not UTF-8 text ({err.reason}); "
            "give a text file with one prompt per line."
        ) from None
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise CommandError(f"--from-file {path}: no prompts (the file has no non-empty line).")
    return lines


def check_mode(mode: str, model: Any, flag: str, path: str) -> None:
    """An inpainting model (conditioned on a mask) is sampled with ldm-inpaint only."""
    conditioner = getattr(model, "conditioner", None)
    keys = set(getattr(conditioner, "input_keys", None) or ())
    if mode != "inpaint" and {"mask", "masked_image"} & keys:
        raise CommandError(
            f"{flag} {path}: an inpainting model (conditioned on a mask and the masked image); "
            "use ldm-inpaint with --init-img and --mask, or a text-to-image checkpoint."
        )
    if keys and conditioner.text_key() is None and not {"mask", "masked_image"} & keys:
        example = ", ".join(f"'{k}': [...]" for k in sorted(keys))
        raise CommandError(
            f"{flag} {path}: a model conditioned on {sorted(keys)}, not on text; the sampling "
            "commands set only prompts. Sample it from Python: ldm.load_model(path).generate("
            f"batch={{{example}}}) (class labels as ints, one per image)."
        )


def check_size(args: argparse.Namespace, model: Any) -> None:
    """--H / --W are multiples of the model's latent factor f (8 for Stable Diffusion); any
    multiple works (the U-Net upsamples to its skips' sizes). --f / --C, when given, are the
    model's (they are read off the checkpoint, not set by the flags)."""
    from ldm.engine.generate import grid_sides, latent_factor

    f = latent_factor(model)
    if args.f is not None and args.f != f:
        raise CommandError(
            f"--f {args.f}: this checkpoint's autoencoder downsamples by {f}; leave --f out "
            f"or give --f {f}."
        )
    channels = getattr(model, "channels", None)
    if args.C is not None and isinstance(channels, int) and args.C != channels:
        raise CommandError(
            f"--C {args.C}: this checkpoint's latents have {channels} channels; leave --C out "
            f"or give --C {channels}."
        )
    for flag in ("H", "W"):
        value = getattr(args, flag)
        if value is not None and value % f:
            low, high = grid_sides(value, f)
            raise CommandError(
                f"--{flag} {value}: must be a multiple of {f} (the model's latent factor); "
                f"use {low} or {high}."
            )
