"""Benchmark: our UNetModel vs diffusers' UNet2DConditionModel at the SD v1 (or v2) size on CPU.

Same weights (ours converted with diffusers' own single-file converters), same input, same thread
count, one process, fp32 and bf16 (weights cast), forward (no grad) and forward+backward, repeats
interleaved (AB BA ...). Prints wall time and process CPU time (the better measure on a shared
machine) with the ratios ours/diffusers, the per-phase peak resident-memory increase (sampled from
/proc) and the process peak (getrusage). `--channels-last` adds ours with channels-last
activations; `--compile` adds torch.compile(ours) (and of diffusers, `--compile-diffusers`), with
the compilation (warm-up) time reported separately; `--freeze` compiles with inductor's freezing
(weights folded in as constants, for inference: what the sampling commands' `--compile` does; it
has no effect on forward+backward). Timings run under glibc's allocator defaults; `--retain-memory`
keeps freed memory in the process for both sides (``ldm.malloc_policy``, what ``main.py`` and the
sampling commands set); `--exact-memory` mmaps every allocation over 128 KiB so the memory column
is exact, at the price of page faults that slow both sides.

    python benchmarks/bench_unet.py                       # SD v1, batch 2, 64x64 latents
    python benchmarks/bench_unet.py --latent 32 --repeats 3 --dtypes bf16
"""

from __future__ import annotations

import argparse
import datetime
import gc
import logging
import os
import platform
import resource
import statistics
import sys
import threading
import time
from collections.abc import Callable

import torch

from ldm.malloc_policy import retain_freed_memory
from ldm.modules.unet import UNetModel
from ldm.modules.winograd import cache_bytes, clear_cache, winograd_enabled

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

SD_V1_DDCONFIG = dict(  # configs v1-inference.yaml first_stage_config.params.ddconfig
    double_z=True,
    z_channels=4,
    resolution=256,
    in_channels=3,
    out_ch=3,
    ch=128,
    ch_mult=[1, 2, 4, 4],
    num_res_blocks=2,
    attn_resolutions=[],
    dropout=0.0,
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
    cpu: dict[str, list[float]] = {name: [] for name in cases}
    for r in range(repeats):
        order = list(cases.items()) if r % 2 == 0 else list(cases.items())[::-1]
        for name, fn in order:
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            cpu[name].append(time.process_time() - c0)
            times[name].append(time.perf_counter() - t0)
    result = {}
    for name, fn in cases.items():
        with PeakRSS() as mem:
            fn()
        ts = times[name]
        result[name] = {
            "s": statistics.median(ts),
            "min": min(ts),
            "cpu": statistics.median(cpu[name]),
            "mem": mem.peak_delta,
        }
    return result


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else platform.processor()."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_line(threads: int) -> str:
    """One line naming the machine, for the benchmark tables."""
    return (
        f"{cpu_model()}, {threads} threads (of {os.cpu_count()} CPUs), torch {torch.__version__}, "
        f"{datetime.date.today().isoformat()}"
    )


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
    """``--exact-memory``: big tensors must be mmap-ed (returned to the OS on free) so RSS deltas
    measure live memory; glibc's dynamic mmap threshold would otherwise keep freed blocks in the
    heap. The price is a page fault per fresh page on every allocation, which slows both sides
    (the SD v1 fp32 forward+backward by ~15%) and allocation-heavy code most, so timings are taken
    under the allocator's defaults (or, ``--retain-memory``, what ``main.py`` and the sampling
    commands run with) unless this is asked for."""
    if "--exact-memory" in sys.argv and os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
        os.execve(sys.executable, [sys.executable, *sys.argv], env)


def add_retain_memory_flag(parser: argparse.ArgumentParser) -> None:
    """``--retain-memory``: what ``main.py`` and the sampling commands set (``ldm.malloc_policy``);
    the benchmarks run both sides in one process, so it applies to both."""
    parser.add_argument(
        "--retain-memory",
        action="store_true",
        help="keep freed memory in the process (ldm.malloc_policy, what main.py and the sampling "
        "commands run with); applies to both sides",
    )


def apply_retain_memory(args: argparse.Namespace) -> str:
    """Keep freed memory in the process when ``--retain-memory`` was given; the allocator setting
    in force, for the log."""
    if args.retain_memory and retain_freed_memory():
        return "freed memory kept in the process (--retain-memory)"
    return "glibc defaults"


def build_ours(params: dict, backend: str | None, seed: int = 0) -> UNetModel:
    """Our U-Net at `params` with N(0, 0.02) random weights (built on meta, then filled)."""
    with torch.device("meta"):
        ours = UNetModel(**params, attn_backend=backend)
    ours = ours.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0.0, 0.02, generator=gen)
    return ours


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _report(phase: str, res: dict[str, dict], reference: str = "diffusers") -> None:
    ref_r = res[reference]
    for name, r in res.items():
        if name == reference:
            continue
        logger.info(
            "  %-17s %-22s %.3f s (cpu %.3f, +%.0f MiB) vs %s %.3f s (cpu %.3f, +%.0f MiB): "
            "ratio wall %.3f  cpu %.3f  memory %.2f",
            phase,
            name,
            r["s"],
            r["cpu"],
            r["mem"] / 2**20,
            reference,
            ref_r["s"],
            ref_r["cpu"],
            ref_r["mem"] / 2**20,
            r["s"] / ref_r["s"],
            r["cpu"] / ref_r["cpu"],
            r["mem"] / max(ref_r["mem"], 1),
        )


