"""`ldm-convert`: checkpoint <-> diffusers folder, prune / EMA-extract / fp16 to .safetensors."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ldm.atomic_output import atomic_path
from ldm.checkpoint.convert import is_diffusers_folder
from ldm.disk_errors import writing
from ldm.errors import exit_code, report
from ldm.util import ConfigError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ldm-convert", description="Convert SD/our checkpoints and diffusers folders."
    )
    p.add_argument("src", help=".ckpt / .safetensors / diffusers folder")
    p.add_argument("dst", help="diffusers folder, or .safetensors / .ckpt file")
    p.add_argument(
        "--to",
        choices=["auto", "diffusers", "ckpt"],
        default="auto",
        help="auto: folder src -> file, file src -> folder unless dst has a suffix",
    )
    p.add_argument("--config", default=None, help="model config (default: embedded / detected)")
    p.add_argument("--prediction", choices=["eps", "v"], default=None, help="SD v2 eps or v")
    p.add_argument(
        "--ema",
        choices=["auto", "use", "keep", "drop"],
        default="auto",
        help="file -> file: EMA handling; to diffusers: use = EMA weights",
    )
    p.add_argument(
        "--fp16", action="store_true", help="file -> file: store floating weights as fp16"
    )
    p.add_argument(
        "--unsafe", action="store_true", help="allow arbitrary pickles (trusted files only)"
    )
    return p


def _check_paths(src: Path, dst: Path) -> None:
    """src exists; dst is not src and can be created (no file where a folder must be)."""
    if not src.exists():
        raise FileNotFoundError(f"src {src}: no such file or folder.")
    if src.is_dir() and not is_diffusers_folder(src):
        raise FileNotFoundError(
            f"src {src}: a folder without model_index.json and unet/ (not a diffusers folder); "
            "give a .ckpt / .safetensors file or a diffusers folder."
        )
    if dst.resolve() == src.resolve():
        raise ConfigError(f"dst {dst}: the same path as src; write the result elsewhere.")
    probe = dst.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise NotADirectoryError(f"dst {dst}: {probe} is a file, not a folder.")


def run(argv: list[str] | None = None) -> Path:
    """Dispatch on the source/destination kinds. Outputs appear whole or not at all."""
    from ldm.checkpoint.convert import diffusers_to_checkpoint, to_diffusers
    from ldm.checkpoint.prune import prune_checkpoint

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    src, dst = Path(args.src), Path(args.dst)
    _check_paths(src, dst)
    with writing(dst.parent, f"the converted model {dst.name}", flag="dst"):
        if is_diffusers_folder(src):
            return diffusers_to_checkpoint(src, dst)
        to = args.to
        if to == "auto":
            to = "ckpt" if dst.suffix in (".safetensors", ".ckpt") else "diffusers"
        if to == "diffusers":
            with atomic_path(dst, folder=True) as tmp:
                to_diffusers(
                    src,
                    tmp,
                    config=args.config,
                    prediction=args.prediction,
                    use_ema=args.ema == "use",
                    unsafe=args.unsafe,
                )
            return dst
        return prune_checkpoint(src, dst, fp16=args.fp16, ema=args.ema, unsafe=args.unsafe)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``ldm-convert``: 2 with a message for a user error, 1 for a disk fault."""
    try:
        out = run(argv)
    except Exception as err:
        code = exit_code(err, (ValueError,))
        if code is None:
            raise
        return report("ldm-convert", err, code)
    logging.getLogger(__name__).info("Wrote %s", out)
    return 0
