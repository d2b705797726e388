"""Benchmark: SD v1's text encoder (CLIP ViT-L/14 text tower, random weights) ours vs diffusers.

Ours is ``FrozenCLIPEmbedder`` (``ldm/modules/encoders/clip.py``), which runs transformers'
``CLIPTextModel`` parameters through the packed CPU forward of ``ldm/modules/encoders/clip_fast.py``
in inference; diffusers' ``StableDiffusionPipeline`` calls the ``CLIPTextModel`` itself on token
ids (``text_encoder(ids)[0]``), which is the reference row here. "module" is ours with the fast
path off (``LDM_FAST_TEXT=0``: transformers' forward through our wrapper). Both encode the same
token ids (a prompt and the empty prompt, as for guidance), same weights, fp32 and bf16 (weights
cast), repeats interleaved (ABC CBA ...), median wall time and process CPU time, and the output's
max relative difference from the float64 module.

    python benchmarks/bench_text_encoder.py
    python benchmarks/bench_text_encoder.py --batch 1 --repeats 30 --dtypes fp32
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch

from ldm.modules.encoders.clip import KNOWN_CLIP_TEXT_CONFIGS, FrozenCLIPEmbedder
from ldm.modules.encoders.clip_fast import cache_bytes, clear_cache

logger = logging.getLogger("bench_text_encoder")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PROMPT = "a photograph of an astronaut riding a horse on the moon, detailed, 4k"


def interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[tuple]]:
    """(wall, cpu) seconds per call, the order reversed every other round."""
    times: dict[str, list[tuple]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(repeats):
        for name in names if r % 2 == 0 else reversed(names):
            w0, c0 = time.perf_counter(), time.process_time()
            fns[name]()
            times[name].append((time.perf_counter() - w0, time.process_time() - c0))
    return times


def bench_dtype(
    base: FrozenCLIPEmbedder, ids: torch.Tensor, exact: torch.Tensor, name: str, repeats: int
) -> None:
    """Time and check ours, ours with the fast path off, and the module on ``ids`` in ``name``."""
    ours = copy.deepcopy(base).to(DTYPES[name])

    def module() -> torch.Tensor:
        os.environ["LDM_FAST_TEXT"] = "0"
        try:
            return ours(ids)
        finally:
            os.environ.pop("LDM_FAST_TEXT")

    fns = {
        "ours": lambda: ours(ids),
        "module": module,
        "diffusers": lambda: ours.transformer(ids)[0],  # what the pipeline calls on token ids
    }
    with torch.no_grad():
        errors = {
            k: ((f().double() - exact).abs().max() / exact.abs().max()).item()
            for k, f in fns.items()
        }
        for f in fns.values():
            f()
        times = interleaved(fns, repeats)
    ref_wall = statistics.median(t[0] for t in times["diffusers"])
    ref_cpu = statistics.median(t[1] for t in times["diffusers"])
    for key in fns:
        wall = statistics.median(t[0] for t in times[key])
        cpu = statistics.median(t[1] for t in times[key])
        logger.info(
            "%s batch %d %-9s %7.1f ms wall %7.1f ms CPU | ratio %.3f wall %.3f CPU | "
            "max rel. diff. from float64 %.2e",
            name,
            ids.shape[0],
            key,
            wall * 1e3,
            cpu * 1e3,
            wall / ref_wall,
            cpu / ref_cpu,
            errors[key],
        )
    logger.info("%s cached fused / packed weights: %.0f MiB", name, cache_bytes() / 2**20)
    clear_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    parser.add_argument("--batch", type=int, default=2, help="prompts per call (2: prompt + empty)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--layers", type=int, default=12, help="transformer layers (12: ViT-L/14)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logger.info(
        "%s | torch %s | %d threads | %s",
        platform.processor() or platform.machine(),
        torch.__version__,
        torch.get_num_threads(),
        time.strftime("%Y-%m-%d %H:%M"),
    )
    torch.manual_seed(0)
    config = dict(
        KNOWN_CLIP_TEXT_CONFIGS["openai/clip-vit-large-patch14"], num_hidden_layers=args.layers
    )
    base = FrozenCLIPEmbedder(config=config, allow_random_weights=True).eval()
    prompts = ([PROMPT, ""] * args.batch)[: args.batch]
    ids = base.tokenize(prompts)
    with torch.no_grad():
        exact = copy.deepcopy(base.transformer).double()(input_ids=ids).last_hidden_state
    for name in args.dtypes:
        bench_dtype(base, ids, exact, name, args.repeats)
    logger.info("(ratios are ours/diffusers: < 1 means ours is faster)")


if __name__ == "__main__":
    sys.exit(main())
