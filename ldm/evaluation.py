"""Judge-scored text-to-image evaluation on the captioned shapes (the default run's final check).

`sample_prompts` draws one image per prompt from a `LatentDiffusion` with classifier-free guidance
(Ho & Salimans 2022) and a fast solver (default DPM-Solver++(2M), Lu et al. 2022, 20 steps);
`evaluate` scores them with `ldm.data.judge.score` per prompt set (seen / held-out colour-shape
pairs); `ShapesEvaluation` is the Lightning callback that does both at the end of training (and
every `every_n_steps`), writes a captioned grid and a JSON of the scores into the run directory
and logs a table.
"""

from __future__ import annotations

import json
import logging
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image, ImageDraw, ImageFont
from pytorch_lightning.callbacks import Callback

logger = logging.getLogger(__name__)

ATTRIBUTES = ("colour", "shape", "size", "position", "caption")


@torch.no_grad()
def sample_prompts(
    model: Any,
    prompts: Sequence[str],
    sampler: str = "dpmpp_2m",
    steps: int = 20,
    guidance_scale: float = 4.0,
    seed: int = 0,
    batch_size: int = 64,
    use_ema: bool = True,
    **options: Any,
) -> torch.Tensor:
    """Images [N, 3, H, W] in [-1, 1] for `prompts` through ``model.generate`` (CFG, one seed).

    Prompts beyond ``batch_size`` are sampled in chunks whose start noise continues the seed's
    stream, so the images do not depend on the chunking."""
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    c_, h, w = model.latent_shape()
    x_T = torch.randn((len(prompts), c_, h, w), generator=gen)  # same noise for every call
    out = []
    for i in range(0, len(prompts), batch_size):
        chunk = list(prompts[i : i + batch_size])
        images = model.generate(
            chunk,
            sampler=sampler,
            steps=steps,
            guidance_scale=float(guidance_scale),
            x_T=x_T[i : i + len(chunk)],
            use_ema=use_ema,
            output="tensor",
            decode="full",
            **options,
        )
        out.append(images * 2 - 1)
    return torch.cat(out)


def evaluate(
    model: Any,
    prompt_sets: Mapping[str, Sequence[str]],
    targets: Mapping[str, Sequence[str]] | None = None,
    **sample_kwargs: Any,
) -> tuple[dict[str, dict[str, float]], dict[str, torch.Tensor]]:
    """({set: judge scores}, {set: images}) for each named prompt set; a set's images are judged
    against its ``targets`` captions when given (a prompt naming a colour by a learned token)."""
    from ldm.data.judge import score

    scores, images = {}, {}
    for name, prompts in prompt_sets.items():
        images[name] = sample_prompts(model, list(prompts), **sample_kwargs)
        scores[name] = score(images[name], list((targets or {}).get(name, prompts)))
    return scores, images


def colour_sets(
    colours: Mapping[str, str], n: int, seed: int = 4321
) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """(prompts, targets) of one set per colour: its captions with the colour said as ``word``
    (e.g. {"purple": "<purple>"} for a textual-inversion token)."""
    from ldm.data.shapes import colour_prompts

    prompts, targets = {}, {}
    for colour, word in colours.items():
        captions = colour_prompts([colour], n, seed=seed)
        targets[colour] = captions
        prompts[colour] = [c.replace(f" {colour} ", f" {word} ") for c in captions]
    return prompts, targets


def format_table(scores: Mapping[str, Mapping[str, float]]) -> str:
    """Plain-text table: one row per prompt set, one column per attribute (percent)."""
    head = f"{'prompts':<10}" + "".join(f"{a:>10}" for a in ATTRIBUTES) + f"{'n':>6}"
    rows = [head]
    for name, s in scores.items():
        cells = "".join(f"{100 * s[a]:>9.1f}%" for a in ATTRIBUTES)
        rows.append(f"{name:<10}{cells}{int(s.get('n', 0)):>6}")
    return "\n".join(rows)


