"""Benchmark: our UNetModel vs diffusers' UNet2DConditionModel at the SD v1 (or v2) size on CPU.

Same weights (ours converted with diffusers' own single-file converters), same input, same thread
count, one process. Times forward (no grad) and forward+backward, and reports the per-phase peak
resident-memory increase (sampled from /proc) plus the process peak (getrusage).

    python benchmarks/bench_unet.py --latent 32 --repeats 3
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import resource
import statistics
import sys
import threading
import time
from collections.abc import Callable

import torch

from ldm.modules.unet import UNetModel

logger = logging.getLogger("bench_unet")

SD_V1_UNET = dict(  # configs v1-inference.yaml unet_config.params
    image_size=32,
    in_channels=4,
    out_channels=4,
    model_channels=320,
    attention_resolutions=[4, 2, 1],
    num_res_blocks=2,
    channel_mult=[1, 2, 4, 4],
    num_heads=8,
    use_spatial_transformer=True,
    transformer_depth=1,
    context_dim=768,
    legacy=False,
)

SD_V2_UNET = dict(  # configs v2-inference(-v).yaml unet_config.params (use_fp16 off: fp32 CPU run)
    image_size=32,
    in_channels=4,
    out_channels=4,
    model_channels=320,
    attention_resolutions=[4, 2, 1],
    num_res_blocks=2,
    channel_mult=[1, 2, 4, 4],
    num_head_channels=64,
    use_spatial_transformer=True,
    use_linear_in_transformer=True,
    transformer_depth=1,
    context_dim=1024,
    legacy=False,
)
CONFIGS = {"v1": SD_V1_UNET, "v2": SD_V2_UNET}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Context manager sampling RSS in a thread; .peak_delta is the peak increase in bytes."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.peak_delta = 0

    def __enter__(self) -> PeakRSS:
        gc.collect()
        self.base = _rss_bytes()
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())
        self.peak_delta = self.peak - self.base


def _fwd(call: Callable[[], torch.Tensor]) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad():
            call()

    return run


def _fwd_bwd(call: Callable[[], torch.Tensor], params: list[torch.Tensor]) -> Callable[[], None]:
    def run() -> None:
        call().float().square().mean().backward()
        for p in params:
            p.grad = None

    return run


def _bench(cases: dict[str, Callable[[], None]], repeats: int, warmup: int) -> dict[str, dict]:
    """Alternate the order (AB BA AB ...) so load changes on a shared machine hit both alike."""
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for r in range(repeats):
        order = list(cases.items()) if r % 2 == 0 else list(cases.items())[::-1]
        for name, fn in order:
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    result = {}
    for name, fn in cases.items():
        with PeakRSS() as mem:
            fn()
        ts = times[name]
        result[name] = {"s": statistics.median(ts), "min": min(ts), "mem": mem.peak_delta}
    return result


def _to_diffusers(unet: UNetModel, params: dict):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        create_unet_diffusers_config_from_ldm,
    )

    original = {
        "model": {
            "params": {
                "unet_config": {"params": params},
                "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}},
            }
        }
    }
    ckpt = {"model.diffusion_model." + k: v for k, v in unet.state_dict().items()}
    config = create_unet_diffusers_config_from_ldm(original, ckpt, image_size=512)
    with torch.device("meta"):
        ref = UNet2DConditionModel(**config)
    ref.load_state_dict(convert_ldm_unet_checkpoint(ckpt, config), strict=True, assign=True)
    return ref


def _reexec_with_fixed_mmap_threshold() -> None:
    """Big tensors must be mmap-ed (returned to the OS on free) so RSS deltas measure live memory;
    glibc's dynamic mmap threshold would otherwise keep freed blocks in the heap."""
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
        os.execve(sys.executable, [sys.executable, *sys.argv], env)


def main() -> None:
    _reexec_with_fixed_mmap_threshold()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="v1", help="SD U-Net size")
    parser.add_argument("--latent", type=int, default=64, help="latent side (64 = SD v1 512px)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--backend", default=None, help="our attention backend (default sdpa)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    params = CONFIGS[args.config]

    with torch.device("meta"):
        ours = UNetModel(**params, attn_backend=args.backend)
    ours = ours.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0.0, 0.02, generator=gen)
    x = torch.randn(args.batch, 4, args.latent, args.latent)
    t = torch.full((args.batch,), 501.0)
    ctx = torch.randn(args.batch, 77, params["context_dim"])
    logger.info(
        "SD %s U-Net, %.1f M params, batch %d, latent %dx%d, fp32, %d threads, torch %s",
        args.config,
        sum(p.numel() for p in ours.parameters()) / 1e6,
        args.batch,
        args.latent,
        args.latent,
        args.threads,
        torch.__version__,
    )

    ref = _to_diffusers(
        ours, params
    )  # assign=True: diffusers shares our weight storage (no 2nd copy)
    with torch.no_grad():
        diff = (ours(x, t, context=ctx) - ref(x, t, encoder_hidden_states=ctx).sample).abs().max()
    logger.info("max |ours - diffusers| = %.3g", diff.item())

    def call_ours() -> torch.Tensor:
        return ours(x, t, context=ctx)

    def call_ref() -> torch.Tensor:
        return ref(x, t, encoder_hidden_states=ctx).sample

    results = {}
    for phase, wrap in (
        ("forward", lambda c, m: _fwd(c)),
        ("forward+backward", lambda c, m: _fwd_bwd(c, list(m.parameters()))),
    ):
        res = _bench(
            {"ours": wrap(call_ours, ours), "diffusers": wrap(call_ref, ref)},
            args.repeats,
            args.warmup,
        )
        results[phase] = res
        ours_r, ref_r = res["ours"], res["diffusers"]
        logger.info(
            "%-17s ours %.3f s (min %.3f, +%.0f MiB)  diffusers %.3f s (min %.3f, +%.0f MiB)  "
            "time ratio %.3f (of minima %.3f)  memory ratio %.2f",
            phase,
            ours_r["s"],
            ours_r["min"],
            ours_r["mem"] / 2**20,
            ref_r["s"],
            ref_r["min"],
            ref_r["mem"] / 2**20,
            ours_r["s"] / ref_r["s"],
            ours_r["min"] / ref_r["min"],
            ours_r["mem"] / max(ref_r["mem"], 1),
        )
    logger.info("(ratios are ours/diffusers: < 1 means ours is faster / uses less memory)")
    logger.info(
        "process peak RSS (getrusage): %.0f MiB",
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    )


if __name__ == "__main__":
    main()
