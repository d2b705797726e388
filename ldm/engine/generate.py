"""``generate``: the only path from prompts or a batch to images (or latents).

Every way of making images goes through here: ``model.generate`` (Python API, ``ldm.load_model``
users), the sampling commands, ``ImageLogger`` (``log_images``), ``ShapesEvaluation``,
``DDPM.sample`` and the CompVis ``DDIMSampler`` / ``PLMSSampler`` / ``DPMSolverSampler`` facades.
Steps: sampling defaults -> conditioning and unconditional conditioning (Conditioner) -> start
noise from the seed -> img2img / inpainting inputs -> guider around the network -> the solver
driver with the model's denoiser -> decode.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ldm.engine.defaults import resolve_sampling
from ldm.engine.micro_conditioning import fill_micro_conditioning
from ldm.engine.precision import model_dtype, sampling_precision
from ldm.samplers import sample
from ldm.samplers.guiders import guider_for

OUTPUTS = ("pil", "tensor", "latent")
DECODES = ("auto", "full", "sliced", "tiled")
VP_SOLVERS = ("ddpm", "ddim", "plms")


def load_image(image: Any, mode: str = "RGB") -> torch.Tensor:
    """PIL image, path or tensor -> [B, C, H, W] float in [0, 1] (mode "L": one channel)."""
    from PIL import Image

    if isinstance(image, torch.Tensor):
        t = image.detach().float()
        t = t[None] if t.ndim == 3 else t
        if t.ndim != 4:
            raise ValueError(
                f"image tensor must be [B, C, H, W] or [C, H, W], got {tuple(t.shape)}"
            )
        if t.min() < -1e-6 or t.max() > 1 + 1e-6:
            raise ValueError("image tensors for generate() are in [0, 1]")
        return t
    if isinstance(image, str | Path):
        if not Path(image).is_file():
            raise FileNotFoundError(f"image {image}: no such file")
        image = Image.open(image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image, a path or a tensor, got {type(image).__name__}")
    arr = np.asarray(image.convert(mode), dtype=np.float32) / 255.0
    t = torch.from_numpy(arr)
    t = t[None] if t.ndim == 2 else t.permute(2, 0, 1)  # [C, H, W]
    return t[None]


def latent_factor(model: Any) -> int:
    """Pixels per latent cell of the model's first stage (1 in pixel space)."""
    fs = getattr(model, "first_stage_model", None)
    levels = getattr(getattr(fs, "encoder", None), "num_resolutions", None)
    return 2 ** (int(levels) - 1) if levels else 1  # no encoder: pixel space / identity


def grid_sides(value: int, f: int) -> tuple[int, int]:
    """The multiples of ``f`` next to ``value``: (the largest <= value, at least f; the next)."""
    low = max(f, value - value % f)
    return low, low + f


def snap_to_grid(value: int, f: int) -> int:
    """``value`` rounded down to a multiple of ``f``, at least ``f`` (an init image's side)."""
    return grid_sides(value, f)[0]


def _prompts(prompt: str | Sequence[str] | None, n: int) -> list[str] | None:
    if prompt is None:
        return None
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise TypeError("prompt must be a string or a non-empty list of strings")
    return [p for p in prompts for _ in range(n)]


def _to_output(x: torch.Tensor, output: str) -> Any:
    images = ((x.float() + 1) / 2).clamp(0, 1).cpu()  # [B, 3, H, W] in [0, 1]
    if output == "tensor":
        return images
    from ldm.engine.decode import to_pil

    return [to_pil(img) for img in images]