def captioned_grid(
    images: torch.Tensor, captions: Sequence[str], columns: int = 8, scale: int = 4
) -> Image.Image:
    """One cell per image: the image upscaled `scale` x (nearest) above its wrapped caption."""
    n, _, h, w = images.shape
    cw, ch = w * scale, h * scale
    text_h = 36
    rows = (n + columns - 1) // columns
    canvas = Image.new("RGB", (columns * (cw + 4), rows * (ch + text_h + 4)), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    arr = ((images.permute(0, 2, 3, 1).numpy() + 1.0) * 127.5).round().clip(0, 255)  # [N, H, W, 3]
    for i in range(n):
        x0, y0 = (i % columns) * (cw + 4), (i // columns) * (ch + text_h + 4)
        tile = Image.fromarray(arr[i].astype(np.uint8)).resize((cw, ch), Image.NEAREST)
        canvas.paste(tile, (x0, y0))
        lines = textwrap.wrap(captions[i], max(8, cw // 6))[:3]
        draw.text((x0 + 1, y0 + ch + 1), "\n".join(lines), fill="black", font=font)
    return canvas


class ShapesEvaluation(Callback):
    """Sample fixed seen / held-out prompts with CFG + a fast solver; judge, save grid + JSON, log."""

    def __init__(
        self,
        n_per_split: int = 32,
        prompt_seed: int = 1234,
        sampler: str = "dpmpp_2m",
        steps: int = 20,
        guidance_scale: float = 4.0,
        seed: int = 0,
        every_n_steps: int = 0,
        use_ema: bool = True,
        columns: int = 8,
        sampler_options: dict[str, Any] | None = None,
        colours: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__()
        from ldm.data.shapes import evaluation_prompts

        if n_per_split < 1:
            raise ValueError(f"ShapesEvaluation: n_per_split must be >= 1, found {n_per_split}.")
        self.prompts = evaluation_prompts(n_per_split=int(n_per_split), seed=int(prompt_seed))
        # ``colours``: {colour: word in the prompt}, e.g. {purple: purple} after teaching purple
        extra, self.targets = colour_sets(dict(colours or {}), int(n_per_split))
        self.prompts.update(extra)
        self.sample_kwargs = {
            "sampler": sampler,
            "steps": int(steps),
            "guidance_scale": float(guidance_scale),
            "seed": int(seed),
            "use_ema": bool(use_ema),
            **dict(sampler_options or {}),
        }
        self.every_n_steps, self.columns = int(every_n_steps), int(columns)
        self.sampling_defaults = {
            "sampler": sampler,
            "steps": int(steps),
            "guidance_scale": float(guidance_scale),
            "options": dict(sampler_options or {}),
        }
        self.last_scores: dict[str, dict[str, float]] | None = None
        self.written: list[Path] = []

    def _root(self, trainer: pl.Trainer) -> Path:
        return Path(trainer.default_root_dir)

    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule, tag: str) -> dict[str, Any]:
        """Sample, judge, write `images/<tag>/` grid + captions and `<tag>_scores.json`; log."""
        scores, images = evaluate(pl_module, self.prompts, self.targets, **self.sample_kwargs)
        root = self._root(trainer)
        folder = root / "images" / tag
        folder.mkdir(parents=True, exist_ok=True)
        stem = f"gs-{trainer.global_step:06}"
        all_images = torch.cat([images[k] for k in self.prompts])
        all_captions = [p for k in self.prompts for p in self.prompts[k]]
        grid_path = folder / f"samples_{stem}.png"
        captioned_grid(all_images, all_captions, self.columns).save(grid_path)
        (folder / f"captions_{stem}.txt").write_text("\n".join(all_captions) + "\n")
        record = {
            "global_step": int(trainer.global_step),
            "sampling": self.sample_kwargs,
            "scores": scores,
            "prompts": self.prompts,
            "grid": str(grid_path),
        }
        json_path = root / f"{tag}_scores.json"  # the latest evaluation of this kind
        json_path.write_text(json.dumps(record, indent=2) + "\n")
        with open(root / "scores_history.jsonl", "a") as f:  # every evaluation, one per line
            f.write(json.dumps({"tag": tag, **record}) + "\n")
        self.written += [grid_path, json_path]
        self.last_scores = scores
        logger.info(
            "judge scores at step %d (%s, %d steps, guidance %.1f):\n%s\ngrid: %s",
            trainer.global_step,
            self.sample_kwargs["sampler"],
            self.sample_kwargs["steps"],
            self.sample_kwargs["guidance_scale"],
            format_table(scores),
            grid_path,
        )
        metrics = {f"judge_{k}/{a}": v[a] for k, v in scores.items() for a in ATTRIBUTES}
        for lg in trainer.loggers:
            lg.log_metrics(metrics, step=trainer.global_step)
        return record

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """What the model is judged with becomes its recorded sampling defaults (saved in every
        checkpoint), unless its config already names them (``sampling_defaults``)."""
        if hasattr(pl_module, "sampling_defaults") and not pl_module.sampling_defaults:
            pl_module.sampling_defaults = dict(self.sampling_defaults)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any, **kwargs: Any
    ) -> None:
        step = trainer.global_step
        if not trainer.is_global_zero or self.every_n_steps <= 0 or step % self.every_n_steps:
            return
        if step == 0 or step >= (trainer.max_steps if trainer.max_steps > 0 else float("inf")):
            return  # the final evaluation runs in on_train_end
        with torch.random.fork_rng(devices=[]):
            self.run(trainer, pl_module, "eval")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero and not trainer.interrupted:
            with torch.random.fork_rng(devices=[]):
                self.run(trainer, pl_module, "final")