def run_dtype(args: argparse.Namespace, params: dict, dtype_name: str) -> None:
    """All phases and cases for one dtype; models are rebuilt per dtype (weights cast in place)."""
    dtype = DTYPES[dtype_name]
    torch.manual_seed(0)
    ours = build_ours(params, args.backend).to(dtype)
    ref = _to_diffusers(ours, params)  # assign=True: diffusers shares our weight storage
    x = torch.randn(args.batch, 4, args.latent, args.latent).to(dtype)
    t = torch.full((args.batch,), 501.0)
    ctx = torch.randn(args.batch, 77, params["context_dim"]).to(dtype)
    logger.info(
        "== %s: SD %s U-Net, %.1f M params, batch %d, latent %dx%d",
        dtype_name,
        args.config,
        sum(p.numel() for p in ours.parameters()) / 1e6,
        args.batch,
        args.latent,
        args.latent,
    )
    with torch.no_grad():
        b = ref(x, t, encoder_hidden_states=ctx).sample.float()
        for label, on in (("ours", True), ("ours direct conv", False)):
            with winograd_enabled(on):
                a = ours(x, t, context=ctx).float()
            logger.info(
                "  max |%s - diffusers| = %.3g (relative to max |diffusers| %.3g: %.3g)",
                label,
                (a - b).abs().max().item(),
                b.abs().max().item(),
                ((a - b).abs().max() / b.abs().max()).item(),
            )

    def call(
        model: torch.nn.Module, channels_last: bool = False, winograd: bool = True
    ) -> Callable[[], torch.Tensor]:
        if isinstance(model, UNetModel):

            def run() -> torch.Tensor:
                model.channels_last = channels_last
                with winograd_enabled(winograd):
                    return model(x, t, context=ctx)

            return run
        return lambda: model(x, t, encoder_hidden_states=ctx).sample

    cases = {"ours": (call(ours), ours), "diffusers": (call(ref), ref)}
    if args.channels_last:
        cases["ours channels-last"] = (call(ours, channels_last=True), ours)
    if args.direct_conv:
        cases["ours direct conv"] = (call(ours, winograd=False), ours)
    phases = {
        "forward": lambda c, m: _fwd(c),
        "forward+backward": lambda c, m: _fwd_bwd(c, list(m.parameters())),
    }
    for phase in args.phases.split(","):
        wrap = phases[phase]
        res = _bench({n: wrap(c, m) for n, (c, m) in cases.items()}, args.repeats, args.warmup)
        _report(phase, res)
        if phase == "forward":
            logger.info(
                "  Winograd transformed weights cached (inference): %.0f MiB",
                cache_bytes() / 2**20,
            )
    if args.compile:  # compiled wrappers; the eager modules stay callable for the reference
        models = {"ours compiled": (torch.compile(ours), ours)}
        if args.compile_diffusers:
            models["diffusers compiled"] = (torch.compile(ref), ref)
        for phase in args.phases.split(","):
            fns = {}
            for name, (compiled, model) in models.items():
                if isinstance(model, UNetModel):
                    model.channels_last = False

                    def run(c=compiled) -> torch.Tensor:
                        return c(x, t, context=ctx)
                else:

                    def run(c=compiled) -> torch.Tensor:
                        return c(x, t, encoder_hidden_states=ctx).sample

                fns[name] = phases[phase](run, model)
                t0 = time.perf_counter()
                fns[name]()  # compiles (warm-up, reported separately)
                logger.info(
                    "  %-17s %-22s warm-up (compilation) %.1f s",
                    phase,
                    name,
                    time.perf_counter() - t0,
                )
            fns["diffusers"] = phases[phase](call(ref), ref)
            _report(phase, _bench(fns, args.repeats, args.warmup))
    del ours, ref
    clear_cache()
    gc.collect()


