"""The default run (`python main.py --base configs/txt2img.yaml -t`), shortened through overrides.

A few training steps on tiny batches, then the final judged evaluation: the run directory gets
the captioned grid, the captions and `final_scores.json` with per-attribute scores for the seen
and held-out prompt sets. Also checks the shipped first stage and the evaluation helpers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from ldm.data.judge import score
from ldm.evaluation import ATTRIBUTES, captioned_grid, format_table
from ldm.launch import run
from ldm.launch_cli import parse_command

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "txt2img.yaml"
WEIGHTS = ROOT / "checkpoints" / "shapes-kl-f4.safetensors"

SHORT = [
    "--trainer.max_steps",
    "3",
    "data.params.batch_size=4",
    "lightning.callbacks.image_logger.params.batch_frequency=2",
    "lightning.callbacks.image_logger.params.log_images_kwargs.ddim_steps=2",
    "lightning.callbacks.shapes_evaluation.params.n_per_split=2",
    "lightning.callbacks.shapes_evaluation.params.steps=3",
]


def _grid_cells(path: Path, n: int, columns: int, scale: int) -> np.ndarray:
    """The images of a `captioned_grid` PNG: [n, h, w, 3] uint8 (each cell's top-left pixels)."""
    grid = np.asarray(Image.open(path).convert("RGB"))
    cell = grid.shape[1] // columns  # cw + 4
    side = (cell - 4) // scale
    rows_h = grid.shape[0] // ((n + columns - 1) // columns)  # ch + 36 + 4
    out = []
    for i in range(n):
        x0, y0 = (i % columns) * cell, (i // columns) * rows_h
        tile = grid[y0 : y0 + side * scale : scale, x0 : x0 + side * scale : scale]
        out.append(tile)
    return np.stack(out)


def test_shortened_default_run_writes_grid_and_scores(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)  # the config names the shipped weights relative to the repository
    result = run(
        parse_command(["--base", str(CONFIG), "-t", "--no-test", "-l", str(tmp_path), *SHORT]).spec
    )
    assert result.global_step == 3
    logdir = result.run_dir
    record = json.loads((logdir / "final_scores.json").read_text())
    assert record["global_step"] == 3
    history = (logdir / "scores_history.jsonl").read_text().splitlines()
    assert [json.loads(h)["tag"] for h in history] == ["final"]
    assert record["sampling"]["sampler"] == "dpmpp_2m" and record["sampling"]["guidance_scale"] > 1
    assert set(record["scores"]) == {"seen", "heldout"}
    for scores in record["scores"].values():
        assert set(ATTRIBUTES) <= set(scores) and scores["n"] == 2
    # held-out prompts use only the held-out colour-shape pairs, seen prompts never do
    from ldm.data.shapes import HELDOUT_PAIRS, parse_caption

    pairs = {
        k: {(a["colour"], a["shape"]) for a in map(parse_caption, v)}
        for k, v in record["prompts"].items()
    }
    assert pairs["heldout"] <= set(HELDOUT_PAIRS) and not pairs["seen"] & set(HELDOUT_PAIRS)
    grid = logdir / "images" / "final" / "samples_gs-000003.png"
    assert grid.is_file() and Path(record["grid"]) == grid
    captions = (logdir / "images" / "final" / "captions_gs-000003.txt").read_text().splitlines()
    assert captions == record["prompts"]["seen"] + record["prompts"]["heldout"]
    # the recorded scores are the judge's verdicts on the very images in the grid: cut the cells
    # out (8 columns, each image upscaled 4x nearest), judge them against their prompts
    cells = _grid_cells(grid, n=len(captions), columns=8, scale=4)
    # (the verdicts exactly; the mean form IoU to the grid's 8-bit rounding)
    for key, sl in (("seen", slice(0, 2)), ("heldout", slice(2, None))):
        recorded, judged = dict(record["scores"][key]), score(cells[sl], captions[sl])
        assert recorded.pop("iou") == pytest.approx(judged.pop("iou"), abs=2e-3)
        assert recorded == judged
    # sample grids with captions were logged while training
    train = logdir / "images" / "train"
    assert list(train.glob("samples_cfg_scale_*_gs-000002_*.png"))
    assert list(train.glob("captions_gs-000002_*.txt"))
    # the frozen first stage came from the shipped weights, not a random init
    sd = torch.load(result.last_ckpt, map_location="cpu", weights_only=True)["state_dict"]
    from safetensors.torch import load_file

    shipped = load_file(WEIGHTS)
    key = "decoder.conv_out.weight"
    torch.testing.assert_close(sd["first_stage_model." + key], shipped[key].float())


def test_shipped_first_stage_reconstructs_shapes_the_judge_reads() -> None:
    """The shipped autoencoder keeps the attributes: the judge reads its reconstructions."""
    from ldm.data.judge import score
    from ldm.data.shapes import CaptionedShapes
    from ldm.util import instantiate_from_config

    cfg = OmegaConf.load(CONFIG).model.params.first_stage_config
    cfg.params.ckpt_path = str(WEIGHTS)
    ae = instantiate_from_config(cfg).eval()
    for split in ("validation", "heldout"):
        ds = CaptionedShapes(split=split, length=48, seed=7)
        x = torch.stack([torch.from_numpy(ds[i]["image"]) for i in range(len(ds))])
        x = x.permute(0, 3, 1, 2)  # [B, H, W, 3] -> [B, 3, H, W]
        with torch.no_grad():
            z = ae.encode(x).mode()
            assert z.shape == (48, 4, 8, 8)
            rec = ae.decode(z).clamp(-1, 1)
        s = score(rec, [ds.caption(i) for i in range(len(ds))])
        assert min(s["colour"], s["size"], s["position"]) >= 0.95, (split, s)
        if split == "validation":  # held-out pairs: small circles/squares are confused (README)
            assert s["caption"] >= 0.9, s
        mse = (rec - x).pow(2).mean()
        assert 10 * torch.log10(4.0 / mse) > 28.0  # PSNR in dB for data range 2


def test_captioned_grid_and_table() -> None:
    images = -torch.ones(3, 3, 8, 8)  # black in [-1, 1]
    images[1, 0] = 1.0  # a red image
    images[2] = 0.0  # mid grey
    grid = captioned_grid(images, ["a", "b", "c"], columns=2, scale=2)
    assert grid.size == (2 * (16 + 4), 2 * (16 + 36 + 4))
    assert grid.getpixel((20 + 5, 5)) == (255, 0, 0)  # second cell is red
    assert grid.getpixel((5, 5)) == (0, 0, 0)
    assert grid.getpixel((5, 16 + 36 + 4 + 5)) == (128, 128, 128)  # third cell, second row
    table = format_table({"seen": {**{a: 0.5 for a in ATTRIBUTES}, "n": 4}})
    assert "seen" in table and "50.0%" in table and table.splitlines()[1].endswith("4")


def test_default_text_encoder_keeps_each_word_itself() -> None:
    """The default text encoder (depth 0) gives a word the same features whatever words precede
    it, so a colour-shape pair never seen in training reaches the U-Net as two known words; a
    2-layer CLIP text transformer (causal) mixes the colour into the shape word."""
    from ldm.data.shapes import COLOURS, POSITIONS, SHAPES, SIZES, caption
    from ldm.util import instantiate_from_config

    cfg = OmegaConf.load(CONFIG).model.params.cond_stage_config
    torch.manual_seed(0)
    enc = instantiate_from_config(cfg).eval()

    longest = max(
        (
            caption({"size": s, "colour": c, "shape": h, "position": p})
            for s in SIZES
            for c in COLOURS
            for h in SHAPES
            for p in POSITIONS
        ),
        key=lambda text: len(enc.tokenizer.encode(text)),
    )
    n_tokens = len(enc.tokenizer.encode(longest)) + 2  # with BOS and EOS
    assert n_tokens <= enc.max_length, (longest, n_tokens)  # no caption is truncated
    prompts = ["a small yellow circle in the left", "a small red circle in the left"]
    with torch.no_grad():
        a, b = enc(prompts)
    torch.testing.assert_close(a[4], b[4])  # "circle" (BOS a small COLOUR circle)
    assert (a[3] - b[3]).abs().max() > 0.1  # the colour words themselves differ
    cfg.params.layers = 2
    deep = instantiate_from_config(cfg).eval()
    with torch.no_grad():
        a, b = deep(prompts)
    assert (a[4] - b[4]).abs().max() > 1e-3
