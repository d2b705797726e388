"""GPU benchmark: SD v1 U-Net it/s at 512x512 (64x64 latents, batch 2 = one prompt with guidance),
fp16, ours vs diffusers (both SDPA), eager and torch.compile'd, xformers vs SDPA parity, peak memory.

Run by benchmarks/gpu.sh on a GPU machine. `--dry-run` runs every code path on the CPU with a tiny
U-Net (fp32, two iterations), so the script can be checked where there is no GPU.

    python benchmarks/bench_gpu.py --part eager
    python benchmarks/bench_gpu.py --part compile
    python benchmarks/bench_gpu.py --part xformers
    python benchmarks/bench_gpu.py --dry-run --part all
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_unet import SD_V1_UNET, _to_diffusers, build_ours  # noqa: E402

logger = logging.getLogger("bench_gpu")
TINY = dict(SD_V1_UNET, model_channels=32, num_heads=2, channel_mult=[1, 2], context_dim=64)
TINY["attention_resolutions"] = [1]


def _sync(device: torch.device) -> None:
    if device.type != "cpu":
        torch.accelerator.synchronize()


def _peak_reset(device: torch.device) -> None:
    if device.type != "cpu":
        torch.accelerator.reset_peak_memory_stats()


def _peak_mib(device: torch.device) -> float:
    if device.type == "cpu":
        return float("nan")
    return torch.accelerator.max_memory_allocated() / 2**20


def its(fn: Callable[[], torch.Tensor], device: torch.device, iters: int, warmup: int) -> dict:
    """Iterations per second of fn (after warm-up), first-call seconds, peak memory (MiB)."""
    _peak_reset(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        fn()
        _sync(device)
        first = time.perf_counter() - t0
        for _ in range(warmup):
            fn()
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        _sync(device)
    dt = time.perf_counter() - t0
    return {"it/s": iters / dt, "first_call_s": first, "peak_MiB": _peak_mib(device)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("eager", "compile", "xformers", "all"), default="all")
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--dry-run", action="store_true", help="tiny U-Net on the CPU, fp32")
    parser.add_argument("--json", default=None, help="append the results to this JSON-lines file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.dry_run:
        device, dtype, params, latent = torch.device("cpu"), torch.float32, TINY, 16
        args.iters, args.warmup = 2, 1
    else:
        if not torch.accelerator.is_available():
            raise SystemExit("bench_gpu.py: no accelerator found; use --dry-run to check on CPU.")
        device, dtype, params, latent = (
            torch.accelerator.current_accelerator(),
            torch.float16,
            SD_V1_UNET,
            64,
        )
        logger.info("device: %s", torch.cuda.get_device_name() if device.type == "cuda" else device)
    ours = build_ours(params, None).to(device=device, dtype=dtype).eval()
    ref = _to_diffusers(ours, params).to(device=device, dtype=dtype).eval()
    ref.set_attn_processor(__import__("diffusers").models.attention_processor.AttnProcessor2_0())
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, latent, latent, generator=gen).to(device, dtype)
    t = torch.full((2,), 501.0, device=device)
    ctx = torch.randn(2, 77, params["context_dim"], generator=gen).to(device, dtype)
    results: dict[str, dict] = {}

    def call_ours(m=ours) -> torch.Tensor:
        return m(x, t, context=ctx)

    def call_ref(m=ref) -> torch.Tensor:
        return m(x, t, encoder_hidden_states=ctx).sample

    parts = ("eager", "compile", "xformers") if args.part == "all" else (args.part,)
    if "eager" in parts:
        with torch.no_grad():
            a, b = call_ours().float(), call_ref().float()
        rel = ((a - b).abs().max() / b.abs().max()).item()
        logger.info("ours vs diffusers (SDPA), %s: max relative difference %.3g", dtype, rel)
        results["ours eager"] = its(call_ours, device, args.iters, args.warmup)
        results["diffusers eager"] = its(call_ref, device, args.iters, args.warmup)
    if "compile" in parts:
        backend = "eager" if args.dry_run else "inductor"  # dry run: the code path, not inductor
        co, cr = torch.compile(ours, backend=backend), torch.compile(ref, backend=backend)
        results["ours compiled"] = its(lambda: call_ours(co), device, args.iters, args.warmup)
        results["diffusers compiled"] = its(lambda: call_ref(cr), device, args.iters, args.warmup)
    if "xformers" in parts:
        try:
            import xformers.ops  # noqa: F401
        except Exception as err:  # ImportError or a broken build
            logger.info("xformers: not available (%s); parity check skipped", err)
        else:
            from ldm.modules.attention_backends import attention

            q, k, v = (torch.randn(2, 8, 4096, 40, device=device, dtype=dtype) for _ in range(3))
            diff = (
                attention(q, k, v, backend="xformers") - attention(q, k, v, backend="sdpa")
            ).abs()
            logger.info("xformers vs sdpa attention: max abs difference %.3g", diff.max().item())
            with torch.no_grad():
                base = call_ours().float()
                ours.apply(
                    lambda m: (
                        setattr(m, "attn_backend", "xformers")
                        if hasattr(m, "attn_backend")
                        else None
                    )
                )
                xf = call_ours().float()
            logger.info(
                "U-Net with xformers vs sdpa: max relative difference %.3g",
                ((xf - base).abs().max() / base.abs().max()).item(),
            )
            results["ours eager xformers"] = its(call_ours, device, args.iters, args.warmup)
            ours.apply(
                lambda m: setattr(m, "attn_backend", None) if hasattr(m, "attn_backend") else None
            )
    for name, r in results.items():
        logger.info(
            "%-22s %7.2f it/s  first call %6.1f s  peak %8.0f MiB",
            name,
            r["it/s"],
            r["first_call_s"],
            r["peak_MiB"],
        )
    for a, b in (("ours eager", "diffusers eager"), ("ours compiled", "diffusers compiled")):
        if a in results and b in results:
            logger.info("%s / %s: speed ratio %.3f", a, b, results[a]["it/s"] / results[b]["it/s"])
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps({"part": args.part, "dry_run": args.dry_run, **results}) + "\n")


if __name__ == "__main__":
    main()
