"""Record the numbers a refactor of the diffusion engine must keep: every sampler's output on a
fixed model function, a tiny text-to-image model's images from every entry point, its training
loss, and a short training run's final weights.

    python benchmarks/golden_engine.py OUT.pt            # record
    python benchmarks/golden_engine.py OUT.pt --compare BEFORE.pt   # compare, print max abs diffs

Run from the repository root; uses random weights (seeded) and the shipped first stage only.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LDM_ALLOW_RANDOM_WEIGHTS", "1")
logging.disable(logging.WARNING)


def sampler_outputs() -> dict[str, torch.Tensor]:
    from ldm.diffusion import alphas_cumprod_from_betas, make_beta_schedule
    from ldm.samplers import SAMPLERS, sample

    ac = alphas_cumprod_from_betas(make_beta_schedule("linear", 1000, 0.00085, 0.012))

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tt = t.reshape(-1, *[1] * (x.ndim - 1)).float() / 1000
        return 0.4 * torch.tanh(x + tt) + 0.1 * x

    out = {}
    for name in sorted(SAMPLERS):
        if name.startswith("test_"):
            continue
        for param in ("eps", "v"):
            x_T = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(3))
            opts = {"steps": 8}
            if name == "annealed_langevin":
                opts["n_steps_each"] = 3
            x = sample(
                model_fn,
                x_T,
                sampler=name,
                alphas_cumprod=ac,
                parameterization=param,
                generator=torch.Generator().manual_seed(5),
                disable=True,
                **opts,
            )
            out[f"sampler/{name}/{param}"] = x
    return out


def tiny_model():
    from omegaconf import OmegaConf

    from ldm.util import instantiate_from_config

    cfg = OmegaConf.load("configs/txt2img.yaml")
    cfg.model.params.scale_by_std = False
    cfg.model.params.scale_factor = 0.9
    torch.manual_seed(0)
    model = instantiate_from_config(cfg.model)
    # make the network non-trivial (zero-initialised output layers otherwise)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    model.model_ema = type(model.model_ema)(model.model, decay=0.999)
    return model.eval()


def model_outputs() -> dict[str, torch.Tensor]:
    from ldm.data.shapes import CaptionedShapes
    from ldm.evaluation import sample_prompts
    from ldm.models.diffusion.ddim import DDIMSampler

    out: dict[str, torch.Tensor] = {}
    model = tiny_model()
    prompts = ["a large red circle in the top left", "a small blue square in the center"] * 2
    out["eval/dpmpp_2m"] = sample_prompts(model, prompts, steps=6, guidance_scale=4.0, seed=3)
    out["eval/ddim"] = sample_prompts(model, prompts, sampler="ddim", steps=6, seed=3)
    with torch.no_grad():
        c = model.get_learned_conditioning(prompts)
        uc = model.get_unconditional_conditioning(len(prompts))
        torch.manual_seed(11)
        z, _ = DDIMSampler(model).sample(
            S=6,
            batch_size=4,
            shape=(4, 8, 8),
            conditioning=c,
            verbose=False,
            unconditional_guidance_scale=3.0,
            unconditional_conditioning=uc,
        )
        out["facade/ddim"] = z
        torch.manual_seed(11)
        out["model/sample_ddpm"] = model.sample(c[:2], batch_size=2)
    ds = CaptionedShapes(split="train", length=8)
    items = [ds[i] for i in range(4)]
    batch = {
        "image": torch.stack([torch.as_tensor(it["image"]) for it in items]),
        "caption": [it["caption"] for it in items],
    }
    torch.manual_seed(12)
    logs = model.log_images(
        batch, N=4, ddim_steps=5, unconditional_guidance_scale=4.0, plot_progressive_rows=True
    )
    for k, v in logs.items():
        out[f"log_images/{k}"] = v
    model.train()
    torch.manual_seed(13)
    loss = model.training_step(
        {"image": batch["image"].clone(), "caption": list(batch["caption"])}, 0
    )
    out["train/loss"] = loss.detach().reshape(1)
    return out


def short_run() -> dict[str, torch.Tensor]:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "main.py",
            "--base",
            "configs/txt2img.yaml",
            "-t",
            "-l",
            tmp,
            "-s",
            "23",
            "--max_steps",
            "12",
            "data.params.batch_size=8",
            "lightning.callbacks.shapes_evaluation.params.n_per_split=4",
            "lightning.callbacks.shapes_evaluation.params.every_n_steps=0",
            "lightning.callbacks.image_logger.params.batch_frequency=1000",
        ]
        subprocess.run(cmd, check=True, capture_output=True)
        ckpt = next(Path(tmp).rglob("last.ckpt"))
        sd = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
        import json

        scores = next(Path(tmp).rglob("final_scores.json"))
        rec = json.loads(scores.read_text())
        out = {f"run/{k}": v.float() for k, v in sd.items() if torch.is_tensor(v)}
        for split, s in rec["scores"].items():
            out[f"run/scores/{split}"] = torch.tensor([s[a] for a in sorted(s)])
        return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--compare", default=None)
    ap.add_argument("--skip-run", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rec = {}
    rec.update(sampler_outputs())
    rec.update(model_outputs())
    if not args.skip_run:
        rec.update(short_run())
    torch.save(rec, args.out)
    if args.compare:
        ref = torch.load(args.compare)
        worst = 0.0
        for k in sorted(set(ref) | set(rec)):
            if k not in rec or k not in ref:
                print(f"{k}: only in {'before' if k in ref else 'after'}")
                continue
            a, b = rec[k].float(), ref[k].float()
            if a.shape != b.shape:
                print(f"{k}: shape {tuple(a.shape)} vs {tuple(b.shape)}")
                continue
            d = (a - b).abs().max().item() if a.numel() else 0.0
            worst = max(worst, d)
            if d > 0:
                print(f"{k}: max abs diff {d:.3g}")
        print(f"compared {len(ref)} entries; worst max abs diff {worst:.3g}")


if __name__ == "__main__":
    main()
