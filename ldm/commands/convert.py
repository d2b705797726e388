"""`ldm-convert`: checkpoint <-> diffusers folder, prune / EMA-extract / fp16 to .safetensors."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


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


def run(argv: list[str] | None = None) -> Path:
    """Dispatch on the source/destination kinds."""
    from ldm.checkpoint.convert import diffusers_to_checkpoint, is_diffusers_folder, to_diffusers
    from ldm.checkpoint.prune import prune_checkpoint

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    src, dst = Path(args.src), Path(args.dst)
    if is_diffusers_folder(src):
        return diffusers_to_checkpoint(src, dst)
    to = args.to
    if to == "auto":
        to = "ckpt" if dst.suffix in (".safetensors", ".ckpt") else "diffusers"
    if to == "diffusers":
        return to_diffusers(
            src,
            dst,
            config=args.config,
            prediction=args.prediction,
            use_ema=args.ema == "use",
            unsafe=args.unsafe,
        )
    return prune_checkpoint(src, dst, fp16=args.fp16, ema=args.ema, unsafe=args.unsafe)


def main(argv: list[str] | None = None) -> int:
    from ldm.checkpoint.detect import DetectionError
    from ldm.checkpoint.safe_load import UnsafeCheckpointError

    try:
        out = run(argv)
    except (FileNotFoundError, DetectionError, UnsafeCheckpointError, ValueError) as err:
        sys.stderr.write(f"ldm-convert: error: {err}\n")
        return 2
    logging.getLogger(__name__).info("Wrote %s", out)
    return 0
