"""`python -m ldm fit|validate|test --config FILE`: the same resolved config and run as main.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ldm.launch import run
from ldm.launch_cli import parse_command
from ldm.lightning_cli import lightning_config, parse, resolved_config

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "tests" / "configs" / "cli" / "toy.yaml"


def test_fit_and_main_py_resolve_the_same_config() -> None:
    cfg = str(ROOT / "configs" / "txt2img.yaml")
    ours, _ = parse(["fit", "--config", cfg, "--trainer.max_steps", "3", "--model.ema_decay", "0.99",
                     "--data.batch_size", "8", "--model.init_args.channels", "4"])  # fmt: skip
    compvis = parse_command(["--base", cfg, "-t", "--trainer.max_steps", "3",
                             "model.params.ema_decay=0.99", "--data.params.batch_size", "8",
                             "model.params.channels=4"]).spec  # fmt: skip
    assert resolved_config(ours) == resolved_config(compvis)
    assert ours.train and compvis.train and ours.seed == compvis.seed
    resolved = resolved_config(ours)
    assert resolved["lightning"]["trainer"]["max_steps"] == 3
    assert resolved["model"]["params"]["ema_decay"] == 0.99
    assert resolved["data"]["params"]["batch_size"] == 8


def test_print_config_shows_class_path_and_init_args() -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "ldm",
            "fit",
            "--config",
            str(ROOT / "configs" / "txt2img.yaml"),
            "--trainer.max_steps",
            "3",
            "--print_config",
        ],  # fmt: skip
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    printed = yaml.safe_load(out.stdout)
    assert printed["trainer"]["max_steps"] == 3 and printed["seed_everything"] == 23
    model = printed["model"]
    assert model["class_path"] == "ldm.models.diffusion.ddpm.LatentDiffusion"
    unet = model["init_args"]["unet_config"]
    assert unet["class_path"] == "ldm.modules.unet.UNetModel"
    assert unet["init_args"]["model_channels"] == 64
    assert printed["data"]["class_path"] == "ldm.data.datamodule.DataModuleFromConfig"
    assert "target" not in out.stdout and "params:" not in out.stdout


def test_fit_then_validate_and_test_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT / "tests" / "fixtures"))
    common = ["--config", str(TOY), "-l", str(tmp_path), "lightning.callbacks.image_logger=null"]
    spec, printed = parse(["fit", *common, "--trainer.max_steps", "4", "--model.hidden", "6"])
    assert not printed and spec.no_test
    result = run(spec)
    assert result.global_step == 4
    ckpt = result.last_ckpt
    spec, _ = parse(["validate", *common, "--model.hidden", "6", "--ckpt_path", str(ckpt)])
    assert not spec.train and spec.validate
    validated = run(spec)
    assert "val/loss" in validated.metrics
    with pytest.raises(SystemExit):
        parse(["fit", "--trainer.max_steps", "3"])  # no --config
    test_split = ["data.params.test.target=toy_model.ToyDataset", "data.params.test.params.n=8"]
    spec, _ = parse(["test", *common, *test_split, "--model.hidden", "6", "--ckpt_path", str(ckpt)])
    tested = run(spec)
    assert "test/loss" in tested.metrics
    assert lightning_config(spec)["model"]["init_args"]["hidden"] == 6
