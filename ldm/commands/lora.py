"""`ldm-lora`: merge LoRAs into a checkpoint (and out again), extract one from two checkpoints by
SVD, convert between kohya and diffusers files, and describe a LoRA file."""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from ldm.adapters.sampling import split_scale
from ldm.commands.validation import float_in, int_in
from ldm.disk_errors import writing

logger = logging.getLogger(__name__)

PROG = "ldm-lora"
_LONG_METADATA = 160  # header values longer than this (tag frequencies, dataset lists) are cut


def parse_lora_arg(text: str) -> tuple[str, float]:
    """`PATH[:SCALE]` -> (path, scale) (``ldm.adapters.sampling.split_scale``)."""
    try:
        return split_scale(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="LoRA files: merge, extract, convert, info.")
    sub = p.add_subparsers(dest="command", required=True)
    lora_help = "LoRA file, optionally with a scale: PATH[:SCALE] (default 1); repeatable"
    m = sub.add_parser("merge", help="merge LoRAs into a checkpoint (EMA copies too)")
    m.add_argument("ckpt", help="checkpoint .ckpt / .safetensors")
    m.add_argument("--lora", action="append", required=True, type=parse_lora_arg, help=lora_help)
    m.add_argument("--out", required=True, help="merged checkpoint .safetensors / .ckpt")
    unmerge_help = (
        "subtract LoRAs merged earlier (same files and scales); exact only up to float rounding, "
        "since merging rounded each weight to its dtype"
    )
    u = sub.add_parser("unmerge", help=unmerge_help, description=unmerge_help)
    u.add_argument("ckpt", help="the merged checkpoint")
    u.add_argument("--lora", action="append", required=True, type=parse_lora_arg, help=lora_help)
    u.add_argument("--out", required=True, help="output checkpoint .safetensors / .ckpt")
    for cmd in (m, u):
        cmd.add_argument("--unsafe", action="store_true", help="allow arbitrary pickles (trusted)")
    e = sub.add_parser("extract", help="LoRA approximating tuned - base by truncated SVD")
    e.add_argument("--base", required=True, help="the original checkpoint")
    e.add_argument("--tuned", required=True, help="the fine-tuned checkpoint")
    e.add_argument("--rank", type=int_in(1), required=True, help="rank of linear and 1x1 modules")
    e.add_argument(
        "--conv-rank", type=int_in(1), default=None, help="rank of 3x3 convs (default: none)"
    )
    e.add_argument("--format", choices=["kohya", "diffusers"], default="kohya")
    e.add_argument(
        "--clamp-quantile",
        type=float_in(0.0, 1.0, low_open=True),
        default=0.99,
        help="clamp factors (sd-scripts); 1 = off",
    )
    e.add_argument(
        "--min-diff",
        type=float_in(0.0),
        default=0.01,
        help="text encoders changed less are skipped",
    )
    e.add_argument("--out", required=True, help="LoRA file (.safetensors)")
    e.add_argument("--unsafe", action="store_true", help="allow arbitrary pickles (trusted)")
    c = sub.add_parser("convert", help="kohya <-> diffusers LoRA file")
    c.add_argument("src", help="LoRA file")
    c.add_argument("--to", choices=["kohya", "diffusers"], required=True)
    c.add_argument("--out", required=True, help="output LoRA file (.safetensors)")
    c.add_argument(
        "--like", default=None, help="the model's checkpoint (else the layout comes from the names)"
    )
    i = sub.add_parser("info", help="format, base model, ranks, alphas, modules, metadata")
    i.add_argument("path", help="LoRA file")
    return p


def checkpoint_shapes(path: str, unsafe: bool = False) -> dict[str, torch.Size]:
    """State-dict shapes of a checkpoint (a .safetensors header only: no tensor is read)."""
    from ldm.checkpoint.safe_load import (
        SAFETENSORS_SUFFIX,
        read_checkpoint,
        read_safetensors_header,
    )

    if Path(path).suffix.lower() == SAFETENSORS_SUFFIX:
        if not Path(path).is_file():
            raise FileNotFoundError(f"Checkpoint not found: {path}")
        return read_safetensors_header(path)
    return {k: v.shape for k, v in read_checkpoint(path, unsafe=unsafe).state_dict.items()}


