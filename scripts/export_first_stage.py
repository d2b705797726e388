"""Strip a trained shapes autoencoder to its inference weights and measure it.

    python scripts/export_first_stage.py --ckpt logs/<run>/checkpoints/last.ckpt \
        --config configs/autoencoder/shapes-kl-f4.yaml --out checkpoints/shapes-kl-f4.safetensors

Keeps encoder.*, decoder.*, quant_conv.*, post_quant_conv.* (drops loss / discriminator /
optimizer state), stores them as fp16 safetensors, reloads the exported file into the inference
model and reports reconstruction PSNR and the judge's accuracy on reconstructions of held-out
captioned shapes (validation and held-out-pair splits) as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from ldm.util import instantiate_from_config

logger = logging.getLogger("export_first_stage")

KEEP = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")


def strip(ckpt: str, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """Inference weights of an AutoencoderKL checkpoint (.ckpt / .safetensors), cast to dtype."""
    from ldm.checkpoint.safe_load import load_state_dict

    sd = load_state_dict(ckpt)
    out = {k: v.to(dtype).contiguous() for k, v in sd.items() if k.startswith(KEEP)}
    if not out:
        raise ValueError(
            f"{ckpt}: no keys starting with {KEEP}; is it an AutoencoderKL checkpoint?"
        )
    return out


def inference_model(config: str, weights: str) -> Any:
    """The config's AutoencoderKL without its training loss, weights loaded from `weights`."""
    cfg = OmegaConf.load(config)
    cfg.model.params.lossconfig = {"target": "torch.nn.Identity"}
    cfg.model.params.ckpt_path = weights
    return instantiate_from_config(cfg.model).eval()


@torch.no_grad()
def measure(model: Any, n: int = 512, batch_size: int = 64) -> dict[str, Any]:
    """PSNR (dB) and judge scores of D(mode(E(x))) on n items of the validation and heldout splits."""
    from ldm.data.judge import score
    from ldm.data.shapes import CaptionedShapes
    from ldm.metrics import psnr

    result: dict[str, Any] = {}
    for split in ("validation", "heldout"):
        ds = CaptionedShapes(split=split, length=n)
        recs, caps, p = [], [], []
        for i in range(0, n, batch_size):
            items = [ds[j] for j in range(i, min(i + batch_size, n))]
            x = torch.stack([torch.from_numpy(it["image"]) for it in items]).permute(0, 3, 1, 2)
            xrec = model.reconstruct(x)[0].clamp(-1.0, 1.0)  # [B, 3, H, W]
            p.append(psnr(x, xrec))
            recs.append(xrec)
            caps += [it["caption"] for it in items]
        result[split] = {
            "psnr_db": round(float(torch.cat(p).mean()), 2),
            **score(torch.cat(recs), caps),
        }
        inputs = [ds.image(j) for j in range(n)]
        result[split]["judge_on_inputs_caption"] = score(inputs, caps)["caption"]
    return result


def main() -> int:
    """Export and measure; a bad file or flag is one message on stderr (exit 2), not a traceback."""
    from ldm.commands.validation import int_in
    from ldm.errors import exit_code, report

    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--ckpt", required=True, help="trained run's checkpoint (last.ckpt)")
    ap.add_argument("--config", default="configs/autoencoder/shapes-kl-f4.yaml")
    ap.add_argument("--out", default="checkpoints/shapes-kl-f4.safetensors")
    ap.add_argument("--fp32", action="store_true", help="store fp32 instead of fp16")
    ap.add_argument("-n", type=int_in(1), default=512, help="images per split for the measurement")
    args = ap.parse_args()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        export(args)
    except Exception as err:
        code = exit_code(err, (ValueError,))
        if code is None:
            raise
        return report("export_first_stage.py", err, code)
    return 0


def export(args: argparse.Namespace) -> None:
    """Write the stripped weights (whole or not at all) and print the measurements."""
    from ldm.atomic_output import atomic_path
    from ldm.config import load_yaml

    load_yaml(args.config)  # a missing or broken config is named before any work
    sd = strip(args.ckpt, torch.float32 if args.fp32 else torch.float16)
    with atomic_path(args.out) as tmp:
        save_file(sd, str(tmp), metadata={"source": Path(args.ckpt).name, "config": args.config})
    logger.info(
        "wrote %s (%d tensors, %.2f MB)", args.out, len(sd), Path(args.out).stat().st_size / 1e6
    )
    print(json.dumps(measure(inference_model(args.config, args.out), n=args.n), indent=2))


if __name__ == "__main__":
    raise SystemExit(main())
