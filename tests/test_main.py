"""main.py end to end on CPU with a tiny model: run directory layout, merging, lr rule, errors."""

from __future__ import annotations

import csv
import logging
import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ldm.launch import run  # noqa: E402
from ldm.launch_cli import get_parser, parse_command  # noqa: E402
from main import main  # noqa: E402

CFG = Path(__file__).parent / "configs" / "cli"


def _run(tmp_path: Path, *args: str):
    return run(
        parse_command(["--base", str(CFG / "toy.yaml"), "-t", "-l", str(tmp_path), *args]).spec
    )


def test_tiny_run_layout(tmp_path: Path) -> None:
    result = _run(tmp_path, "--trainer.max_steps", "6")
    logdir = result.run_dir
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d-\d\d-\d\d_toy", logdir.name)
    assert logdir.parent == tmp_path
    assert result.global_step == 6
    # checkpoints: last.ckpt plus the periodic one (every 2 steps, latest kept)
    ckpts = sorted(p.name for p in (logdir / "checkpoints").iterdir())
    assert "last.ckpt" in ckpts and "epoch=000000-step=000000006.ckpt" in ckpts
    last = torch.load(logdir / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 6 and "optimizer_states" in last and "lr_schedulers" in last
    # configs: the resolved project config and the lightning config of this launch
    now = logdir.name.split("_")[0]
    project = OmegaConf.load(logdir / "configs" / f"{now}-project.yaml")
    lightning = OmegaConf.load(logdir / "configs" / f"{now}-lightning.yaml")
    assert project.model.target == "toy_model.ToyModel" and "lightning" not in project
    assert lightning.lightning.trainer.max_steps == 6
    # images: grids at steps 1, 2, 4, 6 (powers of two below the frequency, then every 2) + captions
    train_imgs = sorted(p.name for p in (logdir / "images" / "train").glob("inputs_*.png"))
    assert [int(n.split("gs-")[1][:6]) for n in train_imgs] == [1, 2, 4, 6]
    caption = (logdir / "images" / "train" / "captions_gs-000002_e-000000_b-000001.txt").read_text()
    assert len(caption.splitlines()) == 4 and caption.startswith("item ")
    from PIL import Image

    grid = Image.open(logdir / "images" / "train" / train_imgs[0])
    assert grid.mode == "RGB" and grid.size[0] > 4  # 4 images of 4x4 in a padded grid
    # metrics: CSV always
    rows = list(csv.DictReader(open(logdir / "csv" / "metrics.csv")))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) == 6
    assert result.last_ckpt == logdir / "checkpoints" / "last.ckpt"


