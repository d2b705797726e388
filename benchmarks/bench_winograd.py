"""Benchmark: 3x3 'same' convolution on the CPU, oneDNN's direct kernel vs Winograd F(2x2) / F(4x4).

For each shape (batch, C_in, H, W, C_out) of SD v1's U-Net at 64x64 latents, and a few narrower
ones (the default run's U-Net, an SD VAE decoder layer), times in one run, interleaved, the direct
``F.conv2d`` and ``winograd_conv3x3`` with a transformed weight made once (as the cache does in
inference), in fp32 and bf16, and prints the ratios and each output's error against float64 (max
absolute difference over the largest output). ``ldm.modules.winograd.tile_size`` encodes the
choice these numbers support; the row's ``policy`` column shows what it picks.

``--training``: fp32 forward+backward instead (SD v1's shapes at batch 1-8): the direct
convolution vs ``ldm.modules.conv_training``'s Winograd F(4x4) and im2col forms (weights transformed
on every call, as in training), the gradients' errors against float64 (the larger of the input's
and the weight's), and ``training_form``'s pick.

    python benchmarks/bench_winograd.py --repeats 5
    python benchmarks/bench_winograd.py --training --repeats 5
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_txt2img import interleaved  # noqa: E402
from bench_unet import machine_line  # noqa: E402

from ldm.modules.conv2d import WinogradConv2d  # noqa: E402
from ldm.modules.conv_training import FORMS, conv3x3_for_training, training_form  # noqa: E402
from ldm.modules.winograd import (  # noqa: E402
    tile_size,
    winograd_conv3x3,
    winograd_weight,
)

logger = logging.getLogger("bench_winograd")

#: (batch, C_in, H, W, C_out): SD v1's U-Net at 64x64 latents with guidance (batch 2); larger
#: batches and images (SD v2 at 768 px: 96x96 latents; SDXL: 128x128); the default run's U-Net
#: sampling 48 prompts with guidance (batch 96, 8x8 and 4x4); SD VAE decoder layers (batch 1).
SHAPES = (
    (2, 320, 64, 64, 320),
    (2, 640, 64, 64, 320),
    (2, 960, 64, 64, 320),
    (2, 320, 32, 32, 640),
    (2, 640, 32, 32, 640),
    (2, 1280, 32, 32, 640),
    (2, 640, 16, 16, 1280),
    (2, 1280, 16, 16, 1280),
    (2, 2560, 16, 16, 1280),
    (2, 1280, 8, 8, 1280),
    (2, 2560, 8, 8, 1280),
    (4, 320, 64, 64, 320),
    (2, 320, 96, 96, 320),
    (2, 320, 128, 128, 320),
    (8, 1280, 8, 8, 1280),
    (96, 64, 8, 8, 64),
    (96, 128, 4, 4, 128),
    (96, 256, 4, 4, 128),
    (1, 256, 128, 128, 256),
    (1, 256, 256, 256, 256),
)


#: fp32 training: SD v1's U-Net levels at batch 2 (64x64 latents), then batch 1, 4 and 8.
TRAINING_SHAPES = (
    *SHAPES[:11],
    (1, 320, 64, 64, 320),
    (4, 320, 64, 64, 320),
    (1, 1280, 16, 16, 1280),
    (1, 2560, 16, 16, 1280),
    (4, 1280, 8, 8, 1280),
    (8, 1280, 8, 8, 1280),
    (2, 320, 8, 8, 320),
)


def _error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref).abs().max() / ref.abs().max()).item()


def _cases(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
) -> dict[str, Callable[[], torch.Tensor]]:
    """The direct convolution and both Winograd forms, transformed weights made once."""
    u2, u4 = (winograd_weight(weight.float(), m, weight.dtype) for m in (2, 4))
    return {
        "direct": lambda: F.conv2d(x, weight, bias, padding=1),
        "F2": lambda: winograd_conv3x3(x, u2, bias, 2),
        "F4": lambda: winograd_conv3x3(x, u4, bias, 4),
    }


def _training_cases(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, grad: torch.Tensor
) -> dict[str, Callable[[], tuple[torch.Tensor, torch.Tensor]]]:
    """Forward+backward, direct and each training form; each returns (input grad, weight grad)."""

    def case(conv: Callable[..., torch.Tensor]) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
        def run() -> tuple[torch.Tensor, torch.Tensor]:
            xs, ws, bs = (t.detach().requires_grad_() for t in (x, weight, bias))
            conv(xs, ws, bs).backward(grad)
            return xs.grad, ws.grad

        return run

    cases = {"direct": case(lambda *a: F.conv2d(*a, padding=1))}
    for form in FORMS:
        cases[form] = case(lambda *a, form=form: conv3x3_for_training(form, *a))
    return cases


def training(repeats: int) -> None:
    """fp32 forward+backward per shape: direct vs the training forms."""
    for b, c, h, w, o in TRAINING_SHAPES:
        x64 = torch.randn(b, c, h, w, dtype=torch.float64)
        w64 = torch.randn(o, c, 3, 3, dtype=torch.float64) / (9 * c) ** 0.5
        b64 = torch.randn(o, dtype=torch.float64)
        g64 = torch.randn(b, o, h, w, dtype=torch.float64)
        refs = _training_cases(x64, w64, b64, g64)["direct"]()
        cases = _training_cases(x64.float(), w64.float(), b64.float(), g64.float())
        errors = {  # also the warm-up
            k: max(_error(got, ref) for got, ref in zip(fn(), refs)) for k, fn in cases.items()
        }
        res = interleaved(cases, repeats)
        conv = WinogradConv2d(c, o, 3, padding=1)
        policy = training_form(conv, x64.float().requires_grad_(), torch.float32)
        direct = res["direct"]["s"]
        logger.info(
            "fp32 fwd+bwd %-22s direct %8.2f ms (err %.1e)  %s  policy %s",
            str((b, c, h, w, o)),
            direct * 1e3,
            errors["direct"],
            "  ".join(
                f"{k} {res[k]['s'] * 1e3:8.2f} ms ({res[k]['s'] / direct:.2f}, err {errors[k]:.1e})"
                for k in FORMS
            ),
            policy or "direct",
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--training", action="store_true", help="fp32 forward+backward forms")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    logger.info("machine: %s", machine_line(args.threads))
    if args.training:
        training(args.repeats)
        return
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    for name in args.dtypes:
        dtype = dtypes[name]
        for b, c, h, w, o in SHAPES:
            x64 = torch.randn(b, c, h, w, dtype=torch.float64)
            w64 = torch.randn(o, c, 3, 3, dtype=torch.float64) / (9 * c) ** 0.5
            b64 = torch.randn(o, dtype=torch.float64)
            ref = F.conv2d(x64, w64, b64, padding=1)
            x, weight, bias = x64.to(dtype), w64.to(dtype), b64.to(dtype)
            cases = _cases(x, weight, bias)
            errors = {k: _error(fn(), ref) for k, fn in cases.items()}  # also the warm-up
            with torch.no_grad():
                res = interleaved(cases, args.repeats)
            conv = WinogradConv2d(c, o, 3, padding=1, dtype=dtype).requires_grad_(False)
            policy = tile_size(conv, x, dtype)
            direct = res["direct"]["s"]
            logger.info(
                "%s %-22s direct %8.2f ms  F2 %8.2f ms (%.2f, err %.1e)  F4 %8.2f ms (%.2f, err "
                "%.1e)  direct err %.1e  policy %s",
                name,
                str((b, c, h, w, o)),
                direct * 1e3,
                res["F2"]["s"] * 1e3,
                res["F2"]["s"] / direct,
                errors["F2"],
                res["F4"]["s"] * 1e3,
                res["F4"]["s"] / direct,
                errors["F4"],
                errors["direct"],
                f"F{policy}" if policy else "direct",
            )


if __name__ == "__main__":
    main()
