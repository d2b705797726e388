"""Calibrate the judge's form criterion: best IoU with the generator's drawings (`judge.best_iou`).

    python scripts/calibrate_judge.py --n 200            # ~2-4 minutes on 2 cores
    python scripts/calibrate_judge.py --n 200 --no-first-stage

For n items of the training and held-out splits it measures the best IoU of: the data set's own
images; the same images reconstructed by the shipped first stage (checkpoints/, the decoder
every sample goes through); and constructed failures at the same captions
(`ldm.data.judge_calibration`: two touching copies, the same at the area of one shape, a square
with concave sides, another shape), raw and reconstructed. Prints a Markdown table of the
distribution and the fraction at or above the threshold, and checks the threshold against the
raw images: it must lie above every raw failure and at or below every raw data set image. It
also prints the first stage's ceiling, the 1st percentile of its reconstructions of the data set
rounded down to 0.01 (how the threshold was first set, with the previous first stage: 0.87).
The threshold stays fixed when the first stage changes, so scores stay comparable.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from ldm.data import judge as J
from ldm.data import shapes as S
from ldm.data.judge_calibration import failure_images
from ldm.util import instantiate_from_config

ROOT = Path(__file__).resolve().parents[1]


def load_first_stage(config: Path) -> torch.nn.Module:
    """The default run's frozen first stage (weights from its ckpt_path, relative to the repo)."""
    cfg = OmegaConf.load(config).model.params.first_stage_config
    cfg.params.ckpt_path = str(ROOT / cfg.params.ckpt_path)
    return instantiate_from_config(cfg).eval()


@torch.no_grad()
def reconstruct(ae: torch.nn.Module, images: list[np.ndarray]) -> np.ndarray:
    """uint8 H x W x 3 images -> D(mode(E(x))) as N x H x W x 3 in [0, 1]."""
    x = torch.from_numpy(np.stack(images).astype(np.float32) / 127.5 - 1.0).permute(0, 3, 1, 2)
    return J.to_unit_batch(ae.decode(ae.encode(x).mode()).clamp(-1, 1))


def collect(n: int, seed: int, ae: torch.nn.Module | None) -> dict[str, list[float]]:
    """{group: best IoUs} for the data set's images and each failure kind (and reconstructions)."""
    images: dict[str, list[np.ndarray]] = {}
    targets: dict[str, list[dict]] = {}
    for split in ("train", "heldout"):
        for i in range(n):
            attrs = S.sample_attributes(seed, split, i)
            kinds = {"data set image": [S.render(attrs)], **failure_images(attrs)}
            for kind, ims in kinds.items():
                images.setdefault(kind, []).extend(ims)
                targets.setdefault(kind, []).extend([attrs] * len(ims))
    out: dict[str, list[float]] = {}
    for kind, ims in images.items():
        raw = J.to_unit_batch(np.stack(ims))
        out[kind] = [J.best_iou(im, t) for im, t in zip(raw, targets[kind])]
        if ae is not None:
            rec = reconstruct(ae, ims)
            out[f"{kind}, first stage"] = [J.best_iou(im, t) for im, t in zip(rec, targets[kind])]
    return out


def table(groups: dict[str, list[float]], threshold: float) -> str:
    """Markdown table: n, min, 1st/5th/50th percentile, max, share >= threshold."""
    rows = [
        f"| images | n | min | p1 | p5 | median | max | >= {threshold:.2f} |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, v in groups.items():
        a = np.asarray(v)
        q = np.percentile(a, [1, 5, 50])
        rows.append(
            f"| {name} | {len(a)} | {a.min():.3f} | {q[0]:.3f} | {q[1]:.3f} | {q[2]:.3f} "
            f"| {a.max():.3f} | {100 * (a >= threshold).mean():.1f}% |"
        )
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n", type=int, default=200, help="items per split (train, heldout)")
    ap.add_argument("--seed", type=int, default=7, help="data set seed of the items")
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "txt2img.yaml")
    ap.add_argument("--no-first-stage", action="store_true", help="skip the reconstructions")
    args = ap.parse_args()
    ae = None if args.no_first_stage else load_first_stage(args.config)
    groups = collect(args.n, args.seed, ae)
    print(table(groups, J.IOU_THRESHOLD))
    failures = [
        v
        for k, vs in groups.items()
        if k != "data set image" and not k.endswith(", first stage")
        for v in vs
    ]
    low, high = max(failures), min(groups["data set image"])
    verdict = "separates them" if low < J.IOU_THRESHOLD <= high else "does NOT separate them"
    print(
        f"\njudge.IOU_THRESHOLD = {J.IOU_THRESHOLD:.2f}: raw failures <= {low:.3f}, raw data set "
        f"images >= {high:.3f}: the threshold {verdict}"
    )
    if "data set image, first stage" in groups:
        ceiling = math.floor(100 * float(np.percentile(groups["data set image, first stage"], 1)))
        print(f"first stage ceiling (p1 of its reconstructions, rounded down): {ceiling / 100:.2f}")


if __name__ == "__main__":
    main()
