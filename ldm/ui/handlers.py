"""The UI's actions as plain functions: settings -> ``generate`` -> PNGs with the commands' metadata.

No gradio here: ``ldm.ui.app`` wires these to the page, the tests call them directly. Every image
of a batch is its own ``generate`` call with seed ``seed + i``, so the seed in an image's PNG (with
batch 1) reproduces that image exactly.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from ldm.commands.pngmeta import save_png
from ldm.ui.errors import UiError
from ldm.ui.models import ModelSlot
from ldm.ui.safety import DEFAULT_MAX_UPLOAD_MB, decode_upload
from ldm.ui.settings import Settings, resolve_seed

logger = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
ImageInput = str | Path | Image.Image | None


@dataclass
class UiContext:
    """What the handlers share: the model slot, the output folder and the adapter pickers."""

    models: ModelSlot
    outdir: Path
    loras: dict[str, Path] = field(default_factory=dict)
    embeddings: dict[str, Path] = field(default_factory=dict)
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_MB << 20


@dataclass
class GenerationResult:
    """The PNGs written (in order), the seed of the first and each image's metadata."""

    paths: list[Path]
    seed: int
    params: list[dict[str, Any]]
    seconds: float

    def summary(self) -> str:
        p = self.params[0]
        seeds = (
            f"{self.seed}"
            if len(self.paths) == 1
            else f"{self.seed}..{self.seed + len(self.paths) - 1}"
        )
        return (
            f"seed {seeds} · {p['sampler']} · {p['steps']} steps · guidance {p['scale']} · "
            f"{p['size']} · {p['model']} · {self.seconds:.1f} s"
        )


def model_defaults(ctx: UiContext, name: str | None) -> dict[str, Any]:
    """Loads checkpoint ``name`` and returns the settings it samples with by default: sampler,
    steps, guidance_scale and its image size (width, height)."""
    from ldm.engine.defaults import resolve_sampling
    from ldm.engine.generate import latent_factor

    with ctx.models.lock:
        model = ctx.models.get(name)
        sampler, steps, scale, _ = resolve_sampling(model, None, None, None, {})
        _, h, w = model.latent_shape()
        f = latent_factor(model)
    return {
        "sampler": sampler,
        "steps": steps,
        "guidance_scale": scale,
        "width": w * f,
        "height": h * f,
    }


def _image(value: ImageInput, ctx: UiContext, what: str) -> Image.Image | None:
    if value is None or isinstance(value, Image.Image):
        return value
    return decode_upload(value, ctx.max_upload_bytes, what=what)


def _adapter_paths(names: list[str], table: dict[str, Path], kind: str) -> list[Path]:
    missing = [n for n in names if n not in table]
    if missing:
        raise UiError(
            f"Unknown {kind} {', '.join(missing)}; available: {', '.join(table) or 'none'}."
        )
    return [table[n] for n in names]


def _next_path(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    i = len(list(folder.glob("*.png")))
    while (folder / f"{i:05}.png").exists():
        i += 1
    return folder / f"{i:05}.png"


def generate_images(
    ctx: UiContext,
    settings: Settings,
    init_image: ImageInput = None,
    mask: ImageInput = None,
    progress: Progress | None = None,
) -> GenerationResult:
    """Sample ``settings.batch`` images and write them to ``outdir/<mode>/NNNNN.png`` with the
    sampling commands' PNG metadata; ``progress(done, total)`` after every solver step."""
    from ldm.adapters.sampling import adapters_applied, describe
    from ldm.engine.defaults import resolve_sampling
    from ldm.engine.precision import NAMES, model_dtype
    from ldm.samplers import resolve_sampler

    if settings.sampler is not None:  # another tool's name ("DPM++ 2M Karras") works too
        try:
            resolve_sampler(settings.sampler)
        except ValueError as err:
            raise UiError(str(err)[:1].upper() + str(err)[1:]) from None
    init = _image(init_image, ctx, "init image")
    mask_image = _image(mask, ctx, "mask")
    if settings.mode != "txt2img" and init is None:
        raise UiError(f"{settings.mode} needs an image: upload one (or send one from the gallery).")
    if settings.mode == "inpaint" and mask_image is None:
        raise UiError("inpaint needs a mask: paint over the area to repaint.")
    if init is not None:
        init = init.convert("RGB")
    loras = [
        (str(p), settings.lora_scale) for p in _adapter_paths(settings.loras, ctx.loras, "LoRA")
    ]
    embeddings = [str(p) for p in _adapter_paths(settings.embeddings, ctx.embeddings, "embedding")]
    seed = resolve_seed(settings.seed)
    name = settings.checkpoint or ctx.models.default
    start = time.perf_counter()
    with ctx.models.lock:  # one generation at a time on the one model in memory
        model = ctx.models.get(name)
        sampler, steps, scale, options = resolve_sampling(
            model, settings.sampler, settings.steps, settings.guidance_scale, {}
        )
        text = model.conditioner is not None and model.conditioner.text_key() is not None
        common = {
            "sampler": sampler,
            "karras": bool(options.get("karras", False)),
            "steps": steps,
            "scale": scale if text else 1.0,
            "eta": options.get("eta", 0.0),
            "model": name,
            "model_hash": ctx.models.file_hash(name),
            "mode": settings.mode,
            "precision": NAMES[model_dtype(model)],  # generate()'s default, as the commands
        }
        if settings.strength is not None:
            common["strength"] = settings.strength
        common.update(describe(loras, embeddings))
        done = [0]
        n = settings.batch

        def step(info: dict[str, Any]) -> None:
            done[0] += 1
            if progress is not None:
                per_image = int(info.get("total") or steps)
                progress(min(done[0], per_image * n), per_image * n)

        paths, params = [], []
        with adapters_applied(model, loras, embeddings):
            for i in range(n):
                images = model.generate(
                    settings.prompt if text else None,
                    negative_prompt=(settings.negative_prompt or None) if text else None,
                    sampler=sampler,
                    steps=steps,
                    guidance_scale=scale if text else 1.0,
                    seed=seed + i,
                    height=settings.height,
                    width=settings.width,
                    init_image=init,
                    strength=settings.strength,
                    mask=mask_image if settings.mode == "inpaint" else None,
                    callback=step,
                    **options,
                )
                image = images[0]
                meta = {  # the keys and order of ldm.commands.sample
                    "prompt": settings.prompt if text else "",
                    "negative_prompt": settings.negative_prompt,
                    "seed": seed + i,
                    "iteration": 0,
                    "index": i,
                    "size": f"{image.width}x{image.height}",
                    **common,
                }
                paths.append(save_png(image, _next_path(ctx.outdir / settings.mode), meta))
                params.append(meta)
    result = GenerationResult(paths, seed, params, time.perf_counter() - start)
    logger.info("%s: %s", settings.mode, result.summary())
    return result
