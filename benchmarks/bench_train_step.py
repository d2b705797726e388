"""Benchmark: one training step of the default text-to-image model (configs/txt2img.yaml) on CPU.

Builds the model from the config (shipped first stage, random U-Net and text encoder), renders
batches of captioned shapes, then times `training_step` + backward + optimizer step, with the
optimizer the model configures (fused AdamW where it applies) and with the unfused loop AdamW
(PyTorch's default on CPU), alternating so that both see the same machine load.

    python benchmarks/bench_train_step.py --threads 2 --steps 20
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from ldm.data.shapes import CaptionedShapes
from ldm.util import instantiate_from_config

logger = logging.getLogger("bench_train_step")
ROOT = Path(__file__).resolve().parents[1]


def batches(n: int, batch_size: int) -> list[dict]:
    ds = CaptionedShapes("train", length=n * batch_size)
    out = []
    for b in range(n):
        items = [ds[i] for i in range(b * batch_size, (b + 1) * batch_size)]
        out.append(
            {
                "image": torch.stack([torch.from_numpy(it["image"]) for it in items]),
                "caption": [it["caption"] for it in items],
            }
        )
    return out


def time_steps(model, opt, data) -> list[float]:
    times = []
    for batch in data:
        batch = {"image": batch["image"], "caption": list(batch["caption"])}
        start = time.perf_counter()
        loss = model.training_step(batch, 0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "txt2img.yaml"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per optimizer and round")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = OmegaConf.load(args.config)
    model = instantiate_from_config(cfg.model)
    model.learning_rate = 1e-4
    bs = int(cfg.data.params.batch_size)
    data = batches(args.steps + 2, bs)
    model.on_train_batch_start(data[0], 0)  # scale_by_std from the first batch
    params = model.trainable_parameters()
    fused = model.configure_optimizers()
    fused = fused[0][0] if isinstance(fused, tuple | list) else fused
    plain = torch.optim.AdamW(params, lr=1e-4, foreach=False)
    results: dict[str, list[float]] = {"configured": [], "loop AdamW": []}
    for _ in range(args.rounds):
        for name, opt in (("configured", fused), ("loop AdamW", plain)):
            time_steps(model, opt, data[:2])  # warm-up
            results[name] += time_steps(model, opt, data[2:])
    med = {k: statistics.median(v) for k, v in results.items()}
    logger.info(
        "batch %d, %d threads, %d steps each: configured optimizer (fused=%s) %.3f s/step, "
        "loop AdamW %.3f s/step, ratio %.2f",
        bs,
        args.threads,
        len(results["configured"]),
        fused.defaults.get("fused"),
        med["configured"],
        med["loop AdamW"],
        med["configured"] / med["loop AdamW"],
    )


if __name__ == "__main__":
    main()
