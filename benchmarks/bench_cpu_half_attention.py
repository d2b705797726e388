"""Benchmark: half-precision attention forward+backward on the CPU, PyTorch's bf16 kernel vs ours.

`ldm.modules.attention_backends.attention` computes bf16/fp16 CPU attention whose graph is recorded
for a backward in fp32 when it is small (``CPU_HALF_BACKWARD_UPCAST_MAX``) or the CPU has no native
bf16 matmul (any size): PyTorch's CPU flash-attention backward in half precision has a fixed cost
per (batch, head) slice, and is emulated without AMX / AVX512-BF16. This times, in one run and
interleaved, the attention call alone at the default run's shapes and SD v1's, and the default
run's U-Net (configs/txt2img.yaml, batch 64, 8x8 latents) forward+backward under bf16 autocast,
with the upcast switched off ("bf16 kernel") and on ("ours"), against fp32.

    python benchmarks/bench_cpu_half_attention.py --repeats 5
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
from bench_txt2img import interleaved  # noqa: E402
from bench_unet import machine_line  # noqa: E402

import ldm.modules.attention_backends as backends  # noqa: E402
from ldm.modules.attention import attention  # noqa: E402

logger = logging.getLogger("bench_cpu_half_attention")

#: (batch, heads, queries, keys, head dim): the default run's U-Net (8x8 and 4x4 latents, self
#: and cross attention to 16 tokens), SD v1's cross-attention at 32x32 and 8x8 latents and its
#: self-attention at 64x64 and 32x32 (above the size limit: "ours" is the bf16 kernel on a CPU with
#: native bf16, fp32 on one without).
SHAPES = (
    (64, 2, 64, 64, 32),
    (64, 2, 64, 16, 32),
    (64, 4, 16, 16, 32),
    (2, 8, 1024, 77, 80),
    (2, 8, 64, 77, 160),
    (2, 8, 4096, 4096, 40),
    (2, 8, 1024, 1024, 80),
)


def _switched(upcast: bool, fn: Callable[[], None]) -> Callable[[], None]:
    def call() -> None:
        saved = backends.CPU_HALF_BACKWARD_IN_FP32
        backends.CPU_HALF_BACKWARD_IN_FP32 = upcast
        try:
            fn()
        finally:
            backends.CPU_HALF_BACKWARD_IN_FP32 = saved

    return call


def _attention_case(shape: tuple[int, ...], inner: int) -> Callable[[], None]:
    b, h, n, m, d = shape
    q, k, v = (torch.randn(b, h, s, d, dtype=torch.bfloat16, requires_grad=True) for s in (n, m, m))

    def run() -> None:
        for _ in range(inner):
            attention(q, k, v, backend="sdpa").float().sum().backward()

    return run


def _unet_case() -> Callable[[], None]:
    from omegaconf import OmegaConf

    from ldm.util import instantiate_from_config

    config = Path(__file__).resolve().parents[1] / "configs" / "txt2img.yaml"
    unet = instantiate_from_config(OmegaConf.load(config).model.params.unet_config)
    x, t, c = torch.randn(64, 4, 8, 8), torch.randint(0, 1000, (64,)), torch.randn(64, 16, 128)

    def run(dtype: torch.dtype) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = unet(x, t, context=c).float().square().mean()
        loss.backward()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    logger.info("machine: %s", machine_line(args.threads))
    logger.info("native bf16 matmul: %s", backends.native_half_matmul(torch.bfloat16))
    for shape in SHAPES:
        inner = 10 if shape[2] * shape[3] < 10_000 else 2
        run = _attention_case(shape, inner)
        run()  # warm-up
        res = interleaved(
            {"bf16 kernel": _switched(False, run), "ours": _switched(True, run)}, args.repeats
        )
        kernel, ours = res["bf16 kernel"]["s"] / inner, res["ours"]["s"] / inner
        logger.info(
            "attention fwd+bwd %-24s bf16 kernel %7.2f ms  ours %7.2f ms  ratio %.3f",
            str(shape),
            kernel * 1e3,
            ours * 1e3,
            ours / kernel,
        )
    unet = _unet_case()
    cases = {
        "fp32": lambda: unet(torch.float32),
        "bf16 kernel": _switched(False, lambda: unet(torch.bfloat16)),
        "ours": _switched(True, lambda: unet(torch.bfloat16)),
    }
    for fn in cases.values():
        fn()  # warm-up
    res = interleaved(cases, args.repeats)
    logger.info(
        "default-run U-Net fwd+bwd (batch 64, 8x8): fp32 %.3f s  bf16 kernel %.3f s  ours bf16 "
        "%.3f s  ratio ours/bf16 kernel %.3f  ours/fp32 %.3f",
        res["fp32"]["s"],
        res["bf16 kernel"]["s"],
        res["ours"]["s"],
        res["ours"]["s"] / res["bf16 kernel"]["s"],
        res["ours"]["s"] / res["fp32"]["s"],
    )


if __name__ == "__main__":
    main()
