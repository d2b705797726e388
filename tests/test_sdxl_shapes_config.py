"""configs/sdxl-shapes.yaml (SDXL's conditioning structure trained on the captioned shapes) through
main.py for 30 steps: the loss falls, the checkpoint has the SDXL layout, and the items' size / crop
micro-conditioning reaches the U-Net (through the vector y and label_emb)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from ldm.config import merge_configs
from ldm.launch import run
from ldm.launch_cli import parse_command
from ldm.util import instantiate_from_config

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "sdxl-shapes.yaml"
FAST = Path(__file__).parent / "configs" / "cli" / "sdxl_shapes_fast.yaml"


def test_sdxl_shapes_config_learns_and_reads_micro_conditioning(tmp_path: Path) -> None:
    args = ["--base", str(CONFIG), str(FAST), "-t", "--no-test", "-l", str(tmp_path), "-s", "1"]
    result = run(parse_command(args).spec)
    assert result.global_step == 30
    rows = list(csv.DictReader(open(result.run_dir / "csv" / "metrics.csv")))
    losses = [float(r["train/loss_step"]) for r in rows if r.get("train/loss_step")]
    assert len(losses) == 30
    first, last = sum(losses[:8]) / 8, sum(losses[-8:]) / 8
    assert last < 0.8 * first, (first, last)

    sd = torch.load(result.last_ckpt, weights_only=True)["state_dict"]
    for prefix in (
        "conditioner.embedders.0.transformer.",  # first text tower
        "conditioner.embedders.1.transformer.",  # second text tower (pooled vector too)
        "model.diffusion_model.label_emb.0.0.weight",
    ):
        assert any(k.startswith(prefix) for k in sd), prefix
    assert sd["model.diffusion_model.label_emb.0.0.weight"].shape[1] == 64 + 6 * 256

    config, _ = merge_configs([CONFIG])
    model = instantiate_from_config(config.model).eval()
    model.load_state_dict(sd)
    n = 2
    batch = {
        "caption": ["a small red circle in the top left"] * n,
        "original_size_as_tuple": torch.tensor([[32, 32]] * n),
        "crop_coords_top_left": torch.tensor([[0, 0]] * n),
        "target_size_as_tuple": torch.tensor([[32, 32]] * n),
    }
    x, t = torch.randn(n, 4, 8, 8), torch.tensor([500, 500])
    with torch.no_grad():
        cond = model.conditioner.batch_condition(batch, None, None)
        assert cond["c_crossattn"][0].shape == (n, 16, 128)  # 64 + 64 (the two text towers)
        assert cond["c_adm"].shape == (n, 64 + 6 * 256)
        out = model.apply_model(x, t, cond)
        for key in ("original_size_as_tuple", "crop_coords_top_left"):
            other = dict(batch, **{key: torch.tensor([[512, 768]] * n)})
            out2 = model.apply_model(x, t, model.conditioner.batch_condition(other, None, None))
            assert (out2 - out).abs().max() > 1e-4, key

    # ImageLogger's guided samples: the unconditional input of every embedder (text nulls, sizes)
    batch["image"] = torch.zeros(n, 32, 32, 3)
    log = model.log_images(
        batch, N=n, ddim_steps=2, unconditional_guidance_scale=4.0, inpaint=False,
        plot_diffusion_rows=False, plot_progressive_rows=False,
    )  # fmt: skip
    assert log["samples_cfg_scale_4.00"].shape == (n, 3, 32, 32)
