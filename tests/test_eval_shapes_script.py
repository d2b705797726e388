"""Behaviour of scripts/eval_shapes.py: the prompts it judges, the flags reaching the sampler,
and the scores it prints equal to the judge (ldm/data/judge.py) on the images it sampled."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from tests.fixtures.shapes_checkpoint import write_shapes_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "eval_shapes.py"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A txt2img run directory: configs/<t>-project.yaml and checkpoints/last.ckpt (random weights)."""
    run = tmp_path_factory.mktemp("run")
    (run / "configs").mkdir()
    (run / "checkpoints").mkdir()
    cfg = OmegaConf.load(ROOT / "configs" / "txt2img.yaml")
    first = cfg.model.params.first_stage_config.params
    first.ckpt_path = str(ROOT / first.ckpt_path)
    OmegaConf.save(cfg, run / "configs" / "2026-01-01T00-00-00-project.yaml")
    write_shapes_checkpoint(run / "checkpoints" / "last.ckpt", seed=0)
    return run


def run_script(monkeypatch, capsys, *args: str) -> dict:
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), *args])
    runpy.run_path(str(SCRIPT), run_name="__main__")
    out = capsys.readouterr().out
    return json.loads(out[out.index("{") :])


def oracle(colour_swap: dict[str, str] | None = None, calls: list | None = None):
    """A stand-in for ldm.evaluation.sample_prompts that draws each prompt's shape exactly
    (``<purple>`` read as purple), optionally with colours swapped; records its keyword args."""
    from ldm.data.shapes import parse_caption, render

    def sample_prompts(model, prompts, **kwargs):
        if calls is not None:
            calls.append((list(prompts), kwargs))
        images = []
        for p in prompts:
            attrs = parse_caption(p.replace("<purple>", "purple"))
            if colour_swap:
                attrs["colour"] = colour_swap.get(attrs["colour"], attrs["colour"])
            images.append(render(attrs))
        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        return x

    return sample_prompts


def test_perfect_images_score_one_and_flags_reach_the_sampler(run_dir, monkeypatch, capsys):
    from ldm.data.shapes import evaluation_prompts

    calls: list = []
    monkeypatch.setattr("ldm.evaluation.sample_prompts", oracle(calls=calls))
    args = [str(run_dir), "--n", "3", "--guidance", "2", "5", "--steps", "7"]
    args += ["--sampler", "euler", "--seed", "11", "--colour", "purple=<purple>"]
    out = run_script(monkeypatch, capsys, *args)
    assert list(out) == ["2.0", "5.0"]
    for g in out:
        assert set(out[g]) == {"seen", "heldout", "purple"}
        for name, s in out[g].items():
            assert s["caption"] == 1.0 and s["colour"] == 1.0 and s["n"] == 3.0, (g, name)
    prompts = evaluation_prompts(n_per_split=3)
    seen = [c for c in calls if c[0] == prompts["seen"]]
    assert len(seen) == 2
    assert [c[1]["guidance_scale"] for c in seen] == [2.0, 5.0]
    for _, kw in calls:
        assert (kw["steps"], kw["sampler"], kw["seed"]) == (7, "euler", 11)
    purple = [c[0] for c in calls if c[0] not in (prompts["seen"], prompts["heldout"])]
    assert purple and all("<purple>" in p for p in purple[0])  # said as the learned word ...


def test_wrong_colours_score_zero_colour_and_full_shape(run_dir, monkeypatch, capsys):
    from ldm.data.shapes import COLOURS

    names = list(COLOURS)
    swap = {c: names[(i + 1) % len(names)] for i, c in enumerate(names)}
    monkeypatch.setattr("ldm.evaluation.sample_prompts", oracle(colour_swap=swap))
    out = run_script(monkeypatch, capsys, str(run_dir), "--n", "4")
    for name, s in out["4.0"].items():  # ... and judged against the real colour
        assert s["colour"] == 0.0 and s["caption"] == 0.0, name
        assert s["shape"] == 1.0 and s["position"] == 1.0 and s["size"] == 1.0, name


def test_scores_are_the_judge_on_the_sampled_images(run_dir, monkeypatch, capsys):
    """Real sampling (random weights, 2 steps): the printed scores are judge.score of the images
    sample_prompts gave, and those come from the run's last.ckpt (EMA weights) with the flags."""
    import ldm.evaluation
    from ldm.checkpoint.safe_load import load_state_dict
    from ldm.data.judge import score
    from ldm.data.shapes import evaluation_prompts

    real = ldm.evaluation.sample_prompts
    seen: list = []

    def recording(model, prompts, **kwargs):
        images = real(model, prompts, **kwargs)
        seen.append((model, list(prompts), kwargs, images))
        return images

    monkeypatch.setattr("ldm.evaluation.sample_prompts", recording)
    args = [str(run_dir), "--n", "2", "--guidance", "3", "--steps", "2", "--seed", "5"]
    out = run_script(monkeypatch, capsys, *args)
    prompts = evaluation_prompts(n_per_split=2)
    assert [p for _, p, _, _ in seen] == [prompts["seen"], prompts["heldout"]]
    for (_model, p, kwargs, images), name in zip(seen, ("seen", "heldout")):
        assert kwargs == dict(sampler="dpmpp_2m", steps=2, guidance_scale=3.0, seed=5)
        assert out["3.0"][name] == score(images, p), name
    # the model sampled is the checkpoint's: its weights equal last.ckpt's
    sd = load_state_dict(str(run_dir / "checkpoints" / "last.ckpt"))
    msd = seen[0][0].state_dict()
    diff = [k for k in sd if k.startswith("model") and not torch.equal(sd[k], msd[k])]
    assert not diff
