"""txt2img / img2img / inpaint commands with the CompVis flags (plus --sampler, --karras, ...)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ldm.sampling.pngmeta import save_png, to_pil
from ldm.sampling.vae_decode import decode_sliced, decode_tiled

logger = logging.getLogger(__name__)


class CommandError(Exception):
    """A user mistake on the command line: printed without a traceback."""


def build_parser(mode: str) -> argparse.ArgumentParser:
    """Flags of `mode` in ('txt2img', 'img2img', 'inpaint')."""
    p = argparse.ArgumentParser(
        prog=f"ldm-{mode}",
        description=f"{mode} sampling from a checkpoint (config detected when not given).",
    )
    p.add_argument(
        "--prompt",
        type=str,
        default="a painting of a virus monster playing guitar" if mode == "txt2img" else "",
    )
    p.add_argument("--from-file", dest="from_file", type=str, help="one prompt per line")
    p.add_argument(
        "--negative-prompt", "--negative_prompt", dest="negative_prompt", type=str, default=""
    )
    p.add_argument("--outdir", type=str, default=f"outputs/{mode}-samples")
    p.add_argument("--n_samples", type=int, default=3, help="batch size")
    p.add_argument("--n_iter", type=int, default=2, help="batches per prompt")
    p.add_argument("--steps", "--ddim_steps", dest="steps", type=int, default=50)
    p.add_argument(
        "--sampler",
        type=str,
        default=None,
        help="sampler name (ldm.samplers.SAMPLERS); default ddim",
    )
    p.add_argument("--plms", action="store_true", help="same as --sampler plms")
    p.add_argument("--dpm_solver", action="store_true", help="same as --sampler dpmpp_2m")
    p.add_argument("--karras", action="store_true", help="Karras sigmas for sigma-based samplers")
    p.add_argument("--ddim_eta", type=float, default=0.0)
    p.add_argument("--scale", type=float, default=7.5 if mode == "txt2img" else 5.0)
    p.add_argument("--H", type=int, default=None, help="image height (default: the model's size)")
    p.add_argument("--W", type=int, default=None, help="image width (default: the model's size)")
    p.add_argument("--C", type=int, default=None, help="latent channels (default: the model's)")
    p.add_argument(
        "--f", type=int, default=None, help="downsampling factor (default: the autoencoder's)"
    )
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--precision", choices=["full", "autocast"], default="autocast")
    p.add_argument(
        "--config", type=str, default=None, help="model config (default: detected / embedded)"
    )
    p.add_argument(
        "--ckpt", type=str, required=True, help=".ckpt / .safetensors / diffusers folder"
    )
    p.add_argument("--skip_grid", action="store_true")
    p.add_argument("--skip_save", action="store_true")
    p.add_argument("--fixed_code", action="store_true", help="same start noise for every batch")
    p.add_argument("--n_rows", type=int, default=0, help="grid rows (default n_samples)")
    p.add_argument("--device", type=str, default=None, help="default: cuda, else mps, else cpu")
    p.add_argument(
        "--use-ema",
        "--use_ema",
        dest="use_ema",
        action="store_true",
        default=None,
        help="use EMA weights (default: when present)",
    )
    p.add_argument("--no-ema", dest="use_ema", action="store_false")
    p.add_argument(
        "--prediction",
        choices=["eps", "v"],
        default=None,
        help="SD v2: eps or v (else from the file name)",
    )
    p.add_argument(
        "--unsafe", action="store_true", help="allow arbitrary pickles (trusted files only)"
    )
    p.add_argument(
        "--tiled-decode",
        dest="tiled_decode",
        action="store_true",
        help="decode the VAE in overlapping tiles",
    )
    p.add_argument(
        "--attention-slice",
        dest="attention_slice",
        type=int,
        default=None,
        help="sets LDM_ATTENTION_SLICE",
    )
    if mode in ("img2img", "inpaint"):
        p.add_argument(
            "--init-img", "--init_img", "--image", dest="init_img", type=str, required=True
        )
        p.add_argument("--strength", type=float, default=0.75 if mode == "img2img" else 1.0)
    if mode == "inpaint":
        p.add_argument("--mask", type=str, required=True, help="white = repaint, black = keep")
    return p


def sampler_name(args: argparse.Namespace) -> str:
    """--sampler, else --plms / --dpm_solver, else ddim (the CompVis default)."""
    from ldm.samplers import SAMPLERS

    name = args.sampler or ("plms" if args.plms else "dpmpp_2m" if args.dpm_solver else "ddim")
    if name not in SAMPLERS:
        raise CommandError(
            f"Unknown --sampler {name!r}; choose one of: {', '.join(sorted(SAMPLERS))}."
        )
    return name


def pick_device(name: str | None) -> torch.device:
    from ldm.checkpoint.loader import default_device

    return torch.device(name) if name else default_device()


def prompts(args: argparse.Namespace) -> list[list[str]]:
    """Batches of prompts: n_samples copies of --prompt, or chunks of --from-file lines."""
    if args.from_file:
        path = Path(args.from_file)
        if not path.is_file():
            raise CommandError(f"--from-file {path}: no such file.")
        lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
        return [lines[i : i + args.n_samples] for i in range(0, len(lines), args.n_samples)]
    return [[args.prompt] * args.n_samples]


def load_image(path: str, size: tuple[int, int] | None, mode: str = "RGB") -> torch.Tensor:
    """Image file -> [1, C, H, W] in [-1, 1] (RGB) or [0, 1] (L), sizes rounded down to 8."""
    from PIL import Image

    if not Path(path).is_file():
        raise CommandError(f"Image {path} not found.")
    im = Image.open(path).convert(mode)
    w, h = size if size else im.size
    w, h = w - w % 8, h - h % 8
    im = im.resize((w, h), Image.Resampling.LANCZOS)
    arr = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0)
    arr = arr[None] if arr.ndim == 2 else arr.permute(2, 0, 1)  # [C, H, W]
    return (arr * 2 - 1 if mode == "RGB" else arr)[None]


def inpaint_concat(
    model: Any, init: torch.Tensor, mask: torch.Tensor, small: torch.Tensor
) -> torch.Tensor:
    """c_concat [1, 1 + C, h, w] of an inpainting model: mask on the latent grid, E(masked image)."""
    masked = init * (mask < 0.5)  # keep where mask == 0
    if hasattr(model, "concat_conditioning"):
        keys = getattr(model, "concat_keys", ("mask", "masked_image"))
        mkey = getattr(model, "masked_image_key", "masked_image")
        batch = {
            k: (masked if k == mkey else mask).permute(0, 2, 3, 1) for k in keys
        }  # [1, H, W, C]
        return model.concat_conditioning(batch, small.shape)
    z = model.get_first_stage_encoding(model.encode_first_stage(masked))
    return torch.cat([small[:1], z], dim=1)  # [1, 1 + C, h, w]


def _autocast(args: argparse.Namespace, device: torch.device) -> Any:
    if args.precision == "autocast" and device.type == "cuda":
        return torch.autocast(device.type, dtype=torch.float16)
    return contextlib.nullcontext()


def latent_geometry(
    model: Any, args: argparse.Namespace, init: torch.Tensor | None
) -> tuple[int, int, int, int]:
    """(C, H, W, f) of the sample: flags, else the init image, else the model's configured size."""
    ddcfg = getattr(getattr(model.first_stage_model, "encoder", None), "ch_mult", None)
    f = args.f or (2 ** (len(ddcfg) - 1) if ddcfg else 8)
    if ddcfg is None and hasattr(model, "checkpoint_info"):
        dd = model.checkpoint_info["config"]["model"]["params"]["first_stage_config"]["params"][
            "ddconfig"
        ]
        f = args.f or 2 ** (len(dd["ch_mult"]) - 1)
    c = args.C or int(getattr(model, "channels", 4))
    size = int(getattr(model, "image_size", 64)) * f
    h = args.H or (init.shape[-2] if init is not None else size)
    w = args.W or (init.shape[-1] if init is not None else size)
    if h % f or w % f:
        raise CommandError(f"--H {h} and --W {w} must be multiples of the downsampling factor {f}.")
    return c, h, w, f


