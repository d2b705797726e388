"""Benchmark: one SD v1 training step, ours vs the equivalent diffusers step, same weights, CPU.

A step = VAE encode (posterior sample, no grad) + text encode (frozen CLIP, no grad) + noise at a
random timestep + U-Net forward + MSE loss + backward (no optimizer step: the same torch optimizer
would run in both). Ours goes through the model's own batch path (`get_input` -> `forward`);
diffusers through `AutoencoderKL.encode`, `CLIPTextModel`, `DDPMScheduler.add_noise` and
`UNet2DConditionModel`. Interleaved repeats; wall and process CPU time and the ratio ours/diffusers.
(`bench_train_step.py` times our default toy config's full step with its optimizers.)

    python benchmarks/bench_train_step_diffusers.py                 # 512x512, batch 1
    python benchmarks/bench_train_step_diffusers.py --size 256 --repeats 2
    python benchmarks/bench_train_step_diffusers.py --retain-memory  # main.py's allocator setting
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_txt2img import (  # noqa: E402
    interleaved,
    report,
    setup_pair,
)
from bench_unet import add_retain_memory_flag, apply_retain_memory  # noqa: E402

logger = logging.getLogger("bench_train_step_diffusers")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="image side in pixels")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--tiny", action="store_true", help="tiny widths (a smoke test)")
    add_retain_memory_flag(parser)
    args = parser.parse_args()
    allocator = apply_retain_memory(args)
    model, pipe = setup_pair(args.threads, args.tiny)
    from diffusers import DDPMScheduler

    noise_sched = DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
    )
    unet_ours, unet_ref = model.model.diffusion_model, pipe.unet
    unet_ref.train()
    side, bs = args.size, args.batch
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(bs, side, side, 3, generator=gen) * 2 - 1  # CompVis batch: B x H x W x C
    captions = ["a red square above a blue circle"] * bs
    tokens = model.cond_stage_model.tokenizer(captions)["input_ids"]
    logger.info(
        "training step %dx%d, batch %d, fp32 (loss + backward, no optimizer); allocator: %s",
        side,
        side,
        bs,
        allocator,
    )

    def ours() -> None:
        z, c = model.get_input({"jpg": images, "txt": captions}, "jpg")
        loss, _ = model(z, c)
        loss.backward()
        for p in unet_ours.parameters():
            p.grad = None

    def theirs() -> None:
        with torch.no_grad():
            x = images.permute(0, 3, 1, 2)
            latents = pipe.vae.encode(x).latent_dist.sample() * 0.18215
            ctx = pipe.text_encoder(tokens)[0]
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (bs,))
        noisy = noise_sched.add_noise(latents, noise, t)
        loss = F.mse_loss(unet_ref(noisy, t, encoder_hidden_states=ctx).sample, noise)
        loss.backward()
        for p in unet_ref.parameters():
            p.grad = None

    model.train()
    ours(), theirs()  # warm-up
    report("train step", interleaved({"ours": ours, "diffusers": theirs}, args.repeats))
    with torch.no_grad():
        x = images.permute(0, 3, 1, 2)
        report(
            "VAE encode",
            interleaved(
                {
                    "ours": lambda: model.encode_first_stage(x),
                    "diffusers": lambda: pipe.vae.encode(x).latent_dist,
                },
                args.repeats,
            ),
        )
    logger.info("(ratios are ours/diffusers: < 1 means ours is faster)")


if __name__ == "__main__":
    main()
