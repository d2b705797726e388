"""Memory and time of SDXL base at full size on this machine: build, one guided step, decode.

    python benchmarks/sdxl_memory.py [--dtype float32|bfloat16] [--size 1024] [--out result.json]

Builds configs/stable-diffusion/sdxl-base.yaml with random weights (no download; the text
encoders are marked loaded), runs one classifier-free-guided Euler step (batch 2 through the
U-Net) at size x size and decodes the latent with the first stage in float32. Reports the peak
resident memory (ru_maxrss) after each phase and the wall time of each phase.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--out", type=str, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("LDM_ALLOW_RANDOM_WEIGHTS", "1")
    from omegaconf import OmegaConf

    from ldm.util import instantiate_from_config

    dtype = getattr(torch, args.dtype)
    result: dict[str, object] = {
        "dtype": args.dtype,
        "size": args.size,
        "threads": torch.get_num_threads(),
    }
    t = time.perf_counter()
    cfg = OmegaConf.load(ROOT / "configs" / "stable-diffusion" / "sdxl-base.yaml")
    model = instantiate_from_config(cfg.model).eval().requires_grad_(False)
    model.model.to(dtype)
    for emb in model.conditioner.embedders:
        emb.to(dtype)
    result["build_s"] = round(time.perf_counter() - t, 1)
    result["params_billion"] = round(sum(p.numel() for p in model.parameters()) / 1e9, 3)
    result["peak_after_build_gib"] = round(peak_gib(), 2)
    t = time.perf_counter()
    latent = model.generate(
        "a photograph of an astronaut riding a horse",
        sampler="euler",
        steps=1,
        guidance_scale=5.0,
        height=args.size,
        width=args.size,
        seed=0,
        output="latent",
    )
    result["guided_step_s"] = round(time.perf_counter() - t, 1)
    result["peak_after_step_gib"] = round(peak_gib(), 2)
    t = time.perf_counter()
    image = model.decode_latent(latent.float())
    result["decode_s"] = round(time.perf_counter() - t, 1)
    result["decoded_dtype"] = str(image.dtype)
    result["peak_after_decode_gib"] = round(peak_gib(), 2)
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
