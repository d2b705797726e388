"""Flags of the CompVis and Stability scripts that the sampling commands accept as well.

- Stability SD 2 ``scripts/txt2img.py``: ``--bf16`` (= ``--precision bf16``) and ``--repeat N``
  (each ``--from-file`` prompt N times).
- CompVis latent-diffusion ``scripts/inpaint.py``: ``--indir DIR`` of images ``X.png`` with masks
  ``X_mask.png``; each result goes to ``--outdir``/``X.png``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ldm.commands.sample_checks import CommandError
from ldm.commands.validation import check_image_file, int_in

__all__ = ["add_compat_flags", "apply_compat_flags", "inpaint_pairs"]

#: --n_samples / --n_iter when not given (--indir: one result per image, as CompVis writes)
DEFAULT_N_SAMPLES, DEFAULT_N_ITER = 3, 2


def add_compat_flags(p: argparse.ArgumentParser, mode: str) -> None:
    """Add ``--bf16``, ``--repeat`` and (inpaint) ``--indir`` to a sampling command's parser."""
    p.add_argument(
        "--bf16", action="store_true", help="same as --precision bf16 (Stability's SD 2 flag)"
    )
    p.add_argument(
        "--repeat",
        type=int_in(1),
        default=1,
        help="sample each --from-file prompt this many times (Stability's SD 2 flag; default 1)",
    )
    if mode == "inpaint":
        p.add_argument(
            "--indir",
            type=str,
            default=None,
            help="CompVis interface: a folder of images X.png with masks X_mask.png (white = "
            "repaint); each result is written to --outdir/X.png. Instead of --init-img/--mask",
        )


def apply_compat_flags(args: argparse.Namespace, mode: str) -> None:
    """Check the compatibility flags against the others and fold them into them: --bf16 into
    --precision, --indir into one result per image (defaults of --n_samples / --n_iter)."""
    if args.bf16:
        if args.precision not in (None, "bf16"):
            raise CommandError(
                f"--bf16 and --precision {args.precision} ask for different float types; "
                "give one of them (--bf16 is --precision bf16)."
            )
        args.precision = "bf16"
    if args.repeat > 1 and not args.from_file:
        raise CommandError(
            f"--repeat {args.repeat} repeats the prompts of --from-file; without a file use "
            "--n_samples (images per batch) or --n_iter (batches)."
        )
    indir = getattr(args, "indir", None)
    if mode == "inpaint":
        given = [f for f, v in (("--init-img", args.init_img), ("--mask", args.mask)) if v]
        if indir is not None and given:
            raise CommandError(
                f"--indir and {' and '.join(given)}: give either --indir DIR (X.png with "
                "X_mask.png) or --init-img with --mask, not both."
            )
        if indir is None and len(given) < 2:
            raise CommandError(
                "ldm-inpaint needs --init-img IMAGE and --mask MASK (white = repaint), or "
                "--indir DIR of images X.png with masks X_mask.png."
            )
    if indir is not None:
        for flag in ("n_samples", "n_iter"):
            if getattr(args, flag) not in (None, 1):
                raise CommandError(
                    f"--indir writes one result per image (--outdir/X.png); drop --{flag} "
                    f"{getattr(args, flag)}."
                )
        args.indir_pairs = inpaint_pairs(indir)  # checked before the model loads
        args.n_samples = args.n_iter = 1
        args.skip_grid = True
    if args.n_samples is None:
        args.n_samples = DEFAULT_N_SAMPLES
    if args.n_iter is None:
        args.n_iter = DEFAULT_N_ITER


def inpaint_pairs(indir: str) -> list[tuple[Path, Path]]:
    """(image, mask) pairs of a CompVis inpainting folder: every ``X_mask.png`` and its ``X.png``,
    sorted by name; a mask without its image, an unreadable file or no masks is an error."""
    folder = Path(indir)
    if not folder.is_dir():
        raise CommandError(f"--indir {indir}: no such folder.")
    masks = sorted(folder.glob("*_mask.png"))
    if not masks:
        images = sorted(p.name for p in folder.glob("*.png"))
        found = f"found {len(images)} other PNG file(s)" if images else "found no PNG file"
        raise CommandError(
            f"--indir {indir}: no masks; expected images X.png with masks X_mask.png (white = "
            f"repaint), {found}."
        )
    pairs = []
    for mask in masks:
        image = mask.with_name(mask.name.removesuffix("_mask.png") + ".png")
        if not image.is_file():
            raise CommandError(
                f"--indir {indir}: mask {mask.name} has no image {image.name}; add it or remove "
                "the mask."
            )
        for path in (image, mask):
            problem = check_image_file(str(path))
            if problem is not None:
                raise CommandError(f"--indir {indir}: {path.name}: {problem}.")
        pairs.append((image, mask))
    unmasked = sorted(
        p.name
        for p in folder.glob("*.png")
        if not p.name.endswith("_mask.png") and p not in {i for i, _ in pairs}
    )
    if unmasked:
        raise CommandError(
            f"--indir {indir}: {', '.join(unmasked[:5])}{' ...' if len(unmasked) > 5 else ''} "
            f"ha{'ve' if len(unmasked) > 1 else 's'} no mask; add "
            f"{Path(unmasked[0]).stem}_mask.png (white = repaint) or move the image out."
        )
    return pairs