def _weights(path: str, unsafe: bool) -> tuple[dict[str, torch.Tensor], Any]:
    """(state dict with the EMA weights in place when the file has them, LoadedCheckpoint)."""
    from ldm.checkpoint.ema import apply_ema, has_ema
    from ldm.checkpoint.safe_load import read_checkpoint

    ckpt = read_checkpoint(path, unsafe=unsafe, verify=True)
    if has_ema(ckpt.state_dict):
        logger.info("%s: using its EMA weights (as ldm.load_model does)", path)
        return apply_ema(ckpt.state_dict), ckpt
    return ckpt.state_dict, ckpt


def _merge_ema(sd: dict[str, torch.Tensor], files: list, sign: int) -> int:
    """Merge the U-Net parts of the LoRAs into the `model_ema.*` copies too; the count merged."""
    from ldm.adapters.lora_apply import merge_into_state_dict
    from ldm.adapters.lora_weights import LoraFile
    from ldm.checkpoint.ema import ema_key

    keys = {
        k: ema_key(k)
        for f, _ in files
        for k in f.modules
        if k.startswith("model.") and ema_key(k) in sd
    }
    if not keys:
        return 0
    view = {k: sd[e] for k, e in keys.items()}
    sub = [(LoraFile({k: m for k, m in f.modules.items() if k in view}), s) for f, s in files]
    merged = merge_into_state_dict(view, sub, sign)
    for k, e in keys.items():
        sd[e] = merged[k]
    return len(keys)


def run_merge(args: argparse.Namespace, sign: int) -> Path:
    """merge (+1) / unmerge (-1) LoRAs into / out of a checkpoint file."""
    import json

    from ldm.adapters.lora_apply import merge_into_state_dict, resolve
    from ldm.checkpoint.prune import save_state_dict
    from ldm.checkpoint.safe_load import read_checkpoint

    ckpt = read_checkpoint(args.ckpt, unsafe=args.unsafe, verify=True)
    shapes = {k: v.shape for k, v in ckpt.state_dict.items()}
    files = resolve(args.lora, shapes)
    sd = merge_into_state_dict(ckpt.state_dict, files, sign)
    n_ema = _merge_ema(sd, files, sign)
    if n_ema:
        logger.info(
            "Also %s the EMA copies of %d U-Net weights",
            "merged into" if sign > 0 else "subtracted from",
            n_ema,
        )
    keep = ("global_step", "epoch", "sampling_defaults")
    extras = {k: ckpt.extras[k] for k in keep if k in ckpt.extras}
    if "sampling_defaults" in ckpt.metadata:
        extras["sampling_defaults"] = json.loads(ckpt.metadata["sampling_defaults"])
    return save_state_dict(sd, args.out, config=ckpt.embedded_config, extras=extras)


def run_extract(args: argparse.Namespace) -> Path:
    """extract: LoRA of tuned - base, saved in the model's layout."""
    from ldm.adapters.lora_extract import extract_lora
    from ldm.adapters.lora_io import save_lora

    base, _ = _weights(args.base, args.unsafe)
    tuned, _ = _weights(args.tuned, args.unsafe)
    clamp = None if args.clamp_quantile >= 1 else args.clamp_quantile
    names = (f"--base {args.base}", f"--tuned {args.tuned}")
    modules = extract_lora(base, tuned, args.rank, args.conv_rank, clamp, args.min_diff, names)
    if not modules:
        raise ValueError(f"{args.tuned} does not differ from {args.base} on any LoRA target.")
    shapes = {k: v.shape for k, v in base.items()}
    return save_lora(args.out, modules, shapes, format=args.format)


def run_convert(args: argparse.Namespace) -> Path:
    """convert: kohya <-> diffusers, against a model (--like) or the file's own names."""
    from ldm.adapters.lora_diffusers import METADATA_KEY
    from ldm.adapters.lora_io import bind, read_named, save_lora, write_named
    from ldm.adapters.lora_unbound import unbound_names

    named, metadata, fmt = read_named(args.src)
    source = Path(args.src).name
    keep = {k: v for k, v in metadata.items() if k not in (METADATA_KEY, "format")}
    if args.like is not None:
        shapes = checkpoint_shapes(args.like)
        lora = bind(named, metadata, fmt, shapes, source)
        return save_lora(args.out, lora.modules, shapes, format=args.to, metadata=keep)
    names, shapes, family = unbound_names(named, metadata, fmt, source)
    lora = bind(named, metadata, fmt, shapes, source, names=names, model=family)
    return write_named(args.out, lora.modules, names, args.to, family, keep)


