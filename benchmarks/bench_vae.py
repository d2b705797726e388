"""Benchmark: SD v1 VAE decode (and encode), ours vs diffusers' AutoencoderKL, same weights, CPU.

Random weights at the KL-f8 size of configs/stable-diffusion/v1-inference.yaml, converted for
diffusers with its own single-file converter; fp32, no grad, interleaved repeats; wall and CPU time
and the ratio ours/diffusers, for the decoder and the encoder. `ours (before)` switches off, in the same
run, the CPU paths added for issue 18: the fused upsampling conv (ldm/modules/upsample_conv.py), the
channels-last layout inside the autoencoder and the in-place SiLU / skip of the ResNet block;
`ours direct conv` switches off the Winograd convolution (``LDM_WINOGRAD=0``). `--retain-memory`
keeps freed memory in the process, as the commands do (``ldm.malloc_policy``), for both sides.

    python benchmarks/bench_vae.py                  # 512x512 (64x64 latents)
    python benchmarks/bench_vae.py --size 256 --repeats 5
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_txt2img import diffusers_vae, interleaved  # noqa: E402
from bench_unet import (  # noqa: E402
    SD_V1_DDCONFIG,
    add_retain_memory_flag,
    apply_retain_memory,
    machine_line,
)

from ldm.modules.winograd import winograd_enabled  # noqa: E402

logger = logging.getLogger("bench_vae")


def _out_of_place(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
    """The ResNet block before issue 18: SiLU and the skip add out of place."""
    from ldm.modules.autoencoder_blocks import nonlinearity

    h = self.conv1(nonlinearity(self.norm1(x)))
    h = self.conv2(self.dropout(nonlinearity(self.norm2(h))))
    if self.in_channels != self.out_channels:
        x = self.conv_shortcut(x) if self.use_conv_shortcut else self.nin_shortcut(x)
    return x + h


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="image side in pixels")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    add_retain_memory_flag(parser)  # the Winograd policy then covers the 256-512 channel convs
    args = parser.parse_args()
    allocator = apply_retain_memory(args)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    logger.info("machine: %s", machine_line(args.threads))
    logger.info("allocator: %s", allocator)
    from ldm.models.autoencoder import AutoencoderKL
    from ldm.modules import autoencoder as ae_module
    from ldm.modules import autoencoder_blocks

    torch.manual_seed(0)
    ae = AutoencoderKL(dict(SD_V1_DDCONFIG), {"target": "torch.nn.Identity"}, embed_dim=4).eval()
    holder = torch.nn.Module()
    holder.first_stage_model = ae
    ref = diffusers_vae(holder, dict(SD_V1_DDCONFIG))
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(1, 4, args.size // 8, args.size // 8, generator=gen)
    x = torch.rand(1, 3, args.size, args.size, generator=gen) * 2 - 1
    switches = (
        (autoencoder_blocks, "worth_fusing", lambda conv, h: False),
        (ae_module, "_cpu_channels_last", lambda h, upscale=1: h),
        (autoencoder_blocks.ResnetBlock, "forward", _out_of_place),
    )

    def before(fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        def call() -> torch.Tensor:
            saved = [getattr(m, name) for m, name, _ in switches]
            for m, name, off in switches:
                setattr(m, name, off)
            try:
                return fn()
            finally:
                for (m, name, _), old in zip(switches, saved, strict=True):
                    setattr(m, name, old)

        return call

    def direct(fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        def call() -> torch.Tensor:
            with winograd_enabled(False):
                return fn()

        return call

    jobs = {
        "decode": {
            "ours": lambda: ae.decode(z),
            "ours (before)": before(lambda: ae.decode(z)),
            "ours direct conv": direct(lambda: ae.decode(z)),
            "diffusers": lambda: ref.decode(z).sample,
        },
        "encode": {
            "ours": lambda: ae.encode(x).mean,
            "ours (before)": before(lambda: ae.encode(x).mean),
            "ours direct conv": direct(lambda: ae.encode(x).mean),
            "diffusers": lambda: ref.encode(x).latent_dist.mean,
        },
    }
    for job, cases in jobs.items():
        with torch.no_grad():
            a, b, e, c = (fn() for fn in cases.values())  # warm-up, and the values
            logger.info(
                "VAE %s %dx%d: max |ours - diffusers| %.3g (relative to max |diffusers| %.3g), "
                "|ours - before| %.3g, |direct conv - diffusers| %.3g",
                job,
                args.size,
                args.size,
                (a - c).abs().max().item(),
                c.abs().max().item(),
                (a - b).abs().max().item(),
                (e - c).abs().max().item(),
            )
            res = interleaved(cases, args.repeats)
        d = res["diffusers"]
        for name, r in res.items():
            logger.info(
                "  %-14s %.2f s (cpu %.2f)  ratio to diffusers wall %.3f  cpu %.3f",
                name,
                r["s"],
                r["cpu"],
                r["s"] / d["s"],
                r["cpu"] / d["cpu"],
            )


if __name__ == "__main__":
    main()
