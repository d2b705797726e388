"""Config loading, merging, override syntax, readable errors, Trainer translation, lr rule."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ldm.config import ConfigSources, explain, merge_configs, split_cli
from ldm.launch import scale_learning_rate
from ldm.launch_cli import get_parser, parse_command
from ldm.trainer_setup import trainer_cli_args, translate_trainer_config
from ldm.util import ConfigError

CFG = Path(__file__).parent / "configs" / "cli"
ROOT = Path(__file__).resolve().parent.parent
OWN = [s for a in get_parser()._actions for s in a.option_strings]


def _split(argv: list[str]) -> tuple[list[str], list[str]]:
    return split_cli(argv, OWN, trainer_cli_args())


def test_override_forms_are_equivalent() -> None:
    forms = [
        ["model.params.hidden=3"],
        ["--model.params.hidden=3"],
        ["--model.params.hidden", "3"],
    ]
    for argv in forms:
        rest, overrides = _split(["-t", *argv, "--no-test"])
        assert rest == ["-t", "--no-test"]
        assert overrides == ["model.params.hidden=3"]


def test_trainer_shorthands_map_to_lightning_trainer() -> None:
    _, ov = _split(
        ["--trainer.devices", "2", "trainer.max_steps=5", "--gpus", "0,", "--max_steps=7"]
    )
    assert ov == [
        "lightning.trainer.devices=2",
        "lightning.trainer.max_steps=5",
        "lightning.trainer.gpus=0,",
        "lightning.trainer.max_steps=7",
    ]


def test_flag_without_value_is_true_and_negative_numbers_are_values() -> None:
    _, ov = _split(
        ["--model.params.flag", "--data.params.x", "-1.5", "--lightning.trainer.y", "-t"]
    )
    assert ov == ["model.params.flag=true", "data.params.x=-1.5", "lightning.trainer.y=true"]


def test_acceptance_command_line_parses() -> None:
    argv = [
        "--base",
        "A.yaml",
        "B.yaml",
        "-t",
        "model.base_learning_rate=1e-4",
        "--trainer.max_steps",
        "20",
    ]
    spec = parse_command(argv).spec
    assert spec.base == ("A.yaml", "B.yaml") and spec.train is True
    assert spec.overrides == ("model.base_learning_rate=1e-4", "lightning.trainer.max_steps=20")


def test_scale_lr_accepts_values_and_name_with_resume_is_an_error() -> None:
    assert parse_command(["--scale_lr", "false"]).spec.scale_lr is False
    assert parse_command(["--scale_lr"]).spec.scale_lr is True
    assert parse_command([]).spec.scale_lr is True
    with pytest.raises(ConfigError, match="cannot be used together.*continues the run"):
        parse_command(["-n", "x", "-r", "logs/some_run"])


def test_unknown_flag_suggests_the_right_one(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_command(["--postfx", "x"])
    assert "did you mean '--postfix'" in capsys.readouterr().err


def test_merge_left_to_right_then_overrides() -> None:
    cfg, sources = merge_configs(
        [CFG / "toy.yaml", CFG / "override.yaml"],
        ["model.params.in_dim=4", "data.params.batch_size=2"],
    )
    assert cfg.model.base_learning_rate == pytest.approx(2e-3)  # override.yaml wins over toy.yaml
    assert cfg.model.params.hidden == 16
    assert cfg.model.target == "toy_model.ToyModel"  # kept from toy.yaml
    assert cfg.data.params.batch_size == 2
    assert sources.of("model.params.hidden") == str(CFG / "override.yaml")
    assert sources.of("model.target") == str(CFG / "toy.yaml")
    assert sources.of("data.params.batch_size") == "command line"


def test_misspelt_override_key_gets_a_suggestion() -> None:
    with pytest.raises(
        ConfigError, match=r"unknown key 'model.params.hiden'.*did you mean 'hidden'"
    ):
        merge_configs([CFG / "toy.yaml"], ["model.params.hiden=3"])
    # a genuinely new key (no near miss) is accepted
    cfg, _ = merge_configs([CFG / "toy.yaml"], ["model.params.noise=0.1"])
    assert cfg.model.params.noise == pytest.approx(0.1)


def test_new_key_close_to_an_existing_one_is_accepted_when_the_target_takes_it() -> None:
    # use_scale_shift_norm is a UNetModel parameter, although it looks like use_spatial_transformer
    key = "model.params.unet_config.params.use_scale_shift_norm"
    cfg, _ = merge_configs([ROOT / "configs" / "txt2img.yaml"], [f"{key}=true"])
    assert OmegaConf.select(cfg, key) is True
    with pytest.raises(ConfigError, match="did you mean 'use_spatial_transformer'"):
        merge_configs(
            [ROOT / "configs" / "txt2img.yaml"],
            ["model.params.unet_config.params.use_spatial_transformr=true"],
        )


def test_wrong_value_type_is_readable() -> None:
    with pytest.raises(ConfigError) as err:
        merge_configs([CFG / "toy.yaml"], ["model.base_learning_rate=fast"])
    msg = str(err.value)
    assert "model.base_learning_rate" in msg and "expects a number" in msg and "'fast'" in msg
    assert "toy.yaml" in msg  # names the file that set the current value
    with pytest.raises(ConfigError, match="expects a mapping"):
        merge_configs([CFG / "toy.yaml"], ["model.params=3"])


def test_misspelt_section_in_a_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("modle:\n  target: x.Y\n")
    with pytest.raises(
        ConfigError, match=r"bad.yaml: unknown top-level section 'modle' \(did you mean 'model'"
    ):
        merge_configs([bad])


def test_missing_file_and_yaml_syntax_errors(tmp_path: Path) -> None:
    (tmp_path / "model.yaml").write_text("model: {}\n")
    with pytest.raises(ConfigError, match="does not exist.*did you mean 'model.yaml'"):
        merge_configs([tmp_path / "modle.yaml"])
    broken = tmp_path / "broken.yaml"
    broken.write_text("model:\n  params: [1, 2\n")
    with pytest.raises(ConfigError, match="broken.yaml: cannot parse YAML"):
        merge_configs([broken])


def test_instantiation_error_gets_the_file() -> None:
    sources = ConfigSources()
    sources.record(OmegaConf.create({"model": {"params": {"hiden": 3}}}), "configs/a.yaml")
    err = explain(ConfigError("model.params.hiden: ToyModel has no parameter 'hiden'"), sources)
    assert str(err).startswith(
        "model.params.hiden (set in configs/a.yaml): ToyModel has no parameter"
    )


def test_trainer_legacy_translation() -> None:
    out, resume = translate_trainer_config(
        {
            "gpus": 0,
            "precision": 16,
            "accelerator": "ddp",
            "max_steps": 5,
            "resume_from_checkpoint": "x.ckpt",
        }
    )
    assert out["strategy"] == "ddp" and out["precision"] == "16-mixed" and out["max_steps"] == 5
    assert (
        out["devices"] == "auto" and "accelerator" not in out
    )  # legacy accelerator=ddp moved to strategy
    assert resume == "x.ckpt"
    out, _ = translate_trainer_config({"gpus": "0,", "weights_summary": "top", "precision": "bf16"})
    assert out["precision"] == "bf16-mixed" and "weights_summary" not in out
    import torch

    if not torch.cuda.is_available():  # a GPU request on a CPU machine falls back with a warning
        assert out["accelerator"] == "cpu"


def test_trainer_bad_key_and_bad_values() -> None:
    with pytest.raises(
        ConfigError, match=r"lightning.trainer.max_step: .*did you mean 'max_steps'"
    ):
        translate_trainer_config({"max_step": 3})
    with pytest.raises(
        ConfigError, match=r"lightning.trainer.max_steps.*expected an integer, found 'ten'"
    ):
        translate_trainer_config({"max_steps": "ten"})
    with pytest.raises(ConfigError, match="unknown precision '8-mixed'"):
        translate_trainer_config({"precision": "8-mixed"})


def test_learning_rate_rule() -> None:
    lr, msg = scale_learning_rate(
        1e-4, batch_size=4, accumulate=2, devices=3, num_nodes=2, scale=True
    )
    assert lr == pytest.approx(2 * 3 * 2 * 4 * 1e-4)
    assert "2 (accumulate_grad_batches) * 3 (devices) * 2 (num_nodes) * 4 (batch_size)" in msg
    lr, msg = scale_learning_rate(1e-4, 4, 2, 3, 2, scale=False)
    assert lr == pytest.approx(1e-4) and "--scale_lr false" in msg


def test_required_value_missing_and_supplied(tmp_path):
    """A `???` value is a readable error until the command line supplies it (any type)."""
    from ldm.config import merge_configs
    from ldm.util import ConfigError

    cfg = tmp_path / "ft.yaml"
    cfg.write_text("model:\n  params:\n    ckpt_path: ???\n")
    with pytest.raises(ConfigError, match=r"model.params.ckpt_path: a required value .*ft.yaml"):
        merge_configs([cfg])
    merged, _ = merge_configs([cfg], ["model.params.ckpt_path=/x/sd.ckpt"])
    assert merged.model.params.ckpt_path == "/x/sd.ckpt"


def test_later_file_with_another_target_replaces_the_component(tmp_path):
    """Swapping a data set class in a later file drops the old class's params (no merge)."""
    from ldm.config import merge_configs

    a = tmp_path / "a.yaml"
    a.write_text(
        "data:\n  params:\n    batch_size: 4\n    train:\n      target: pkg.Shapes\n"
        "      params: {split: train, length: 10}\n"
    )
    b = tmp_path / "b.yaml"
    b.write_text(
        "data:\n  params:\n    train:\n      target: pkg.Folder\n      params: {root: imgs}\n"
    )
    c = tmp_path / "c.yaml"
    c.write_text("data:\n  params:\n    train:\n      params: {root: other}\n")
    merged, _ = merge_configs([a, b, c])
    assert dict(merged.data.params.train.params) == {"root": "other"}
    assert merged.data.params.train.target == "pkg.Folder"
    assert merged.data.params.batch_size == 4