def _component(name: str) -> str:
    """`lora_unet` / `lora_te1` / ... (kohya) or `unet` / `text_encoder` / ... (diffusers)."""
    m = re.match(r"(lora_unet|lora_te\d?)_", name)
    return m.group(1) if m else name.split(".", 1)[0]


def describe(path: str) -> str:
    """info: what a LoRA file holds, as text."""
    from ldm.adapters.lora_family import file_family
    from ldm.adapters.lora_io import read_named

    named, metadata, fmt = read_named(path)
    family = file_family(named, metadata)
    comps = Counter(_component(n) for n in named)
    ranks = Counter(m.rank for m in named.values())
    alphas = Counter(m.alpha if m.alpha is not None else "none (= rank)" for m in named.values())
    convs = sum(1 for m in named.values() if m.down.ndim == 4 and m.down.shape[2:] != (1, 1))
    lines = [
        f"file:       {path}",
        f"format:     {fmt}",
        f"made for:   {family}",
        f"modules:    {len(named)} ({', '.join(f'{c}: {n}' for c, n in sorted(comps.items()))})",
        f"conv 3x3:   {convs}",
        f"ranks:      {', '.join(f'{r} x{n}' for r, n in sorted(ranks.items()))}",
        f"alphas:     {', '.join(f'{a} x{n}' for a, n in alphas.most_common())}",
    ]
    if metadata:
        lines.append("metadata:")
        for k in sorted(metadata):
            v = metadata[k].replace("\n", " ")
            cut = v if len(v) <= _LONG_METADATA else v[:_LONG_METADATA] + f"... ({len(v)} chars)"
            lines.append(f"  {k}: {cut}")
    return "\n".join(lines) + "\n"


def run(argv: list[str] | None = None) -> str:
    """Dispatch a command line; the text to print."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "info":
        return describe(args.path)
    _check_out(args)
    out_dir = _out_dir(args.out)
    with writing(out_dir, f"{Path(args.out).name}", flag="--out"):
        if args.command in ("merge", "unmerge"):
            out = run_merge(args, 1 if args.command == "merge" else -1)
        elif args.command == "extract":
            out = run_extract(args)
        else:
            out = run_convert(args)
    return f"Wrote {out}\n"


def _inputs(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(flag, path) of every file a command reads."""
    if args.command in ("merge", "unmerge"):
        return [("the checkpoint", args.ckpt)] + [("--lora", p) for p, _ in args.lora]
    if args.command == "extract":
        return [("--base", args.base), ("--tuned", args.tuned)]
    return [("the LoRA file", args.src)] + ([("--like", args.like)] if args.like else [])


def _check_out(args: argparse.Namespace) -> None:
    """ValueError (exit 2) for an --out the loaders could not read back (its suffix), or one that
    is a file the command reads: it would be replaced by the result."""
    from ldm.checkpoint.formats import CHECKPOINT_SUFFIXES, SAFETENSORS_SUFFIX

    if Path(args.out).suffix.lower() not in CHECKPOINT_SUFFIXES:
        raise ValueError(
            f"--out {args.out}: the loaders read only {', '.join(CHECKPOINT_SUFFIXES)} files; name the "
            f"output with one of them, e.g. {Path(args.out).with_suffix(SAFETENSORS_SUFFIX)}."
        )
    out = Path(args.out).resolve()
    for flag, path in _inputs(args):
        if Path(path).resolve() == out:
            raise ValueError(
                f"--out {args.out} is {flag} {path} itself: writing it would replace an input. "
                "Give another --out."
            )


def _out_dir(out: str) -> Path:
    """The folder ``--out`` goes to; a file in the way is a usage error."""
    parent = Path(out).parent
    probe = parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise NotADirectoryError(f"--out {out}: {probe} is a file, not a folder.")
    if Path(out).is_dir():
        raise IsADirectoryError(f"--out {out}: a folder; give a file name (.safetensors).")
    return parent


def main(argv: list[str] | None = None) -> int:
    """Entry point of `ldm-lora`; 2 with a message on stderr for a user error, 1 for a disk fault."""
    from ldm.errors import exit_code, report

    try:
        text = run(argv)
    except Exception as err:
        code = exit_code(err, (ValueError,))
        if code is None:
            raise
        return report(PROG, err, code)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
