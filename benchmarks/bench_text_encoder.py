"""Benchmark: SD v1's / v2's text encoder (CLIP ViT-L/14, OpenCLIP ViT-H/14; random weights) ours vs diffusers.

Ours is ``FrozenCLIPEmbedder`` (``ldm/modules/encoders/clip.py``), which runs transformers'
``CLIPTextModel`` parameters through the packed CPU forward of ``ldm/modules/encoders/clip_fast.py``
in inference; diffusers' ``StableDiffusionPipeline`` calls the ``CLIPTextModel`` itself on token
ids (``text_encoder(ids)[0]``), which is the reference row here. "module" is ours with the fast
path off (``LDM_FAST_TEXT=0``: transformers' forward through our wrapper). Both encode the same
token ids (a prompt and the empty prompt, as for guidance), same weights, fp32 and bf16 (weights
cast), repeats interleaved (ABC CBA ...), median wall time and process CPU time, and the output's
max relative difference from the float64 module.

``--model sd-v2``: ours is ``FrozenOpenCLIPEmbedder`` (OpenCLIP ViT-H/14, ``layer="penultimate"``,
its blocks run by ``ldm/modules/encoders/open_clip_blocks.py``), the reference the ``CLIPTextModel``
diffusers' SD 2.x checkpoints carry: the same weights converted (``openclip_to_hf``), 23 of the 24
layers; "module" is ours running open_clip's own blocks (``LDM_FAST_TEXT=0``).

    python benchmarks/bench_text_encoder.py
    python benchmarks/bench_text_encoder.py --batch 1 --repeats 30 --dtypes fp32
    python benchmarks/bench_text_encoder.py --model sd-v2 --dtypes fp32 --repeats 20
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
    base: torch.nn.Module,
    ids: torch.Tensor,
    exact: torch.Tensor,
    name: str,
    repeats: int,
    reference: torch.nn.Module | None = None,
) -> None:
    """Time and check ours, ours with the fast path off, and the reference (``reference``, default
    ours' own ``CLIPTextModel``) on ``ids`` in ``name``."""
    ours = copy.deepcopy(base).to(DTYPES[name])
    ref = ours.transformer if reference is None else copy.deepcopy(reference).to(DTYPES[name])

    def module() -> torch.Tensor:
        os.environ["LDM_FAST_TEXT"] = "0"
        try:
            return ours(ids)
        finally:
            os.environ.pop("LDM_FAST_TEXT")

    fns = {
        "ours": lambda: ours(ids),
        "module": module,
        "diffusers": lambda: ref(ids)[0],  # what the pipeline calls on token ids
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
    parser.add_argument(
        "--model", choices=["sd-v1", "sd-v2"], default="sd-v1", help="sd-v2: OpenCLIP ViT-H/14"
    )
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
    if args.model == "sd-v2":
        return bench_open_clip(args)
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


def bench_open_clip(args: argparse.Namespace) -> None:
    """SD 2.x: ``FrozenOpenCLIPEmbedder`` vs the converted 23-layer ``CLIPTextModel``."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from ldm.checkpoint.keymap_text import HF_PREFIX, OPENCLIP_PREFIX, openclip_to_hf
    from ldm.modules.encoders.open_clip import FrozenOpenCLIPEmbedder

    base = FrozenOpenCLIPEmbedder(
        arch="ViT-H-14", layer="penultimate", allow_random_weights=True
    ).eval()
    width = base.model.ln_final.normalized_shape[0]
    layers = len(base.model.transformer.resblocks)
    sd = {OPENCLIP_PREFIX + k: v for k, v in base.model.state_dict().items()}
    hf_sd, _ = openclip_to_hf(sd, keep_layers=layers - 1)
    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=layers - 1,
        num_attention_heads=base.model.transformer.resblocks[0].attn.num_heads,
        max_position_embeddings=77,
        hidden_act="gelu",
        projection_dim=base.model.text_projection.shape[1],
    )
    reference = CLIPTextModel(config).eval()
    if not any(k.startswith(HF_PREFIX) for k in reference.state_dict()):  # transformers 5
        hf_sd = {k.removeprefix(HF_PREFIX): v for k, v in hf_sd.items()}
    missing, unexpected = reference.load_state_dict(hf_sd, strict=False)
    missing = [k for k in missing if "position_ids" not in k]
    if unexpected or missing:
        raise SystemExit(f"conversion mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    prompts = ([PROMPT, ""] * args.batch)[: args.batch]
    ids = base.tokenize(prompts)
    logger.info("SD 2.x text encoder: OpenCLIP ViT-H/14, %d of %d blocks", layers - 1, layers)
    with torch.no_grad():
        exact = copy.deepcopy(reference).double()(input_ids=ids).last_hidden_state
    for name in args.dtypes:
        bench_dtype(base, ids, exact, name, args.repeats, reference=reference)
    logger.info("(ratios are ours/diffusers: < 1 means ours is faster)")


if __name__ == "__main__":
    sys.exit(main())