def main() -> None:
    _reexec_with_fixed_mmap_threshold()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="v1", help="SD U-Net size")
    parser.add_argument("--latent", type=int, default=64, help="latent side (64 = SD v1 512px)")
    parser.add_argument("--batch", type=int, default=2, help="2 = one prompt with guidance")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--warmup",
        type=int,
        default=2,
        help="untimed calls per case first (ours reaches its steady allocation after ~2 training steps)",
    )
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32, bf16")
    parser.add_argument("--phases", default="forward,forward+backward")
    parser.add_argument("--backend", default=None, help="our attention backend (default sdpa)")
    parser.add_argument(
        "--channels-last", action="store_true", help="also time ours with channels_last=True"
    )
    parser.add_argument(
        "--direct-conv",
        action="store_true",
        help="also time ours with the Winograd convolution off (LDM_WINOGRAD=0)",
    )
    parser.add_argument("--compile", action="store_true", help="also time torch.compile(ours)")
    parser.add_argument(
        "--exact-memory",
        action="store_true",
        help="mmap every allocation over 128 KiB (MALLOC_MMAP_THRESHOLD_) so the memory column is "
        "exact; slows both sides (page faults), allocation-heavy code most",
    )
    add_retain_memory_flag(parser)
    parser.add_argument(
        "--compile-diffusers", action="store_true", help="with --compile: compile diffusers too"
    )
    parser.add_argument(
        "--freeze", action="store_true", help="with --compile: inductor freezing (inference)"
    )
    args = parser.parse_args()
    if args.retain_memory and args.exact_memory:
        parser.error("--retain-memory and --exact-memory contradict each other; pick one")
    allocator = apply_retain_memory(args)
    if args.freeze:
        from torch._inductor import config as inductor_config

        inductor_config.freezing = True
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    logger.info("machine: %s", machine_line(args.threads))
    logger.info(
        "allocator: %s",
        f"MALLOC_MMAP_THRESHOLD_={os.environ['MALLOC_MMAP_THRESHOLD_']} (memory column exact)"
        if os.environ.get("MALLOC_MMAP_THRESHOLD_")
        else f"{allocator} (memory column approximate: freed blocks may stay in the heap)",
    )
    for dtype_name in args.dtypes.split(","):
        run_dtype(args, CONFIGS[args.config], dtype_name)
    logger.info("(ratios are ours/diffusers: < 1 means ours is faster / uses less memory)")
    logger.info(
        "process peak RSS (getrusage): %.0f MiB",
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    )


if __name__ == "__main__":
    main()
