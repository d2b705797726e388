"""configs/stable-diffusion/sdxl-finetune.yaml through main.py: the SDXL base structure at a tiny width
(tests/configs/cli/sdxl_finetune_tiny.yaml), started from an sgm-layout checkpoint given on the command
line, two steps on a generated image folder; the written checkpoint keeps the SDXL key layout."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from ldm.config import merge_configs
from ldm.launch import run
from ldm.launch_cli import parse_command
from ldm.util import instantiate_from_config

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]
FINETUNE = ROOT / "configs" / "stable-diffusion" / "sdxl-finetune.yaml"
TINY = Path(__file__).parent / "configs" / "cli" / "sdxl_finetune_tiny.yaml"
SDXL_KEYS = (
    "conditioner.embedders.0.transformer.",
    "conditioner.embedders.1.model.",
    "model.diffusion_model.label_emb.0.0.weight",
    "first_stage_model.",
)


def image_folder(root: Path) -> Path:
    """Four captioned images of different sizes (metadata.jsonl), so crops and sizes vary."""
    root.mkdir()
    rng = np.random.default_rng(0)
    lines = []
    for i, (h, w) in enumerate([(80, 96), (96, 72), (64, 64), (70, 120)]):
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": f"a photo of thing {i}"}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def tiny_checkpoint(path: Path, folder: Path) -> Path:
    """A tiny SDXL 'base' checkpoint in the sgm layout (no EMA keys, as sd_xl_base_1.0)."""
    config, _ = merge_configs(
        [FINETUNE, TINY],
        ["model.params.ckpt_path=null", f"data.params.train.params.root={folder}"],
    )
    torch.manual_seed(0)
    model = instantiate_from_config(config.model)
    sd = {
        k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith("model_ema.")
    }
    save_file(sd, str(path))
    return path


def test_sdxl_finetune_config_trains_two_steps_from_a_checkpoint(tmp_path: Path) -> None:
    folder = image_folder(tmp_path / "images")
    ckpt = tiny_checkpoint(tmp_path / "sd_xl_tiny.safetensors", folder)
    args = ["--base", str(FINETUNE), str(TINY), "-t", "--no-test", "-l", str(tmp_path / "logs"),
            f"model.params.ckpt_path={ckpt}", f"data.params.train.params.root={folder}"]  # fmt: skip
    result = run(parse_command(args).spec)
    assert result.global_step == 2
    rows = list(csv.DictReader(open(result.run_dir / "csv" / "metrics.csv")))
    losses = [float(v) for r in rows for k, v in r.items() if k.startswith("train/loss") and v]
    assert losses and all(math.isfinite(v) for v in losses)
    sd = torch.load(result.last_ckpt, weights_only=True)["state_dict"]
    for prefix in SDXL_KEYS:
        assert any(k.startswith(prefix) for k in sd), prefix
    start = load_file(str(ckpt))
    # the checkpoint was loaded: frozen text encoders as given, the U-Net trained away from it
    key = "conditioner.embedders.1.model.token_embedding.weight"
    assert torch.equal(sd[key], start[key])
    key = "model.diffusion_model.label_emb.0.0.weight"
    assert sd[key].shape == start[key].shape == (32 * 4, 40 + 6 * 256)
    key = "model.diffusion_model.out.2.weight"  # zero-initialised in SDXL's U-Net, trained here
    assert not torch.equal(sd[key], start[key])
