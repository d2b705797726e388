"""bf16 on the CPU: speed of the two mechanisms against fp32, and the image difference.

    python benchmarks/bench_precision.py speed [--latent 32] [--repeats 3]
    python benchmarks/bench_precision.py psnr --ckpt logs/<run>/checkpoints/last.ckpt [--n 16]

speed: the SD-v1 U-Net (random weights N(0, 0.02), batch 2, text context 77 x 768) forward with no grad,
three ways in one process, interleaved, each repeated: fp32; ``torch.autocast(cpu, bfloat16)``
around fp32 weights (what ``generate`` does); and the U-Net's weights cast to bfloat16 with bf16
inputs. Prints the median seconds and the ratio to fp32 of the same run.

psnr: ``generate`` on a trained checkpoint with ``precision="full"`` and ``precision="bf16"``,
same prompts and seeds, the checkpoint's recorded sampling settings; the decoded 8-bit images are
compared (PSNR in dB, per image, peak 255; and the fraction of pixels that differ by more than
8 / 255).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def speed(latent: int, repeats: int) -> None:
    from bench_unet import SD_V1_UNET

    from ldm.modules.unet import UNetModel

    with torch.device("meta"):
        unet = UNetModel(**SD_V1_UNET)
    unet = unet.to_empty(device="cpu").eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # as bench_unet.py: every parameter N(0, 0.02)
        for p in unet.parameters():
            p.normal_(0.0, 0.02, generator=gen)
    unet_bf16 = copy.deepcopy(unet).to(torch.bfloat16)
    x = torch.randn(2, 4, latent, latent)
    t = torch.tensor([500, 500])
    ctx = torch.randn(2, 77, 768)

    def fp32() -> torch.Tensor:
        return unet(x, t, context=ctx)

    def autocast() -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return unet(x, t, context=ctx)

    def weights() -> torch.Tensor:
        return unet_bf16(x.bfloat16(), t, context=ctx.bfloat16())

    cases = {"fp32": fp32, "autocast bf16": autocast, "bf16 weights": weights}
    times: dict[str, list[float]] = {k: [] for k in cases}
    outs = {}
    with torch.no_grad():
        for name, fn in cases.items():  # warm-up (oneDNN primitive creation)
            outs[name] = fn().float()
        for _ in range(repeats):
            for name, fn in cases.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    ref = statistics.median(times["fp32"])
    print(
        f"SD-v1 U-Net forward, batch 2, latent {latent}x{latent}, {torch.get_num_threads()} "
        f"threads, {repeats} interleaved repeats (median)"
    )
    for name in cases:
        med = statistics.median(times[name])
        rel = ((outs[name] - outs["fp32"]).norm() / outs["fp32"].norm()).item()
        print(f"  {name:14s} {med:7.2f} s  x{med / ref:.2f} of fp32  rel. L2 diff {rel:.1e}")


def psnr(ckpt: str, n: int) -> None:
    import numpy as np

    from ldm.checkpoint import load_model

    model = load_model(ckpt)
    prompts = _prompts(n)
    out = {}
    times = {}
    for precision in ("full", "bf16", "full", "bf16"):
        t0 = time.perf_counter()
        x = model.generate(prompts, seed=0, output="tensor", precision=precision)
        times.setdefault(precision, []).append(time.perf_counter() - t0)
        out[precision] = (x * 255).round().to(torch.uint8).numpy().astype(np.float64)
    a, b = out["full"], out["bf16"]
    mse = ((a - b) ** 2).reshape(len(a), -1).mean(1)
    per = 10 * np.log10(255.0**2 / np.maximum(mse, 1e-12))
    big = (np.abs(a - b) > 8).mean()
    print(
        f"{ckpt}: {len(a)} images {tuple(a.shape[1:])}, recorded sampling {model.sampling_defaults}"
    )
    print(
        f"  PSNR bf16 vs fp32: median {np.median(per):.1f} dB, min {per.min():.1f} dB, "
        f"mean-MSE PSNR {10 * np.log10(255.0**2 / mse.mean()):.1f} dB; "
        f"pixels off by > 8/255: {100 * big:.2f}%"
    )
    tf, tb = min(times["full"]), min(times["bf16"])
    print(f"  generate wall time: fp32 {tf:.2f} s, bf16 {tb:.2f} s (x{tb / tf:.2f})")


def _prompts(n: int) -> list[str]:
    from ldm.data.shapes import evaluation_prompts

    split = evaluation_prompts(n_per_split=max(1, n // 2))
    return (split["seen"] + split["heldout"])[:n]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("speed")
    s.add_argument("--latent", type=int, default=32)
    s.add_argument("--repeats", type=int, default=3)
    q = sub.add_parser("psnr")
    q.add_argument("--ckpt", required=True)
    q.add_argument("--n", type=int, default=16)
    args = p.parse_args()
    if args.cmd == "speed":
        speed(args.latent, args.repeats)
    else:
        psnr(args.ckpt, args.n)


if __name__ == "__main__":
    main()