def test_merged_configs_and_lr_rule(tmp_path: Path) -> None:
    """The acceptance command: two configs, a dotlist override and a --trainer flag."""
    result = run(
        parse_command(
            [
                "--base",
                str(CFG / "toy.yaml"),
                str(CFG / "override.yaml"),
                "-t",
                "model.base_learning_rate=1e-4",
                "--trainer.max_steps",
                "20",
                "-l",
                str(tmp_path),
            ]
        ).spec
    )
    assert result.global_step == 20
    assert result.learning_rate == pytest.approx(
        1 * 1 * 1 * 4 * 1e-4
    )  # acc * devices * nodes * bs * base
    now = result.run_dir.name.split("_")[0]
    project = OmegaConf.load(result.run_dir / "configs" / f"{now}-project.yaml")
    assert project.model.params.hidden == 16  # from override.yaml
    assert project.model.base_learning_rate == pytest.approx(1e-4)  # from the command line
    state = torch.load(result.last_ckpt, weights_only=True)
    assert state["state_dict"]["net.0.weight"].shape == (16, 4)
    # the optimizer ran with the scaled rate (LambdaLR warm-up reached factor 1)
    assert state["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(4e-4)


def test_scale_lr_false_and_accumulation(tmp_path: Path) -> None:
    r = _run(tmp_path, "--scale_lr", "false", "--trainer.max_steps", "2", "-n", "a")
    assert r.learning_rate == pytest.approx(1e-3)
    r = _run(
        tmp_path, "--trainer.accumulate_grad_batches", "2", "--trainer.max_steps", "2", "-n", "b"
    )
    assert r.learning_rate == pytest.approx(2 * 4 * 1e-3)


def test_name_postfix_project(tmp_path: Path) -> None:
    r = _run(tmp_path, "-n", "exp", "-f", "_v2", "-p", "proj", "--trainer.max_steps", "1")
    assert r.run_dir.parent == tmp_path / "proj" and r.run_dir.name.endswith("_exp_v2")


def test_config_errors_exit_cleanly(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    base = ["--base", str(CFG / "toy.yaml"), "-t", "-l", str(tmp_path)]
    with caplog.at_level(logging.ERROR):
        assert main([*base, "model.params.hiden=3"]) == 2
    assert "did you mean 'hidden'" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert main([*base, "--trainer.max_step", "3"]) == 2
    assert "did you mean 'max_steps'" in caplog.text
    caplog.clear()
    caplog.clear()
    bad = tmp_path / "bad.yaml"  # a constructor argument a file misspells: named with its file
    bad.write_text("model:\n  params:\n    hiden: 3\n")
    with caplog.at_level(logging.ERROR):
        assert main([*base, "--base", str(CFG / "toy.yaml"), str(bad)]) == 2
    assert "model.params.hiden (set in " + str(bad) in caplog.text
    assert "ToyModel has no parameter 'hiden' (did you mean 'hidden'?)" in caplog.text
    assert [p.name for p in tmp_path.iterdir()] == ["bad.yaml"]  # no run directory was written
    with caplog.at_level(logging.ERROR):
        assert main(["-n", "x", "-r", str(tmp_path)]) == 2
    assert "cannot be used together" in caplog.text


def test_help_documents_every_flag() -> None:
    text = get_parser().format_help()
    for flag in ("-b", "--base", "-t", "--train", "-r", "--resume", "-n", "--name", "-p", "--project",
                 "-f", "--postfix", "-l", "--logdir", "-s", "--seed", "--scale_lr", "--no-test",
                 "-d", "--debug", "--sweep", "--sweep-backend"):  # fmt: skip
        assert re.search(rf"(^|[\s,\[]){re.escape(flag)}[\s,\]]", text), flag
    assert "--trainer.devices 2" in text and "model.params.x=1" in text


def test_exception_during_fit_saves_last_ckpt(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="planned failure"):
        _run(
            tmp_path,
            "--trainer.max_steps",
            "10",
            "lightning.callbacks.fail.target=toy_model.FailAtStep",
            "lightning.callbacks.fail.params.step=3",
            "lightning.modelcheckpoint.params.every_n_train_steps=100",
        )
    (logdir,) = tmp_path.iterdir()
    state = torch.load(logdir / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["global_step"] == 3  # saved by the exception handler, not by a periodic save


@pytest.mark.skipif(
    not hasattr(__import__("signal"), "SIGUSR1"), reason="no SIGUSR1 on this platform"
)
def test_sigusr1_saves_and_stops(tmp_path: Path) -> None:
    r = _run(
        tmp_path,
        "--trainer.max_steps",
        "50",
        "lightning.callbacks.sig.target=toy_model.SignalAtStep",
        "lightning.callbacks.sig.params.step=3",
        "lightning.modelcheckpoint.params.every_n_train_steps=100",
    )
    assert r.interrupted and r.status == "interrupted" and r.global_step == 3
    assert (
        torch.load(r.run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
    )


@pytest.mark.skipif(not hasattr(__import__("signal"), "SIGTERM"), reason="no SIGTERM")
def test_sigterm_saves_and_exits(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):  # Lightning's SIGTERMException: a clean exit
        _run(
            tmp_path,
            "--trainer.max_steps",
            "50",
            "lightning.callbacks.sig.target=toy_model.SignalAtStep",
            "lightning.callbacks.sig.params.step=2",
            "lightning.callbacks.sig.params.signame=SIGTERM",
            "lightning.modelcheckpoint.params.every_n_train_steps=100",
        )
    (logdir,) = tmp_path.iterdir()
    assert torch.load(logdir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2


def test_test_split_runs_after_fit_unless_no_test(tmp_path: Path) -> None:
    test_split = ["data.params.test.target=toy_model.ToyDataset", "data.params.test.params.n=8"]
    r = _run(tmp_path, "--trainer.max_steps", "2", "-n", "with_test", *test_split)
    assert "test/loss" in r.metrics
    r = _run(tmp_path, "--trainer.max_steps", "2", "-n", "no_test", "--no-test", *test_split)
    assert "test/loss" not in r.metrics


def test_debug_run_moves_to_debug_runs(tmp_path: Path) -> None:
    r = _run(tmp_path, "-d", "--trainer.max_steps", "1")
    assert (
        r.run_dir.parent == tmp_path / "debug_runs"
        and (r.run_dir / "checkpoints" / "last.ckpt").exists()
    )
    assert [p.name for p in tmp_path.iterdir()] == ["debug_runs"]
    assert r.last_ckpt == r.run_dir / "checkpoints" / "last.ckpt"  # where it was moved to


def test_constructor_value_error_is_reported_with_the_section(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ldm_cfg = CFG / "tiny_ldm.yaml"  # GroupNorm(32) cannot normalise 8 channels: a value mistake
    argv = [
        "--base",
        str(ldm_cfg),
        "-t",
        "-l",
        str(tmp_path),
        "model.params.unet_config.params.model_channels=8",
    ]
    with caplog.at_level(logging.ERROR):
        assert main(argv) == 2
    # the innermost section that failed, where its value was set, the component, the cause and
    # where to fix it
    assert (
        "model.params.unet_config (set in command line): building UNetModel failed: "
        "num_channels (8) must be divisible by num_groups (32). "
        "Check the values under 'model.params.unet_config.params'."
    ) in caplog.text
