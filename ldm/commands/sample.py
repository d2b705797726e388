"""txt2img / img2img / inpaint commands with the CompVis flags (plus --sampler, --karras, ...)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import time
from pathlib import Path
from typing import Any

import torch

from ldm.commands.memory_advice import is_out_of_memory, out_of_memory_message
from ldm.commands.pngmeta import save_png, to_pil
from ldm.commands.sample_checks import (
    CommandError,
    check_inputs,
    check_mode,
    check_size,
    device_from_flag,
    read_prompts,
)
from ldm.commands.sample_flags import add_compat_flags, apply_compat_flags
from ldm.commands.validation import MAX_SEED, finite_float, float_in, int_in
from ldm.disk_errors import writing
from ldm.errors import RunFailure, exit_code, report

logger = logging.getLogger(__name__)


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
    one = " (--indir: 1, one result per image)" if mode == "inpaint" else ""
    p.add_argument("--n_samples", type=int_in(1), default=None, help=f"batch size (default 3{one})")
    p.add_argument(
        "--n_iter", type=int_in(1), default=None, help=f"batches per prompt (default 2{one})"
    )
    p.add_argument(
        "--steps",
        "--ddim_steps",
        dest="steps",
        type=int_in(1),
        default=None,
        help="sampling steps (default: the model's recorded defaults, else 50)",
    )
    p.add_argument(
        "--sampler",
        type=str,
        default=None,
        help="sampler name (ldm.samplers.SAMPLERS); default: the model's recorded one, else ddim",
    )
    p.add_argument("--plms", action="store_true", help="same as --sampler plms")
    p.add_argument("--dpm_solver", action="store_true", help="same as --sampler dpmpp_2m")
    p.add_argument("--karras", action="store_true", help="Karras sigmas for sigma-based samplers")
    p.add_argument("--ddim_eta", "--eta", dest="ddim_eta", type=float_in(0.0), default=None)
    p.add_argument(
        "--scale",
        type=finite_float,
        default=None,
        help="guidance scale (default: the model's recorded one, else "
        f"{7.5 if mode == 'txt2img' else 5.0})",
    )
    size = int_in(1, 16384)
    p.add_argument("--H", type=size, default=None, help="image height (default: the model's size)")
    p.add_argument("--W", type=size, default=None, help="image width (default: the model's size)")
    p.add_argument(
        "--C", type=int_in(1), default=None, help="latent channels (default: the model's)"
    )
    p.add_argument(
        "--f", type=int_in(1), default=None, help="downsampling factor (default: the autoencoder's)"
    )
    p.add_argument("--seed", type=int_in(0, MAX_SEED), default=42)
    p.add_argument(
        "--precision",
        choices=["full", "fp32", "bf16", "fp16", "autocast", "auto"],
        default=None,
        help="float type of the denoiser: full (= fp32), bf16, fp16, or autocast (the device's "
        "best: fp16 on CUDA, bf16 on a CPU with AMX / AVX512-BF16 for networks of 50M "
        "parameters or more, else fp32). Default: the "
        "model's recorded one, else autocast. The VAE always decodes in fp32.",
    )
    p.add_argument(
        "--config", type=str, default=None, help="model config (default: detected / embedded)"
    )
    p.add_argument(
        "--ckpt", type=str, required=True, help=".ckpt / .safetensors / diffusers folder"
    )
    p.add_argument("--skip_grid", action="store_true")
    p.add_argument("--skip_save", action="store_true")
    p.add_argument("--fixed_code", action="store_true", help="same start noise for every batch")
    p.add_argument("--n_rows", type=int_in(0), default=0, help="grid rows (default n_samples)")
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
        help="decode the VAE in strips: the same image with less memory",
    )
    p.add_argument(
        "--compile",
        nargs="?",
        const="inductor",
        default=None,
        metavar="BACKEND",
        help="run the U-Net through torch.compile (default backend inductor); the first "
        "batch pays the compilation, its time is logged apart",
    )
    p.add_argument(
        "--attention-slice",
        dest="attention_slice",
        type=int_in(0),
        default=None,
        help="attention in slices of this many queries (less memory; 0: unsliced)",
    )
    adapters = p.add_argument_group("adapters (LoRA, textual inversion)")
    adapters.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="PATH[:SCALE]",
        help="a LoRA file (kohya or diffusers .safetensors) merged with SCALE (default 1); "
        "repeat for several",
    )
    adapters.add_argument(
        "--embedding",
        action="append",
        default=[],
        metavar="PATH",
        help="a textual-inversion file (A1111 .pt/.safetensors or diffusers "
        "learned_embeds.safetensors); its token (file name or stored key) works in prompts; "
        "repeatable",
    )
    sdxl = p.add_argument_group("SDXL micro-conditioning and refiner")
    sdxl.add_argument(
        "--original-size",
        "--original_size",
        dest="original_size",
        type=size,
        nargs=2,
        metavar=("H", "W"),
        default=None,
        help="the size the model is told the image had (default: the size generated)",
    )
    sdxl.add_argument(
        "--crop",
        "--crops-coords-top-left",
        dest="crop",
        type=int_in(0),
        nargs=2,
        metavar=("TOP", "LEFT"),
        default=None,
        help="crop offsets the model is told (default 0 0: an uncropped image)",
    )
    sdxl.add_argument(
        "--target-size",
        "--target_size",
        dest="target_size",
        type=size,
        nargs=2,
        metavar=("H", "W"),
        default=None,
        help="target size (default: the size generated)",
    )
    sdxl.add_argument(
        "--aesthetic-score",
        "--aesthetic_score",
        dest="aesthetic_score",
        type=finite_float,
        default=None,
        help="refiner: the aesthetic score to condition on (default 6.0; unconditional 2.5)",
    )
    sdxl.add_argument(
        "--refiner",
        type=str,
        default=None,
        help="refiner checkpoint (.safetensors / .ckpt / diffusers folder): takes over the "
        "latents for the last part of the noise levels",
    )
    sdxl.add_argument(
        "--refiner-switch",
        "--refiner_switch",
        dest="refiner_switch",
        type=float_in(0.0, 1.0, low_open=True, high_open=True),
        default=0.8,
        help="fraction of the noise levels the base model runs before the refiner takes over "
        "(diffusers' denoising_end / denoising_start; default 0.8)",
    )
    sdxl.add_argument(
        "--refiner-config", dest="refiner_config", type=str, default=None, help="refiner config"
    )
    if mode in ("img2img", "inpaint"):
        p.add_argument(
            "--init-img",
            "--init_img",
            "--image",
            dest="init_img",
            type=str,
            required=mode == "img2img",  # inpaint: or --indir
        )
        p.add_argument(
            "--strength",
            type=float_in(0.0, 1.0, low_open=mode == "img2img"),
            default=0.75 if mode == "img2img" else 1.0,
            help="how much of the noise schedule to run over the image"
            + (" (0 < s <= 1)" if mode == "img2img" else " (0 <= s <= 1)"),
        )
    if mode == "inpaint":
        p.add_argument("--mask", type=str, default=None, help="white = repaint, black = keep")
    add_compat_flags(p, mode)
    return p


def sampler_name(args: argparse.Namespace) -> str | None:
    """--sampler, else --plms / --dpm_solver, else None (the model's recorded sampler, else ddim).

    --sampler takes other names of our samplers too ("DPM++ 2M Karras", "k_euler_a",
    "EulerDiscreteScheduler"; ``ldm.samplers.aliases``). Flags that choose different samplers
    (``--plms --dpm_solver``, ``--plms --sampler euler``) are an error.
    """
    from ldm.samplers import resolve_sampler

    chosen: list[tuple[str, str]] = []  # (flag as given, registered name)
    if args.sampler is not None:
        try:
            chosen.append((f"--sampler {args.sampler}", resolve_sampler(args.sampler)[0]))
        except ValueError as err:
            text = str(err)
            if text.startswith("unknown sampler "):
                text = "Unknown --sampler " + text.removeprefix("unknown sampler ")
            else:
                text = f"--sampler: {text}."
            raise CommandError(text) from None
    if args.plms:
        chosen.append(("--plms", "plms"))
    if args.dpm_solver:
        chosen.append(("--dpm_solver", "dpmpp_2m"))
    if len({name for _, name in chosen}) > 1:
        flags = " and ".join(f"{flag} ({name})" for flag, name in chosen)
        raise CommandError(f"{flags} choose different samplers; give only one of them.")
    if args.sampler is not None:
        return args.sampler
    return chosen[0][1] if chosen else None


#: sampler option -> the flag that sets it
OPTION_FLAGS = {"eta": "--ddim_eta", "karras": "--karras"}

#: generate() argument -> its command-line flag (the batch keys: ARGUMENTS)
MICRO_FLAGS = {
    "original_size": "--original-size",
    "crops_coords_top_left": "--crop",
    "target_size": "--target-size",
    "aesthetic_score": "--aesthetic-score",
}


def micro_conditioning(
    args: argparse.Namespace, model: Any, refiner: Any | None
) -> dict[str, dict[str, Any]]:
    """The SDXL micro-conditioning flags as generate() keywords for the base and the refiner, each
    getting those it is conditioned on; a flag neither model takes is an error."""
    given = {
        "original_size": args.original_size,
        "crops_coords_top_left": args.crop,
        "target_size": args.target_size,
        "aesthetic_score": args.aesthetic_score,
    }
    from ldm.engine.micro_conditioning import ARGUMENTS

    out: dict[str, dict[str, Any]] = {"base": {}, "refiner": {}}
    for role, m in (("base", model), ("refiner", refiner)):
        keys = set(m.conditioner.input_keys) if m is not None and m.conditioner else set()
        takes = {ARGUMENTS[k] for k in keys if k in ARGUMENTS}
        out[role] = {k: v for k, v in given.items() if v is not None and k in takes}
    for name, value in given.items():
        if value is not None and not any(name in part for part in out.values()):
            raise CommandError(
                f"{MICRO_FLAGS[name]}: the model{'s' if refiner is not None else ''} given "
                "are not conditioned on it (SDXL base takes --original-size, --crop, "
                "--target-size; the refiner --original-size, --crop, --aesthetic-score)."
            )
    return out


def pick_device(name: str | None) -> torch.device:
    """``--device`` (checked: a device this machine has), else cuda, mps, cpu."""
    return device_from_flag(name)


def prompts(args: argparse.Namespace) -> list[list[str]]:
    """Batches of prompts: n_samples copies of --prompt, or chunks of --from-file lines (each
    line --repeat times, as Stability's script)."""
    if args.from_file:
        if not Path(args.from_file).is_file():
            raise CommandError(f"--from-file {args.from_file}: no such file.")
        lines = read_prompts(args.from_file)
        lines = [line for line in lines for _ in range(getattr(args, "repeat", 1))]
        return [lines[i : i + args.n_samples] for i in range(0, len(lines), args.n_samples)]
    return [[args.prompt] * args.n_samples]


def image_jobs(args: argparse.Namespace, outdir: Path) -> list[tuple[Any, Any, Path | None]]:
    """(init image, mask, output file or None) to sample: --indir's pairs (each written to
    --outdir/X.png), else the one --init-img / --mask (None for txt2img)."""
    indir = getattr(args, "indir", None)
    if indir is None:
        return [(getattr(args, "init_img", None), getattr(args, "mask", None), None)]
    pairs = args.indir_pairs  # read by apply_compat_flags, before the model loaded
    return [(str(image), str(mask), outdir / image.name) for image, mask in pairs]


def run(mode: str, argv: list[str] | None = None) -> list[Path]:
    """Parse flags, load the model, ``model.generate`` each batch, write samples/NNNNN.png and a grid.

    Batch k (counting over iterations and prompt batches) uses seed ``--seed + k`` (``--fixed_code``:
    ``--seed`` for every batch), so any image is reproduced by ``ldm.load_model(ckpt).generate(
    prompts, seed=...)`` with the settings written into its PNG.
    """
    args = build_parser(mode).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    apply_compat_flags(args, mode)
    check_inputs(args)
    name = sampler_name(args)
    device = pick_device(args.device)
    from ldm.samplers.options import SamplerOptionError

    try:
        return _sample(mode, args, name, device)
    except SamplerOptionError as err:
        flags = [OPTION_FLAGS.get(o, o) for o in err.unknown]
        raise CommandError(
            f"{', '.join(flags)}: {err}. Leave {'them' if len(flags) > 1 else 'it'} out or choose "
            "another --sampler."
        ) from err
    except Exception as err:
        if not is_out_of_memory(err):
            raise
        raise RunFailure(out_of_memory_message(err, args, device, f"running ldm-{mode}")) from err


def _load(args: argparse.Namespace, flag: str, device: torch.device, **kwargs: Any) -> Any:
    """``load_model`` of a flag's file; a damaged or foreign file names the flag."""
    from ldm.checkpoint import load_model
    from ldm.checkpoint.safe_load import CheckpointFormatError

    path = getattr(args, flag.lstrip("-").replace("-", "_"))
    try:
        return load_model(path, device=device, use_ema=args.use_ema, unsafe=args.unsafe, **kwargs)
    except CheckpointFormatError as err:
        raise CommandError(f"{flag} {err}") from err


@contextlib.contextmanager
def _refiner_embeddings(refiner: Any | None, embeddings: list[str]) -> Any:
    """The embeddings in the refiner too (A1111 and diffusers condition SDXL's refiner with an
    SDXL embedding's clip_g part); a file with no part for the refiner's encoder is left out
    with a log line. LoRAs stay on the base model, as there."""
    with contextlib.ExitStack() as stack:
        if refiner is not None:
            from ldm.adapters.embeddings_errors import EmbeddingError
            from ldm.adapters.embeddings_loader import load_embeddings

            for path in embeddings:
                try:
                    stack.enter_context(load_embeddings(refiner, [path]))
                except EmbeddingError as err:
                    logger.info("--embedding %s: not for the refiner (%s)", path, err)
        yield


def _compile_settings(backend: str | None) -> contextlib.AbstractContextManager:
    """Inductor's freezing while sampling: the weights never change there, so the compiled graph
    folds them in as constants (prepacked convolution and matmul weights). SD v1 U-Net forward at
    fp32 (benchmarks/bench_unet.py --compile --freeze): 0.63x of eager diffusers' CPU time, where
    our eager U-Net takes 0.91x. Training never freezes (its weights change)."""
    if backend != "inductor":
        return contextlib.nullcontext()
    from torch._inductor import config as inductor_config

    return inductor_config.patch(freezing=True)


def _sample(mode: str, args: argparse.Namespace, name: str | None, device: torch.device) -> list:
    from ldm.checkpoint.loader import file_hash
    from ldm.engine.defaults import resolve_sampling
    from ldm.engine.precision import NAMES, model_dtype
    from ldm.modules.attention_backends import attention_slicing

    if args.compile:  # before any model work
        from torch._dynamo import list_backends

        if args.compile not in list_backends(exclude_tags=()):
            raise CommandError(
                f"--compile {args.compile}: unknown torch.compile backend; "
                f"expected one of {list_backends()} (no value: inductor)."
            )
    model = _load(args, "--ckpt", device, config=args.config, prediction=args.prediction)
    check_mode(mode, model, "--ckpt", args.ckpt)
    check_size(args, model)
    refiner = None
    if args.refiner:
        refiner = _load(args, "--refiner", device, config=args.refiner_config)
        check_mode(mode, refiner, "--refiner", args.refiner)
    from ldm.adapters.sampling import adapters_applied, describe, parse_lora

    loras = [parse_lora(spec) for spec in args.lora]  # checked with the files in check_inputs
    adapters = adapters_applied(model, loras, args.embedding)
    micro = micro_conditioning(args, model, refiner)
    options: dict[str, Any] = {}
    if args.ddim_eta is not None:
        options["eta"] = args.ddim_eta
    if args.karras:
        options["karras"] = True
    scale = args.scale
    if scale is None and "guidance_scale" not in (model.sampling_defaults or {}):
        scale = 7.5 if mode == "txt2img" else 5.0
    sampler, steps, scale, options = resolve_sampling(model, name, args.steps, scale, options)
    precision = args.precision  # None: the model's recorded one, else autocast
    dtype = model_dtype(model, precision)
    if args.compile:
        from ldm.engine.compilation import compile_network

        for net in [model] + ([refiner] if refiner is not None else []):
            compile_network(net.model.diffusion_model, {"backend": args.compile})
    logger.info("sampling in %s on %s (the VAE decodes in fp32)", NAMES[dtype], device)
    model_hash = file_hash(args.ckpt)
    outdir = Path(args.outdir)
    sample_dir = outdir / "samples"
    with writing(outdir, "the images"):
        (outdir if getattr(args, "indir", None) else sample_dir).mkdir(parents=True, exist_ok=True)
    base = len(list(sample_dir.glob("*.png")))
    written, grid_items = [], []
    params_common = {
        "sampler": sampler,
        "karras": bool(options.get("karras", False)),
        "steps": steps,
        "scale": scale,
        "eta": options.get("eta", 0.0),
        "model": Path(args.ckpt).name,
        "model_hash": model_hash,
        "mode": mode,
        "precision": NAMES[dtype],
    }
    if args.compile:
        params_common["compile"] = args.compile
    if mode != "txt2img":
        params_common["strength"] = args.strength
    if refiner is not None:
        params_common.update(refiner=Path(args.refiner).name, refiner_switch=args.refiner_switch)
    params_common.update({k: v for k, v in micro["base"].items() if v is not None})
    params_common.update(describe(loras, args.embedding))
    jobs = image_jobs(args, outdir)
    text = model.conditioner is not None and model.conditioner.text_key() is not None
    k = 0
    with (
        adapters,
        _refiner_embeddings(refiner, args.embedding),
        attention_slicing(args.attention_slice),
        _compile_settings(args.compile),
    ):
        for init_img, mask_img, target in jobs:
            for n in range(args.n_iter):
                for batch in prompts(args):
                    seed = args.seed if args.fixed_code else args.seed + k
                    k += 1
                    started = time.perf_counter()
                    common = {
                        "negative_prompt": args.negative_prompt
                        if args.negative_prompt and text
                        else None,
                        "sampler": sampler,
                        "steps": steps,
                        "guidance_scale": scale if text else 1.0,
                        "seed": seed,
                        "decode": "tiled" if args.tiled_decode else "auto",
                        "precision": precision,
                        **options,
                    }
                    x = model.generate(
                        batch if text else None,  # an unconditional model: len(batch) images
                        num_images_per_prompt=1 if text else len(batch),
                        height=args.H,
                        width=args.W,
                        init_image=init_img,
                        strength=args.strength if mode != "txt2img" else None,
                        mask=mask_img,
                        output="tensor" if refiner is None else "latent",
                        denoising_end=args.refiner_switch if refiner is not None else None,
                        **micro["base"],
                        **common,
                    )
                    if refiner is not None:  # the refiner continues the base's latents
                        x = refiner.generate(
                            batch if text else None,
                            num_images_per_prompt=1 if text else len(batch),
                            x_T=x,
                            denoising_start=args.refiner_switch,
                            output="tensor",
                            # inpainting: the refiner keeps the known region too
                            init_image=init_img if mode == "inpaint" else None,
                            mask=mask_img,
                            **micro["refiner"],
                            **common,
                        )
                    if args.compile:
                        logger.info(
                            "batch %d: %.1f s%s",
                            k,
                            time.perf_counter() - started,
                            " (includes compiling the U-Net)" if k == 1 else "",
                        )
                    for i, img in enumerate(x):
                        params = {
                            "prompt": batch[i] if text else "",  # an unconditional model
                            "negative_prompt": args.negative_prompt if text else None,
                            "seed": seed,
                            "iteration": n,
                            "index": i,
                            "size": f"{img.shape[-1]}x{img.shape[-2]}",
                            **params_common,
                        }
                        if target is not None:  # --indir: OUT/X.png, as CompVis
                            with writing(outdir, "the images"):
                                written.append(save_png(to_pil(img), target, params))
                        elif not args.skip_save:
                            with writing(outdir, "the images"):
                                png = save_png(to_pil(img), sample_dir / f"{base:05}.png", params)
                            written.append(png)
                            base += 1
                    grid_items.append((x, batch))
    if not args.skip_grid and grid_items:
        from torchvision.utils import make_grid

        allx = torch.cat([g for g, _ in grid_items])
        grid = make_grid(allx, nrow=args.n_rows or args.n_samples)
        grid_count = len(list(outdir.glob("grid-*.png")))
        params = {
            "prompt": grid_items[0][1][0] if text else "",
            "negative_prompt": args.negative_prompt if text else None,
            "seed": args.seed,
            **params_common,
        }
        with writing(outdir, "the grid"):
            written.append(save_png(to_pil(grid), outdir / f"grid-{grid_count:04}.png", params))
    logger.info("Wrote %d image(s) to %s", len(written), outdir)
    return written


def main(mode: str, argv: list[str] | None = None) -> int:
    """Console entry: a user mistake prints one line to stderr and exits 2; a fault outside the
    flags (out of memory, disk full) exits 1; argparse exits 2 on its own."""
    try:
        run(mode, argv)
    except Exception as err:
        code = exit_code(err, (CommandError,))
        if code is None:
            raise
        return report(f"ldm-{mode}", err, code)
    return 0


def txt2img_main() -> int:
    return main("txt2img")


def img2img_main() -> int:
    return main("img2img")


def inpaint_main() -> int:
    return main("inpaint")
