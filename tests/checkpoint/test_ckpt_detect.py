"""Architecture detection from keys, EMA mapping, pruning and key reports."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from tiny_models import sd_key_state_dict
from torch import nn

from ldm.checkpoint.detect import DetectionError, detect, detect_sd
from ldm.checkpoint.ema import apply_ema, ema_key, has_ema, make_ema_entries
from ldm.checkpoint.prune import prune_checkpoint, save_state_dict
from ldm.checkpoint.report import CheckpointMismatchError, compare, load_checked
from ldm.checkpoint.safe_load import read_checkpoint


def _inpainting(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    sd = dict(sd)
    w = sd["model.diffusion_model.input_blocks.0.0.weight"]
    sd["model.diffusion_model.input_blocks.0.0.weight"] = torch.empty(
        w.shape[0], 9, *w.shape[2:], device="meta"
    )
    return sd


@pytest.mark.parametrize(
    "version,name,prediction,expect,param",
    [
        ("v1", "sd-v1-4.ckpt", None, "sd-v1", "eps"),
        ("v2", "v2-1_512-ema-pruned.safetensors", None, "sd-v2", "eps"),
        ("v2", "768-v-ema.ckpt", None, "sd-v2-v", "v"),
        ("v2", "model.ckpt", "v", "sd-v2-v", "v"),
        ("v2", "768-v-ema.ckpt", "eps", "sd-v2", "eps"),
    ],
)
def test_detect_sd_versions(
    version: str, name: str, prediction: str | None, expect: str, param: str, caplog
) -> None:
    sd = sd_key_state_dict(version)
    with caplog.at_level(logging.INFO, logger="ldm.checkpoint.detect"):
        det = detect_sd(sd, Path(name), prediction)
    assert det.name == expect and det.parameterization == param
    params = det.config["model"]["params"]
    assert params.get("parameterization", "eps") == param
    unet = params["unet_config"]["params"]
    assert unet["context_dim"] == (768 if version == "v1" else 1024)
    assert unet.get("use_linear_in_transformer", False) == (version == "v2")
    assert "parameterization" in caplog.text  # the choice is said


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_detect_inpainting(version: str) -> None:
    det = detect_sd(_inpainting(sd_key_state_dict(version)), None)
    assert det.name == f"sd-{version}-inpainting"
    params = det.config["model"]["params"]
    assert params["unet_config"]["params"]["in_channels"] == 9
    assert params["conditioning_key"] == "hybrid" and det.config["model"]["target"].endswith(
        "LatentInpaintDiffusion"
    )


def test_detect_refuses_unknown_architecture() -> None:
    with pytest.raises(DetectionError, match="--config"):
        detect_sd(
            {
                "model.diffusion_model.input_blocks.0.0.weight": torch.empty(32, 4, 3, 3),
                "model.diffusion_model.time_embed.0.weight": torch.empty(128, 32),
            }
        )
    with pytest.raises(DetectionError, match="not a Stable Diffusion"):
        detect_sd({"encoder.conv_in.weight": torch.empty(1)})


def test_embedded_config_and_hyper_parameters(tmp_path: Path) -> None:
    cfg = {
        "model": {
            "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
            "params": {"timesteps": 7, "parameterization": "v"},
        }
    }
    save_state_dict({"w": torch.ones(1)}, tmp_path / "ours.safetensors", config=cfg)
    save_state_dict({"w": torch.ones(1)}, tmp_path / "ours.ckpt", config=cfg)
    for name in ("ours.safetensors", "ours.ckpt"):
        det = detect(read_checkpoint(tmp_path / name))
        assert det.name == "embedded" and det.config == cfg and det.parameterization == "v"
    hp = {
        "unet_config": {"target": "U", "params": {"in_channels": 4}},
        "first_stage_config": {"target": "A"},
        "timesteps": 5,
    }
    torch.save({"state_dict": {"w": torch.ones(1)}, "hyper_parameters": hp}, tmp_path / "pl.ckpt")
    det = detect(read_checkpoint(tmp_path / "pl.ckpt"))
    assert det.name == "hyper_parameters"
    assert det.config["model"]["params"]["timesteps"] == 5
    assert det.config["model"]["target"] == "ldm.models.diffusion.ddpm.LatentDiffusion"


def test_ema_names_and_extraction() -> None:
    assert (
        ema_key("model.diffusion_model.input_blocks.0.0.weight")
        == "model_ema.diffusion_modelinput_blocks00weight"
    )
    sd = {
        "model.diffusion_model.a.weight": torch.zeros(2),
        "model.diffusion_model.b.0.bias": torch.zeros(3),
        "first_stage_model.x": torch.ones(1),
    }
    ema = make_ema_entries(sd)
    ema = {k: (v + 1 if v.ndim else v) for k, v in ema.items()}
    full = {**sd, **ema}
    assert has_ema(full) and not has_ema(sd)
    out = apply_ema(full)
    assert set(out) == set(sd)
    assert torch.equal(out["model.diffusion_model.a.weight"], torch.ones(2))
    assert torch.equal(out["model.diffusion_model.b.0.bias"], torch.ones(3))
    assert torch.equal(out["first_stage_model.x"], torch.ones(1))


def test_prune_drops_optimizer_applies_ema_and_halves(tmp_path: Path) -> None:
    sd = {
        "model.diffusion_model.w": torch.randn(4, 4),
        "betas": torch.rand(10, dtype=torch.float64),
        "step": torch.tensor(3),
    }
    ema = make_ema_entries(sd)
    ema["model_ema.diffusion_modelw"] = torch.randn(4, 4)
    cfg = {"model": {"target": "T", "params": {}}}
    torch.save(
        {
            "state_dict": {**sd, **ema},
            "optimizer_states": [{"state": {0: {"exp_avg": torch.randn(4, 4)}}}],
            "global_step": 9,
            "ldm_config": cfg,
        },
        tmp_path / "train.ckpt",
    )
    out = prune_checkpoint(tmp_path / "train.ckpt", tmp_path / "pruned.safetensors", fp16=True)
    ck = read_checkpoint(out)
    assert set(ck.state_dict) == set(sd)
    assert ck.state_dict["model.diffusion_model.w"].dtype == torch.float16
    assert torch.equal(
        ck.state_dict["model.diffusion_model.w"], ema["model_ema.diffusion_modelw"].half()
    )
    assert ck.state_dict["step"].dtype == torch.int64
    assert ck.embedded_config == cfg and ck.metadata["global_step"] == "9"


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.diffusion_model = nn.Linear(2, 3)
        self.register_buffer("betas", torch.zeros(4))


def test_report_groups_and_fails_only_for_sampling_keys() -> None:
    m = _Tiny()
    good = {k: torch.full_like(v, 0.5) for k, v in m.state_dict().items() if k != "betas"}
    good["model_ema.decay"] = torch.tensor(0.9)
    rep = load_checked(m, good)  # betas missing (recomputed), EMA unexpected: fine
    assert rep.missing == ["betas"] and rep.unexpected == ["model_ema.decay"]
    assert torch.all(m.model.diffusion_model.weight == 0.5)
    bad = {"model.diffusion_model.weight": torch.zeros(3, 2), "cond_stage_model.x": torch.zeros(1)}
    with pytest.raises(CheckpointMismatchError, match=r"model\.diffusion_model\.\*: 1") as err:
        load_checked(_Tiny(), bad)
    assert "cond_stage_model.x" in str(err.value) and "unexpected" in str(err.value)
    wrong = {
        "model.diffusion_model.weight": torch.zeros(5, 2),
        "model.diffusion_model.bias": torch.zeros(3),
    }
    assert compare(_Tiny(), wrong).mismatched == [("model.diffusion_model.weight", (3, 2), (5, 2))]
    with pytest.raises(CheckpointMismatchError, match="mismatched"):
        load_checked(_Tiny(), wrong)


def test_run_layout_config_is_found(tmp_path: Path) -> None:
    """logs/<run>/checkpoints/last.ckpt without an embedded config uses logs/<run>/configs/*-project.yaml."""
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "configs").mkdir()
    (tmp_path / "run" / "configs" / "2026-01-01T00-00-00-project.yaml").write_text(
        "model:\n  target: ldm.models.diffusion.ddpm.LatentDiffusion\n  params:\n    timesteps: 9\n"
    )
    torch.save(
        {"state_dict": {"w": torch.ones(1)}, "global_step": 1},
        tmp_path / "run" / "checkpoints" / "last.ckpt",
    )
    det = detect(read_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt"))
    assert det.name == "run-config" and det.config["model"]["params"]["timesteps"] == 9
    torch.save({"state_dict": {"w": torch.ones(1)}}, tmp_path / "elsewhere.ckpt")
    with pytest.raises(DetectionError):
        detect(read_checkpoint(tmp_path / "elsewhere.ckpt"))


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_builtin_configs_build_exactly_the_sd_key_set(version: str, monkeypatch) -> None:
    """The detected config builds a model (on meta) whose keys/shapes are the release files'."""
    from ldm.checkpoint.loader import build_model, match_clip_layout

    monkeypatch.setenv("LDM_ALLOW_RANDOM_WEIGHTS", "1")
    sd = sd_key_state_dict(version)
    det = detect_sd(sd)
    with torch.device("meta"):
        model = build_model(det.config)
    report = compare(model, match_clip_layout(sd, set(model.state_dict())))
    assert report.ok and not report.unexpected and not report.mismatched
    assert all(
        k.split(".")[0] in ("betas", "alphas_cumprod")
        or "cumprod" in k
        or k.startswith("posterior")
        for k in report.missing
    )
    assert "<top-level>: 12 (not needed for sampling)" in report.format()
