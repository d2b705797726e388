"""Peak memory and time of one SD-v1-size training step for each optimizer / memory choice.

    python benchmarks/bench_train_memory.py [--choices adamw,lion,...] [--cap-gb 20] \
        [--timeout 180] [--out table.md]

The model: the U-Net of configs/stable-diffusion/v1-inference.yaml (860M parameters, random
weights, ``use_checkpoint`` off unless the choice turns it on) under a frozen CLIP ViT-L/14 text
encoder (random weights, 123M), no VAE: 64 x 64 x 4 latents go in directly, batch 1, float32 on
the CPU. Each choice runs in a fresh subprocess: build, one ``training_step`` + backward +
optimizer step + EMA update. Reported: the peak resident memory of that process (ru_maxrss), the
step time, and the sizes counted from the tensors after the step: trained parameters, gradients,
optimizer state (``optimizer.state``), EMA shadow.

A choice whose process passes ``--cap-gb`` of resident memory (or what the machine has free) or
``--timeout`` seconds is stopped; its row then gives sizes computed without the step: the model
built on the meta device, and the optimizer's state measured per distinct parameter shape on one
real tensor of that shape (marked "meta" in the table).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
logger = logging.getLogger("bench_train_memory")

GIB = 2**30
#: CLIP ViT-L/14's text tower (SD v1's cond stage)
CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
          "num_attention_heads": 12, "projection_dim": 768}  # fmt: skip
#: name -> engine parameters on top of the base model (learning rates where they matter)
CHOICES: dict[str, dict[str, Any]] = {
    "adamw": {"optimizer_config": {"type": "adamw"}},
    "adamw + gradient checkpointing": {
        "optimizer_config": {"type": "adamw"},
        "gradient_checkpointing": {"unet": True},
    },
    "adamw8bit": {"optimizer_config": {"type": "adamw8bit"}},
    "lion": {"optimizer_config": {"type": "lion"}, "lr": 1e-5},
    "adafactor": {"optimizer_config": {"type": "adafactor"}, "lr": 1e-2},
    "prodigy": {"optimizer_config": {"type": "prodigy"}, "lr": 1.0},
    "sgd": {"optimizer_config": {"type": "sgd"}, "lr": 1e-2},
    "adamw + EMA on the device": {"optimizer_config": {"type": "adamw"}, "use_ema": True},
    "adamw + EMA on the CPU": {
        "optimizer_config": {"type": "adamw"},
        "use_ema": True,
        "ema_device": "cpu",
    },
}


def engine_params(choice: str) -> tuple[dict[str, Any], float]:
    """DiffusionEngine keywords of a choice, and its learning rate."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(ROOT / "configs" / "stable-diffusion" / "v1-inference.yaml")
    unet = OmegaConf.to_container(cfg.model.params.unet_config)
    unet["params"]["use_checkpoint"] = False
    extra = dict(CHOICES[choice])
    lr = float(extra.pop("lr", 1e-4))
    params = {
        "network_config": unet,
        "denoiser_config": {"linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000},
        "conditioner_config": {
            "embedders": [
                {
                    "target": "ldm.modules.encoders.clip.FrozenCLIPEmbedder",
                    "params": {"config": CLIP_L, "allow_random_weights": True},
                    "input_key": "txt",
                    "ucg_rate": 0.0,
                }
            ]
        },
        "conditioning_key": "crossattn",
        "first_stage_key": "jpg",
        "image_size": 64,
        "channels": 4,
        "use_ema": False,
        **extra,
    }
    return params, lr


def tensor_bytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def sizes(engine: Any, opt: torch.optim.Optimizer | None) -> dict[str, int]:
    trained = engine.trainable_parameters()
    ids = {id(p) for p in trained}
    return {
        "params_trained": sum(tensor_bytes(p) for p in trained),
        "params_frozen": sum(tensor_bytes(p) for p in engine.parameters() if id(p) not in ids),
        "grads": sum(tensor_bytes(p.grad) for p in trained if p.grad is not None),
        "optimizer_state": tensor_bytes(list(opt.state.values())) if opt is not None else 0,
        "ema": tensor_bytes(list(engine.model_ema.buffers())) if engine.use_ema else 0,
    }


def run_step(choice: str) -> dict[str, Any]:
    """Build the model and take one real training step (in this process)."""
    from ldm.engine.engine import DiffusionEngine

    params, lr = engine_params(choice)
    t = time.perf_counter()
    torch.manual_seed(0)
    engine = DiffusionEngine(**params)
    engine.learning_rate = lr
    if hasattr(engine.cond_stage_model, "mark_weights_loaded"):
        engine.cond_stage_model.mark_weights_loaded()  # random CLIP weights are the point here
    build_s = time.perf_counter() - t
    peak_build = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    opt = engine.configure_optimizers()
    engine.train()
    batch = {"jpg": torch.randn(1, 64, 64, 4), "txt": ["a photograph of an astronaut"]}
    t = time.perf_counter()
    loss = engine.training_step(batch, 0)
    loss.backward()
    opt.step()
    engine.on_train_batch_end(None, batch, 0)
    step_s = time.perf_counter() - t
    return {
        "choice": choice,
        "mode": "real",
        "build_s": round(build_s, 1),
        "step_s": round(step_s, 1),
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_rss_after_build": peak_build,
        "optimizer": type(opt).__name__,
        **sizes(engine, opt),
    }


def meta_sizes(choice: str) -> dict[str, Any]:
    """Sizes without the step: the model on the meta device; the optimizer state of each
    distinct parameter shape measured on one real tensor of that shape (after one step)."""
    from ldm.engine.engine import DiffusionEngine
    from ldm.optimizers import OptimizerSpec, build_optimizer

    params, lr = engine_params(choice)
    with torch.device("meta"):
        engine = DiffusionEngine(**params)
    spec = OptimizerSpec.from_config(params.get("optimizer_config"))
    shapes = Counter(tuple(p.shape) for p in engine.trainable_parameters())
    state = 0
    for shape, count in shapes.items():
        p = torch.nn.Parameter(torch.zeros(shape))
        p.grad = torch.full(shape, 1e-3)
        opt = build_optimizer([p], {}, lr, spec)
        opt.step()
        state += count * tensor_bytes(list(opt.state.values()))
        del opt, p
    out = sizes(engine, None)
    out["grads"] = out["params_trained"]
    out["optimizer_state"] = state
    return {"choice": choice, "mode": "meta", **out}


def rss_of(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def run_child(
    choice: str, mode: str, cap: int, timeout: float, out: Path
) -> tuple[dict | None, str]:
    """Run one choice in a fresh process; (result or None, why it stopped)."""
    cmd = [sys.executable, __file__, "--child", choice, "--mode", mode, "--result", str(out)]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(cmd, env=env)
    why, peak = "", 0
    start = time.monotonic()

    def watch() -> None:
        nonlocal why, peak
        while proc.poll() is None:
            rss = rss_of(proc.pid)
            peak = max(peak, rss)
            if rss > cap:
                why = f"stopped at {rss / GIB:.1f} GiB resident (cap {cap / GIB:.1f} GiB)"
                proc.kill()
            elif time.monotonic() - start > timeout:
                why = f"stopped after {timeout:.0f} s"
                proc.kill()
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    proc.wait()
    watcher.join()
    if proc.returncode != 0 or not out.exists():
        return None, why or f"exit code {proc.returncode}"
    return json.loads(out.read_text()), ""


def gib(n: int | None) -> str:
    return "—" if n is None else f"{n / GIB:.2f}"


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| choice | run | peak RSS GiB | step s | trained params GiB | grads GiB | "
        "optimizer state GiB | EMA GiB | frozen GiB | note |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in rows:
        lines.append(
            f"| {r['choice']} | {r['mode']} | {gib(r.get('peak_rss'))} | "
            f"{r.get('step_s', '—')} | {gib(r['params_trained'])} | {gib(r['grads'])} | "
            f"{gib(r['optimizer_state'])} | {gib(r['ema'])} | {gib(r['params_frozen'])} | "
            f"{r.get('note', '')} |"
        )
    return head + "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--choices", default=",".join(CHOICES), help="comma-separated names")
    parser.add_argument("--cap-gb", type=float, default=20.0, help="resident memory cap per run")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds per run")
    parser.add_argument("--out", type=str, default=None, help="also write the table here")
    parser.add_argument("--child", type=str, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=["real", "meta"], default="real", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=str, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.child is not None:
        result = run_step(args.child) if args.mode == "real" else meta_sizes(args.child)
        Path(args.result).write_text(json.dumps(result))
        return
    choices = [c.strip() for c in args.choices.split(",") if c.strip()]
    unknown = [c for c in choices if c not in CHOICES]
    if unknown:
        parser.error(f"unknown choice(s) {unknown}; expected some of {list(CHOICES)}")
    rows = []
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench_train_memory_{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    for i, choice in enumerate(choices):
        cap = int(min(args.cap_gb * GIB, mem_available() - 1.5 * GIB))
        logger.warning("%s: real step (cap %.1f GiB, %.0f s)", choice, cap / GIB, args.timeout)
        result, why = run_child(choice, "real", cap, args.timeout, tmp / f"{i}.json")
        if result is None:
            logger.warning("%s: %s; sizes from the meta device", choice, why)
            result, why2 = run_child(choice, "meta", 4 * GIB, 600, tmp / f"{i}-meta.json")
            if result is None:
                logger.error("%s: the meta sizes failed too (%s)", choice, why2)
                continue
            result["note"] = f"real step {why}"
        rows.append(result)
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    text = table(rows)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
