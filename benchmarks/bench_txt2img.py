"""Benchmark: end-to-end txt2img, ours (`model.generate`) vs diffusers' StableDiffusionPipeline.

SD v1 sizes built from the built-in hyperparameters with random weights (no downloads): the U-Net
of configs v1-inference.yaml, the f8 KL autoencoder, CLIP ViT-L/14's text tower (one transformers
CLIPTextModel shared by both pipelines: diffusers calls the module, ours runs its parameters
through the packed CPU forward of ldm/modules/encoders/clip_fast.py) and our offline tokenizer
(wrapped for diffusers). diffusers gets the same weights through its own single-file converters. Both run
DPM++ 2M (diffusers: DPMSolverMultistepScheduler) with classifier-free guidance and decode with
the VAE; runs are interleaved, wall and process CPU time are printed with the ratio ours/diffusers,
plus the text-encode and VAE-decode parts alone.

    python benchmarks/bench_txt2img.py                         # 512x512, 20 steps (slow on CPU)
    python benchmarks/bench_txt2img.py --size 256 --steps 4 --repeats 1
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_unet import (  # noqa: E402
    SD_V1_DDCONFIG,
    SD_V1_UNET,
    _to_diffusers,
    add_retain_memory_flag,
    apply_retain_memory,
    machine_line,
)

from ldm.modules.encoders.clip import KNOWN_CLIP_TEXT_CONFIGS  # noqa: E402
from ldm.util import instantiate_from_config  # noqa: E402

logger = logging.getLogger("bench_txt2img")


def sd_v1_sizes(tiny: bool = False) -> tuple[dict, dict]:
    """U-Net params and VAE ddconfig at SD v1 sizes, or tiny widths for a smoke test."""
    unet_params, ddconfig = dict(SD_V1_UNET), dict(SD_V1_DDCONFIG)
    if tiny:
        unet_params.update(model_channels=32, num_heads=2, channel_mult=[1, 2], context_dim=768)
        unet_params["attention_resolutions"] = [1]
        ddconfig.update(ch=32, ch_mult=[1, 2, 2, 2], num_res_blocks=1)
    return unet_params, ddconfig


def setup_pair(threads: int, tiny: bool) -> tuple[Any, Any]:
    """Logging, threads, then our SD v1 model and diffusers' pipeline on the same random weights."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(threads)
    unet_params, ddconfig = sd_v1_sizes(tiny)
    logger.info("machine: %s", machine_line(threads))
    model = build_model(sd_v1_config(unet_params, ddconfig))
    return model, diffusers_pipeline(model, unet_params, ddconfig)


def sd_v1_config(unet: dict | None = None, ddconfig: dict | None = None) -> dict:
    """A LatentDiffusion config at SD v1 sizes (text encoder: CLIP ViT-L/14, random weights)."""
    return {
        "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
        "params": {
            "linear_start": 0.00085,
            "linear_end": 0.012,
            "timesteps": 1000,
            "first_stage_key": "jpg",
            "cond_stage_key": "txt",
            "image_size": 64,
            "channels": 4,
            "cond_stage_trainable": False,
            "conditioning_key": "crossattn",
            "scale_factor": 0.18215,
            "use_ema": False,
            "unet_config": {
                "target": "ldm.modules.unet.UNetModel",
                "params": dict(unet or SD_V1_UNET),
            },
            "first_stage_config": {
                "target": "ldm.models.autoencoder.AutoencoderKL",
                "params": {
                    "embed_dim": 4,
                    "ddconfig": dict(ddconfig or SD_V1_DDCONFIG),
                    "lossconfig": {"target": "torch.nn.Identity"},
                },
            },
            "cond_stage_config": {
                "target": "ldm.modules.encoders.clip.FrozenCLIPEmbedder",
                "params": {
                    "config": dict(KNOWN_CLIP_TEXT_CONFIGS["openai/clip-vit-large-patch14"])
                },
            },
        },
    }


def build_model(config: dict, seed: int = 0) -> torch.nn.Module:
    """Instantiate with N(0, 0.02) random weights everywhere."""
    torch.manual_seed(seed)
    model = instantiate_from_config(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=gen)
    mark = getattr(model.cond_stage_model, "mark_weights_loaded", None)
    if mark is not None:
        mark()
    return model


class TokenizerForDiffusers:
    """Our offline CLIP tokenizer with the call interface StableDiffusionPipeline uses."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.model_max_length = tokenizer.model_max_length

    def __call__(self, text: Any, **kwargs: Any) -> Any:
        from transformers import BatchEncoding

        return BatchEncoding(dict(self.tokenizer(text, **kwargs)))

    added_tokens_encoder: dict[str, int] = {}  # noqa: RUF012 (read by diffusers' TI check)

    def tokenize(self, text: str) -> list[str]:
        """Only used by diffusers to find textual-inversion tokens; there are none here."""
        return []

    def batch_decode(self, ids: Any, **kwargs: Any) -> list[str]:
        return [self.tokenizer.decode(row) for row in ids]


def diffusers_vae(model: torch.nn.Module, ddconfig: dict) -> torch.nn.Module:
    """diffusers' AutoencoderKL with our first stage's weights (diffusers' own converter)."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import (
        convert_ldm_vae_checkpoint,
        create_vae_diffusers_config_from_ldm,
    )

    original = {
        "model": {
            "params": {
                "first_stage_config": {"params": {"ddconfig": ddconfig, "embed_dim": 4}},
                "scale_factor": 0.18215,
            }
        }
    }
    ckpt = {"first_stage_model." + k: v for k, v in model.first_stage_model.state_dict().items()}
    config = create_vae_diffusers_config_from_ldm(original, ckpt, image_size=512)
    vae = AutoencoderKL(**config)
    vae.load_state_dict(convert_ldm_vae_checkpoint(ckpt, config), strict=True)
    return vae.eval()


