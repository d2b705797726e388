"""PSNR / SSIM of a first-stage autoencoder on held-out photo crops (scikit-image photos never trained on).

    python scripts/eval_autoencoder.py --config configs/autoencoder/kl-f4-small.yaml \
        --ckpt logs/kl-f4-small/last.ckpt --crops 256
"""

from __future__ import annotations

import argparse
import json
import logging

from omegaconf import OmegaConf

from ldm.models.autoencoder_eval import evaluate_reconstruction
from ldm.util import instantiate_from_config

logger = logging.getLogger("eval_autoencoder")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", required=True)
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--crops", type=int, default=256)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO)
    cfg = OmegaConf.load(args.config)
    cfg.model.params.ckpt_path = args.ckpt
    model = instantiate_from_config(cfg.model)
    print(json.dumps(evaluate_reconstruction(model, n_crops=args.crops)))


if __name__ == "__main__":
    main()
