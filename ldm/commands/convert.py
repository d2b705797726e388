"""`ldm-convert`: checkpoint <-> diffusers folder, prune / EMA-extract / fp16 to .safetensors."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ldm.atomic_output import atomic_path
from ldm.checkpoint.convert import is_diffusers_folder
from ldm.checkpoint.formats import CHECKPOINT_SUFFIXES, SAFETENSORS_SUFFIX
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
        help="auto: a folder src gives a file; a file src gives a file when dst ends in "
        ".safetensors / .ckpt / .pt / .pth / .bin, else a diffusers folder",
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
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing diffusers folder at dst (never any other folder)",
    )
    return p


#: file outputs by suffix (any case); anything else names a diffusers folder
FILE_SUFFIXES = CHECKPOINT_SUFFIXES


def _is_file_output(dst: Path) -> bool:
    return dst.suffix.lower() in FILE_SUFFIXES


def _inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` is ``folder`` or lies below it (paths resolved)."""
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def _check_folder_dst(src: Path, dst: Path, overwrite: bool) -> None:
    """A diffusers folder may only be written where nothing is lost: a new or empty folder, or,
    with --overwrite, an existing diffusers folder that holds neither the source nor the
    working directory."""
    if dst.is_file():
        raise ConfigError(
            f"dst {dst}: an existing file, but a diffusers folder is written there; give a new "
            f"folder name, or a {' / '.join(FILE_SUFFIXES)} name for a single file."
        )
    if not dst.is_dir() or not any(dst.iterdir()):
        return
    for what, path in (("the source", src), ("the working directory", Path.cwd())):
        if _inside(path, dst):
            raise ConfigError(
                f"dst {dst}: holds {what} ({path}); the folder is replaced as a whole, so this "
                "would delete it. Write the diffusers folder to a new path."
            )
    if not is_diffusers_folder(dst):
        held = sorted(f.name for f in dst.iterdir())
        raise ConfigError(
            f"dst {dst}: an existing folder that is not a diffusers folder (it holds "
            f"{', '.join(held[:5])}{' ...' if len(held) > 5 else ''}); the folder would be "
            "replaced as a whole. Give a new folder name."
        )
    if not overwrite:
        raise ConfigError(
            f"dst {dst}: a diffusers folder already exists there; pass --overwrite to replace it, "
            "or give a new folder name."
        )


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
    if dst.is_dir() and _is_file_output(dst):
        raise ConfigError(f"dst {dst}: an existing folder, but a file name was given; rename it.")
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
    to = args.to
    if to == "auto":
        to = "ckpt" if _is_file_output(dst) or is_diffusers_folder(src) else "diffusers"
    if to == "ckpt" and not _is_file_output(dst):
        raise ConfigError(
            f"dst {dst}: a checkpoint file needs a {' / '.join(FILE_SUFFIXES)} name (the loaders "
            f"read those); e.g. {dst.with_suffix(SAFETENSORS_SUFFIX).name}."
        )
    if to == "diffusers":
        if is_diffusers_folder(src):
            raise ConfigError(
                f"src {src} is already a diffusers folder; give a .safetensors / .ckpt dst to "
                "convert it to a checkpoint."
            )
        _check_folder_dst(src, dst, args.overwrite)
    with writing(dst.parent, f"the converted model {dst.name}", flag="dst"):
        if is_diffusers_folder(src):
            return diffusers_to_checkpoint(src, dst, unsafe=args.unsafe)
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
