"""Judge a trained shapes text-to-image run (configs/txt2img.yaml) at several guidance scales.

    python scripts/eval_shapes.py logs/<run> --guidance 2 3 4 5 --n 32 --steps 20
    python scripts/eval_shapes.py logs/<base run> --lora logs/<lora run>/adapters/purple-lora.safetensors \
        --colour purple
    python scripts/eval_shapes.py logs/<base run> --embedding logs/<ti run>/adapters/purple.pt \
        --colour purple=<purple>

Loads the run's saved project config and checkpoints/last.ckpt (EMA weights), samples the fixed
seen / held-out prompts of `ldm.data.shapes.evaluation_prompts` with classifier-free guidance and
the chosen solver, and prints the judge's scores per guidance scale as JSON (the same
evaluation as the run's final `ShapesEvaluation`).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from omegaconf import OmegaConf

from ldm.adapters.sampling import adapters_applied
from ldm.data.shapes import evaluation_prompts
from ldm.evaluation import colour_sets, evaluate, format_table
from ldm.util import instantiate_from_config

logger = logging.getLogger("eval_shapes")


def load_run(run: Path, ckpt: str | None = None):
    """LatentDiffusion of a run directory with its last (or given) checkpoint, in eval mode."""
    configs = sorted((run / "configs").glob("*-project.yaml"))
    if not configs:
        raise FileNotFoundError(f"{run}/configs has no *-project.yaml; is {run} a run directory?")
    cfg = OmegaConf.load(configs[-1])
    cfg.model.params.ckpt_path = ckpt or str(run / "checkpoints" / "last.ckpt")
    return instantiate_from_config(cfg.model).eval()


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("run", type=Path, help="run directory logs/<timestamp>_txt2img")
    ap.add_argument("--ckpt", default=None, help="checkpoint (default: checkpoints/last.ckpt)")
    ap.add_argument("--guidance", type=float, nargs="+", default=[4.0])
    ap.add_argument("--n", type=int, default=32, help="prompts per set (seen, held-out)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--sampler", default="dpmpp_2m")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]")
    ap.add_argument("--embedding", action="append", default=[], metavar="PATH")
    ap.add_argument(
        "--colour",
        action="append",
        default=[],
        metavar="COLOUR[=WORD]",
        help="also judge prompts in COLOUR (e.g. purple), said as WORD (e.g. a learned token)",
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    model = load_run(args.run, args.ckpt)
    prompts = evaluation_prompts(n_per_split=args.n)
    words = dict((c.split("=", 1) + [c])[:2] for c in args.colour)
    extra, targets = colour_sets(words, args.n)
    prompts.update(extra)
    out = {}
    for g in args.guidance:
        with adapters_applied(model, args.lora, args.embedding):
            scores, _ = evaluate(
                model,
                prompts,
                targets,
                sampler=args.sampler,
                steps=args.steps,
                guidance_scale=g,
                seed=args.seed,
            )
        out[str(g)] = scores
        logging.getLogger().warning("guidance %.1f:\n%s", g, format_table(scores))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