def generate(
    model: Any,
    prompt: str | Sequence[str] | None = None,
    *,
    loras: Sequence[Any] | None = None,
    embeddings: Sequence[Any] | None = None,
    **kwargs: Any,
) -> Any:
    """See :func:`_generate`; with a ``seed`` every random draw of the call (start noise, solver
    noise, posterior samples of encoded images) comes from it, the global RNG left untouched.
    ``loras``: ``[(path, scale)]`` or ``"PATH[:SCALE]"`` (kohya or diffusers files), merged for
    this call; ``embeddings``: textual-inversion files (A1111 or diffusers) whose tokens the
    prompts may use (``ldm.adapters.sampling``)."""
    if loras or embeddings:
        from ldm.adapters.sampling import adapters_applied

        with adapters_applied(model, loras, embeddings, kwargs.get("use_ema")):
            return generate(model, prompt, **kwargs)
    seed = kwargs.get("seed")
    if seed is None:
        return _generate(model, prompt, **kwargs)
    device = model.device
    devices = [] if device.type in ("cpu", "meta") else [device]
    kind = device.type if devices else "cuda"
    with torch.random.fork_rng(devices=devices, device_type=kind):
        torch.manual_seed(int(seed))
        return _generate(model, prompt, **kwargs)


@torch.no_grad()
def _generate(
    model: Any,
    prompt: str | Sequence[str] | None = None,
    *,
    negative_prompt: str | Sequence[str] | None = None,
    sampler: str | None = None,
    steps: int | None = None,
    guidance_scale: float | None = None,
    seed: int | None = None,
    height: int | None = None,
    width: int | None = None,
    init_image: Any = None,
    strength: float | None = None,
    mask: Any = None,
    batch: Mapping[str, Any] | None = None,
    output: str = "pil",
    num_images_per_prompt: int = 1,
    guidance_rescale: float = 0.0,
    cond: Any = None,
    uncond: Any = None,
    x_T: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    use_ema: bool | None = None,
    wrap_model_fn: Callable[[Callable], Callable] | None = None,
    decode: str = "auto",
    solver_options: Mapping[str, Any] | None = None,
    original_size: Sequence[int] | None = None,
    crops_coords_top_left: Sequence[int] | None = None,
    target_size: Sequence[int] | None = None,
    aesthetic_score: float | None = None,
    denoising_start: float | None = None,
    denoising_end: float | None = None,
    precision: str | None = None,
    **sampler_options: Any,
) -> Any:
    """Images for ``prompt`` (or the conditioning inputs of a data ``batch``, or a ready ``cond``).

    None means the model's recorded sampling defaults (``model.sampling_defaults``). ``output``:
    "pil" (list of images), "tensor" (B x 3 x H x W in [0, 1]) or "latent" (the sampler's x_0).
    ``init_image`` (img2img, with ``strength``) and ``mask`` (inpainting, 1 / white = repaint) are
    PIL images, paths or tensors in [0, 1]. ``seed`` fixes the start noise and every random draw
    of the call; without it (and without ``generator``) the global RNG is used. Extra keywords go
    to the sampler (``eta``, ``karras``, ``order``, ...); ``solver_options`` too (for names that are
    also arguments here, e.g. a latent ``mask`` with ``x0``). ``decode``: "full", "sliced" (one image
    at a time), "tiled" (exact strips: the same image, less memory), or "auto" (sliced from
    256 x 256 pixels up).

    SDXL: ``original_size``, ``crops_coords_top_left``, ``target_size`` (pairs in pixels, default:
    the size generated and (0, 0)) and ``aesthetic_score`` (refiner, default 6.0) feed the size
    embedders; ``denoising_end`` stops at that fraction of the noise levels and returns the noisy
    latent (use ``output="latent"``), ``denoising_start`` continues from it with ``x_T`` = that
    latent (a refiner; diffusers' semantics, see ``ldm.samplers.driver.run_solver``).

    ``precision``: the float type the denoiser samples in, "full" (fp32), "bf16", "fp16" or
    "autocast" (the device's best: bf16 on a CPU with AMX / AVX512-BF16 for a network of 50M
    parameters or more, fp16 on CUDA, else fp32); None: the model's recorded default, else ``$LDM_PRECISION``, else "autocast"
    (``ldm.engine.precision``). The first stage always decodes in float32.
    """
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {list(OUTPUTS)}, got {output!r}")
    if decode not in DECODES:
        raise ValueError(f"decode must be one of {list(DECODES)}, got {decode!r}")
    conditioner = getattr(model, "conditioner", None)
    conditional = conditioner is not None and bool(conditioner.entries)
    if not conditional and guidance_scale is None:
        guidance_scale = 1.0  # nothing to guide with
    sampler, steps, guidance_scale, options = resolve_sampling(
        model, sampler, steps, guidance_scale, {**sampler_options, **(solver_options or {})}
    )
    device = model.device
    dtype = model_dtype(model, precision)
    if generator is None and seed is not None:
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
    inputs: dict[str, Any] = {}
    if batch is not None and conditional:
        inputs = {k: batch[k] for k in conditioner.input_keys if k in batch}
    n = None
    if x_T is not None:
        n = x_T.shape[0]
    elif cond is not None:
        n = _batch_size(cond)
    elif batch is not None:
        n = len(next(iter(batch.values())))
    prompts = _prompts(prompt, num_images_per_prompt)
    if prompts is not None and cond is not None:
        raise ValueError("give prompts or a ready conditioning (cond=), not both")
    if prompts is not None:
        if not conditional or conditioner.text_key() is None:
            raise ValueError(f"{type(model).__name__} is not conditioned on text; pass prompt=None")
        inputs[conditioner.text_key()] = prompts
        if n is not None and n != len(prompts):
            raise ValueError(f"{len(prompts)} prompts for a start noise of batch {n}")
        n = len(prompts)
    if n is None:
        if x_T is not None:
            n = x_T.shape[0]
        elif conditional and cond is None:
            raise ValueError("this model is conditional: give a prompt, a batch or cond=")
        else:
            n = num_images_per_prompt
    # latent geometry: the start noise, the init image, or height / width, else the model's size
    c_lat, h_lat, w_lat = model.latent_shape()
    handed_over = x_T is not None
    if x_T is not None:
        h_lat, w_lat = x_T.shape[-2:]
    f = latent_factor(model)
    init = load_image(init_image).to(device) * 2 - 1 if init_image is not None else None
    if height or width or init is not None:
        # an init image without height / width keeps its size, rounded down to the latent grid
        # (any multiple of f: the U-Net upsamples to its skips' sizes)
        h = height or (snap_to_grid(init.shape[-2], f) if init is not None else h_lat * f)
        w = width or (snap_to_grid(init.shape[-1], f) if init is not None else w_lat * f)
        for name, side in (("height", h), ("width", w)):
            if side % f:
                raise ValueError(
                    f"{name} {side} must be a multiple of {f} (the latent factor); use "
                    "{} or {}".format(*grid_sides(side, f))
                )
        if init is not None and tuple(init.shape[-2:]) != (h, w):
            init = torch.nn.functional.interpolate(init, size=(h, w), mode="bicubic").clamp(-1, 1)
        h_lat, w_lat = h // f, w // f
    if x_T is None:
        shape = (n, c_lat, h_lat, w_lat)
        if generator is not None:
            x_T = torch.randn(shape, generator=generator, device=generator.device)
        else:
            x_T = torch.randn(shape, device=device)
    x_T = x_T.to(device)
    if init is not None and init.shape[0] not in (1, n):
        raise ValueError(f"{init.shape[0]} init images for {n} samples")
    # inpainting: an inpainting model takes [mask, E(masked image)] as concat conditioning; any
    # other model keeps the known latent outside the mask (blending, 1 = keep)
    z0 = None
    if init is not None:
        z0 = model.encode_latent(init, generator).expand(n, -1, -1, -1)
        options.update(x0=z0, strength=1.0 if strength is None else float(strength))
    if mask is not None:
        if init is None:
            raise ValueError("mask (inpainting) needs init_image")
        m = (load_image(mask, "L").to(device) > 0.5).float()  # [1, 1, H, W], 1 = repaint
        m = torch.nn.functional.interpolate(m, size=init.shape[-2:])
        if conditional and getattr(conditioner, "concat_keys", None):
            inputs.update(conditioner.inpaint_inputs(init, m, n))
            options.pop("x0"), options.pop("strength")
        else:
            small = torch.nn.functional.interpolate(m, size=(h_lat, w_lat)).expand(n, -1, -1, -1)
            options["mask"] = 1.0 - small
    elif strength is not None and init is None:
        raise ValueError("strength (img2img) needs init_image")
    micro = {
        "original_size": original_size,
        "crops_coords_top_left": crops_coords_top_left,
        "target_size": target_size,
        "aesthetic_score": aesthetic_score,
    }
    if conditional and cond is None:
        fill_micro_conditioning(
            conditioner.input_keys, inputs, n, h_lat * f, w_lat * f, micro, type(model).__name__
        )
    elif any(v is not None for v in micro.values()):
        given = sorted(k for k, v in micro.items() if v is not None)
        raise ValueError(f"{given} are conditioning inputs: they cannot change a ready cond=")
    for name, value in (("denoising_start", denoising_start), ("denoising_end", denoising_end)):
        if value is not None:
            options[name] = float(value)
    if denoising_start is not None and not handed_over:
        raise ValueError("denoising_start continues a hand-off latent: pass it as x_T")
    outputs = None
    if cond is None and conditional:
        outputs = conditioner.embed(inputs)
        cond = conditioner.assemble(outputs)
    guider = guider_for(guidance_scale, guidance_rescale)
    if guider.needs_uncond and uncond is None:
        if not conditional:
            raise ValueError(f"{type(model).__name__} is unconditional: guidance needs a condition")
        if not inputs:
            raise ValueError("guidance with a given cond= needs uncond= (or pass prompts / batch)")
        uncond = conditioner.uncond(inputs, n, negative_prompt, outputs)
    if guider.needs_uncond and conditional:  # a long prompt and a short negative one, or so
        cond, uncond = conditioner.match_lengths(cond, uncond)
    model_fn = guider.model_fn(model.apply_model, cond, uncond)
    if wrap_model_fn is not None:
        model_fn = wrap_model_fn(model_fn)
    if sampler in VP_SOLVERS and "clip_denoised" not in options:
        options["clip_denoised"] = bool(getattr(model, "clip_denoised", False))
    use_ema = bool(getattr(model, "use_ema", False)) if use_ema is None else use_ema
    scope = (
        model.ema_scope()
        if use_ema and getattr(model, "use_ema", False)
        else contextlib.nullcontext()
    )
    was_training = model.training
    model.eval()
    try:
        with scope, sampling_precision(dtype, device):
            z = sample(
                model_fn,
                x_T,
                sampler=sampler,
                steps=steps,
                denoiser=model.denoiser,
                generator=generator,
                callback=callback,
                disable=options.pop("disable", True),
                **options,
            )
    finally:
        model.train(was_training)
    z = z.float()
    if output == "latent":
        return z
    return _to_output(decode_latents(model, z, decode), output)


def decode_latents(model: Any, z: torch.Tensor, mode: str = "auto") -> torch.Tensor:
    """D(z) in [-1, 1]: whole batch, one sample at a time, or one sample at a time in exact
    strips (tiled: the same image, less memory)."""
    from ldm.engine.decode import decode_sliced, decode_tiled

    f = latent_factor(model)
    if mode == "auto":
        mode = "sliced" if z.shape[-2] * z.shape[-1] * f * f >= 256 * 256 else "full"
    z = z.float()
    with torch.autocast(device_type=z.device.type, enabled=False):  # the VAE decodes in fp32
        if mode == "full":
            return model.decode_latent(z)
        if mode == "tiled":
            return decode_tiled(model, z)
        return decode_sliced(model.decode_latent, z)


def _batch_size(cond: Any) -> int:
    if isinstance(cond, torch.Tensor):
        return cond.shape[0]
    if isinstance(cond, Mapping):
        return _batch_size(next(iter(cond.values())))
    if isinstance(cond, list | tuple):
        return _batch_size(cond[0])
    raise TypeError(f"cannot tell the batch size of a conditioning of type {type(cond).__name__}")