def test_new_trainer_argument_is_not_mistaken_for_a_near_miss(tmp_path):
    """`--trainer.accumulate_grad_batches 2` is a Trainer argument even when the config lacks it."""
    from ldm.config import merge_configs

    cfg = tmp_path / "a.yaml"
    cfg.write_text("lightning:\n  trainer:\n    limit_val_batches: 0\n")
    merged, _ = merge_configs([cfg], ["lightning.trainer.accumulate_grad_batches=2"])
    assert merged.lightning.trainer.accumulate_grad_batches == 2


def test_manual_optimization_accumulates_in_the_model():
    """Lightning refuses accumulate_grad_batches with manual optimization: the model takes it."""
    from types import SimpleNamespace

    from ldm.launch import _manual_optimization_settings
    from ldm.util import ConfigError

    model = SimpleNamespace(automatic_optimization=False, accumulate_grad_batches=1)
    kwargs = {"accumulate_grad_batches": 4, "strategy": "ddp"}
    _manual_optimization_settings(model, kwargs)
    assert model.accumulate_grad_batches == 4
    assert kwargs == {"strategy": "ddp_find_unused_parameters_true"}
    with pytest.raises(ConfigError, match="manual optimization"):
        _manual_optimization_settings(
            SimpleNamespace(automatic_optimization=False), {"accumulate_grad_batches": 2}
        )
    auto = SimpleNamespace(automatic_optimization=True)
    kwargs = {"accumulate_grad_batches": 4}
    _manual_optimization_settings(auto, kwargs)
    assert kwargs == {"accumulate_grad_batches": 4}
