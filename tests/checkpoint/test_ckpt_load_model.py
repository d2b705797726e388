"""Fabricated checkpoints in the SD layouts load through ldm.load_model and reproduce the source."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from tiny_models import build_tiny, tiny_ldm_config

from ldm.checkpoint import CheckpointMismatchError, load_model
from ldm.checkpoint.ema import make_ema_entries
from ldm.checkpoint.prune import save_state_dict


@pytest.fixture(scope="module")
def source():
    cfg = tiny_ldm_config()
    return cfg, build_tiny(cfg)


def _outputs(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([3, 700])
    with torch.no_grad():
        c = model.get_learned_conditioning(["a red square", "a blue circle"])
        return c, model.apply_model(x, t, c), model.decode_first_stage(x)


def _sd_release_layout(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Text keys under `text_model.` plus `position_ids`, as in the SD v1 release files."""
    pre = "cond_stage_model.transformer."
    out = {
        (pre + "text_model." + k[len(pre) :] if k.startswith(pre) else k): v for k, v in sd.items()
    }
    out[pre + "text_model.embeddings.position_ids"] = torch.arange(77)[None]
    return out


def test_lightning_ckpt_in_sd_layout_reproduces_outputs(source, tmp_path: Path) -> None:
    cfg, model = source
    sd = _sd_release_layout(model.state_dict())
    ema = make_ema_entries(sd)
    ema = {k: (v * 0.5 if v.is_floating_point() and v.ndim else v) for k, v in ema.items()}
    torch.save(
        {
            "state_dict": {**sd, **ema},
            "global_step": 470000,
            "epoch": 6,
            "pytorch-lightning_version": "1.4.2",
            "callbacks": {"ModelCheckpoint{'monitor': None}": {"best_model_score": None}},
            "optimizer_states": [{"state": {}, "param_groups": [{"lr": 1e-4, "params": []}]}],
            "hyper_parameters": {"ckpt_path": None, "lr": OmegaConf.create({"base": 1e-4})},
        },
        tmp_path / "sd-layout.ckpt",
    )
    loaded = load_model(tmp_path / "sd-layout.ckpt", config=cfg, use_ema=False)
    for a, b in zip(_outputs(loaded), _outputs(model)):
        assert torch.equal(a, b)
    # default: the file's EMA weights are used for the U-Net, nothing else changes
    ema_model = load_model(tmp_path / "sd-layout.ckpt", config=cfg)
    assert ema_model.checkpoint_info["use_ema"]
    w = "diffusion_model.input_blocks.1.0.in_layers.2.weight"
    assert torch.equal(ema_model.model.get_parameter(w), model.model.get_parameter(w) * 0.5)
    assert torch.equal(_outputs(ema_model)[0], _outputs(model)[0])


def test_our_safetensors_needs_no_config(source, tmp_path: Path) -> None:
    cfg, model = source
    path = save_state_dict(model.state_dict(), tmp_path / "last.safetensors", config=cfg)
    loaded = load_model(path)
    assert loaded.checkpoint_info["detected"] == "embedded"
    for a, b in zip(_outputs(loaded), _outputs(model)):
        assert torch.equal(a, b)
    import ldm

    as64 = ldm.load_model(path, dtype=torch.float64)
    assert next(as64.model.parameters()).dtype == torch.float64


def test_missing_sampling_weights_fail_with_grouped_report(source, tmp_path: Path) -> None:
    cfg, model = source
    sd = {
        k: v
        for k, v in model.state_dict().items()
        if not k.startswith("first_stage_model.decoder.")
    }
    path = save_state_dict(sd, tmp_path / "broken.safetensors", config=cfg)
    with pytest.raises(CheckpointMismatchError, match=r"first_stage_model\.decoder\.\*"):
        load_model(path)


def test_autoencoder_checkpoint_loads_by_its_embedded_config(tmp_path: Path) -> None:
    from tiny_models import TINY_DDCONFIG

    from ldm.util import instantiate_from_config

    cfg = {
        "model": {
            "target": "ldm.models.autoencoder.AutoencoderKL",
            "params": {
                "embed_dim": 4,
                "ddconfig": TINY_DDCONFIG,
                "lossconfig": {"target": "torch.nn.Identity"},
            },
        }
    }
    torch.manual_seed(1)
    ae = instantiate_from_config(cfg["model"]).eval()
    path = save_state_dict(
        ae.state_dict(), tmp_path / "ae.ckpt", config=cfg, extras={"global_step": 5}
    )
    loaded = load_model(path)
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded.decode(z), ae.decode(z))