def diffusers_pipeline(model: torch.nn.Module, unet_params: dict, ddconfig: dict) -> Any:
    """StableDiffusionPipeline on the same weights: U-Net and VAE converted, text encoder shared."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    unet = _to_diffusers(model.model.diffusion_model, unet_params).eval()
    scheduler = DPMSolverMultistepScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        algorithm_type="dpmsolver++",
        solver_order=2,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=diffusers_vae(model, ddconfig),
        text_encoder=model.cond_stage_model.transformer,
        tokenizer=TokenizerForDiffusers(model.cond_stage_model.tokenizer),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def interleaved(cases: dict[str, Callable[[], Any]], repeats: int) -> dict[str, dict[str, float]]:
    """Median wall and CPU seconds per case, order alternating (AB BA ...)."""
    wall: dict[str, list[float]] = {k: [] for k in cases}
    cpu: dict[str, list[float]] = {k: [] for k in cases}
    for r in range(repeats):
        for name, fn in list(cases.items())[:: 1 if r % 2 == 0 else -1]:
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            cpu[name].append(time.process_time() - c0)
            wall[name].append(time.perf_counter() - t0)
    return {k: {"s": statistics.median(wall[k]), "cpu": statistics.median(cpu[k])} for k in cases}


def report(label: str, res: dict[str, dict[str, float]]) -> None:
    o, d = res["ours"], res["diffusers"]
    logger.info(
        "%-22s ours %.2f s (cpu %.2f)  diffusers %.2f s (cpu %.2f)  ratio wall %.3f  cpu %.3f",
        label,
        o["s"],
        o["cpu"],
        d["s"],
        d["cpu"],
        o["s"] / d["s"],
        o["cpu"] / d["cpu"],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="image side in pixels")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--prompt", default="a red square above a blue circle")
    parser.add_argument("--tiny", action="store_true", help="tiny widths (a smoke test)")
    parser.add_argument(
        "--precision",
        choices=["fp32", "bf16"],
        default="fp32",
        help="fp32 both; bf16: ours generate(precision='bf16') (U-Net under bf16 autocast, VAE "
        "fp32) vs the pipeline under torch.autocast(cpu, bfloat16) (its VAE too)",
    )
    add_retain_memory_flag(parser)
    args = parser.parse_args()
    allocator = apply_retain_memory(args)
    model, pipe = setup_pair(args.threads, args.tiny)
    logger.info("allocator: %s", allocator)
    side = args.size
    logger.info(
        "txt2img %dx%d, %d DPM++ 2M steps, guidance %.1f, %s, batch 1",
        side,
        side,
        args.steps,
        args.guidance,
        args.precision,
    )
    bf16 = args.precision == "bf16"

    def ours(steps: int = args.steps) -> torch.Tensor:
        return model.generate(
            args.prompt,
            sampler="dpmpp_2m",
            steps=steps,
            precision="bf16" if bf16 else "full",
            guidance_scale=args.guidance,
            height=side,
            width=side,
            seed=0,
            output="tensor",
            decode="full",
        )

    def theirs(steps: int = args.steps) -> torch.Tensor:
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            return pipe(
                args.prompt,
                num_inference_steps=steps,
                guidance_scale=args.guidance,
                height=side,
                width=side,
                generator=torch.Generator().manual_seed(0),
                output_type="pt",
            ).images

    with torch.no_grad():
        ours(2), theirs(2)  # warm-up at the same size, 2 steps
        report("txt2img end to end", interleaved({"ours": ours, "diffusers": theirs}, args.repeats))
        tokens = model.cond_stage_model.tokenizer([args.prompt, ""])["input_ids"]
        report(
            "text encode (x2)",
            interleaved(
                {
                    "ours": lambda: model.get_learned_conditioning([args.prompt, ""]),
                    "diffusers": lambda: pipe.text_encoder(tokens)[0],
                },
                max(args.repeats, 3),
            ),
        )
        z = torch.randn(1, 4, side // 8, side // 8)
        report(
            "VAE decode",
            interleaved(
                {
                    "ours": lambda: model.decode_first_stage(z),
                    "diffusers": lambda: pipe.vae.decode(z / 0.18215).sample,
                },
                args.repeats,
            ),
        )
        a, b = model.decode_first_stage(z), pipe.vae.decode(z / 0.18215).sample
        logger.info("VAE decode max |ours - diffusers| = %.3g", (a - b).abs().max().item())
    logger.info("(ratios are ours/diffusers: < 1 means ours is faster)")


if __name__ == "__main__":
    main()