def run(mode: str, argv: list[str] | None = None) -> list[Path]:
    """Parse flags, load the model, sample, write samples/NNNNN.png and a grid; returns the paths."""
    args = build_parser(mode).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.attention_slice is not None:
        os.environ["LDM_ATTENTION_SLICE"] = str(args.attention_slice)
    if not Path(args.ckpt).exists():
        raise CommandError(f"--ckpt {args.ckpt}: no such file or folder.")
    if args.config and not Path(args.config).is_file():
        raise CommandError(f"--config {args.config}: no such file.")
    name = sampler_name(args)
    device = pick_device(args.device)
    torch.manual_seed(args.seed)  # posterior samples of init images use the global generator
    from ldm.checkpoint import load_model
    from ldm.checkpoint.loader import file_hash
    from ldm.samplers import cfg_model_fn, sample

    model = load_model(
        args.ckpt,
        config=args.config,
        device=device,
        use_ema=args.use_ema,
        prediction=args.prediction,
        unsafe=args.unsafe,
    )
    model_hash = file_hash(args.ckpt)
    init = mask = None
    if mode in ("img2img", "inpaint"):
        size = (args.W, args.H) if args.W and args.H else None
        init = load_image(args.init_img, size).to(device)
    if mode == "inpaint":
        mask = load_image(args.mask, (init.shape[-1], init.shape[-2]), mode="L").to(device)
        mask = (mask > 0.5).float()  # [1, 1, H, W], 1 = repaint
    c_lat, h, w, f = latent_geometry(model, args, init)
    outdir = Path(args.outdir)
    sample_dir = outdir / "samples"
    sample_dir.mkdir(parents=True, exist_ok=True)
    base = len(list(sample_dir.glob("*.png")))
    gen = torch.Generator().manual_seed(args.seed)
    fixed = (
        torch.randn(args.n_samples, c_lat, h // f, w // f, generator=gen)
        if args.fixed_code
        else None
    )
    written, grid_items = [], []
    params_common = {
        "seed": args.seed,
        "sampler": name,
        "karras": bool(args.karras),
        "steps": args.steps,
        "scale": args.scale,
        "size": f"{w}x{h}",
        "eta": args.ddim_eta,
        "model": Path(args.ckpt).name,
        "model_hash": model_hash,
        "mode": mode,
    }
    if mode != "txt2img":
        params_common["strength"] = args.strength
    options: dict[str, Any] = {"generator": gen}
    if name == "ddim":
        options["eta"] = args.ddim_eta
    if args.karras:
        options["karras"] = True
    decode = model.decode_first_stage
    with torch.no_grad(), _autocast(args, device):
        for n in range(args.n_iter):
            for batch in prompts(args):
                b = len(batch)
                cond = model.get_learned_conditioning(batch)
                uncond = (
                    model.get_learned_conditioning([args.negative_prompt] * b)
                    if args.scale != 1.0
                    else None
                )
                x_T = (
                    fixed[:b]
                    if fixed is not None
                    else torch.randn(b, c_lat, h // f, w // f, generator=gen)
                ).to(device)
                extra = dict(options)
                apply = model.apply_model
                if init is not None:
                    z0 = model.get_first_stage_encoding(model.encode_first_stage(init)).expand(
                        b, -1, -1, -1
                    )
                    extra.update(x0=z0, strength=args.strength)
                if mask is not None:
                    small = torch.nn.functional.interpolate(mask, size=(h // f, w // f)).expand(
                        b, -1, -1, -1
                    )
                    unet_in = getattr(
                        getattr(model.model, "diffusion_model", None), "in_channels", c_lat
                    )
                    if unet_in == 2 * c_lat + 1:  # inpainting U-Net: mask + masked image latent
                        concat = inpaint_concat(model, init, mask, small).expand(b, -1, -1, -1)
                        cond = {"c_concat": [concat], "c_crossattn": [cond]}
                        if uncond is not None:
                            uncond = {"c_concat": [concat], "c_crossattn": [uncond]}
                        extra.pop("x0", None)
                        extra.pop("strength", None)
                    else:  # plain model: keep the unmasked latent (mask 1 = keep x0)
                        extra.update(mask=1.0 - small)
                model_fn = (
                    cfg_model_fn(apply, cond, uncond, args.scale)
                    if uncond is not None
                    else (lambda x, t, c=cond, fn=apply: fn(x, t, c))
                )
                z = sample(
                    model_fn,
                    x_T,
                    sampler=name,
                    steps=args.steps,
                    alphas_cumprod=model.alphas_cumprod,
                    parameterization=model.parameterization,
                    **extra,
                )
                if args.tiled_decode:
                    x = decode_tiled(lambda t: decode_sliced(decode, t), z)
                else:
                    x = decode_sliced(decode, z)
                x = ((x.float() + 1) / 2).clamp(0, 1).cpu()
                for i, img in enumerate(x):
                    params = {
                        "prompt": batch[i],
                        "negative_prompt": args.negative_prompt,
                        "iteration": n,
                        "index": i,
                        **params_common,
                    }
                    if not args.skip_save:
                        written.append(save_png(to_pil(img), sample_dir / f"{base:05}.png", params))
                        base += 1
                grid_items.append((x, batch))
    if not args.skip_grid and grid_items:
        from torchvision.utils import make_grid

        allx = torch.cat([g for g, _ in grid_items])
        grid = make_grid(allx, nrow=args.n_rows or args.n_samples)
        grid_count = len(list(outdir.glob("grid-*.png")))
        params = {
            "prompt": grid_items[0][1][0],
            "negative_prompt": args.negative_prompt,
            **params_common,
        }
        written.append(save_png(to_pil(grid), outdir / f"grid-{grid_count:04}.png", params))
    logger.info("Wrote %d image(s) to %s", len(written), outdir)
    return written


def main(mode: str, argv: list[str] | None = None) -> int:
    """Console entry: user mistakes print one line to stderr and exit 2."""
    from ldm.checkpoint.detect import DetectionError
    from ldm.checkpoint.report import CheckpointMismatchError
    from ldm.checkpoint.safe_load import UnsafeCheckpointError

    try:
        run(mode, argv)
    except (
        CommandError,
        FileNotFoundError,
        DetectionError,
        CheckpointMismatchError,
        UnsafeCheckpointError,
    ) as err:
        sys.stderr.write(f"ldm-{mode}: error: {err}\n")
        return 2
    return 0


def txt2img_main() -> int:
    return main("txt2img")


def img2img_main() -> int:
    return main("img2img")


def inpaint_main() -> int:
    return main("inpaint")
