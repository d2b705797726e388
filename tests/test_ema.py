"""LitEma: SD state-dict names, the decay recursion, and store / copy_to / restore."""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from ldm.ema import LitEma
from ldm.engine.network import DiffusionWrapper

ROOT = Path(__file__).parent


def test_ema_names_match_sd_checkpoints():
    """model_ema.<unet param name after 'model.' without dots>, plus decay and num_updates."""
    cfg = OmegaConf.load(ROOT / "configs" / "official" / "v1-inference.yaml")
    with torch.device("meta"):
        wrapper = DiffusionWrapper(cfg.model.params.unet_config, "crossattn")
        ema = LitEma(wrapper)
    ref = [
        line.split("\t")[0]
        for line in (ROOT / "data" / "sd-v1-unet-vae.tsv").read_text().splitlines()[1:]
        if line.startswith("model.diffusion_model.")
    ]
    expected = {"model_ema." + k[len("model.") :].replace(".", "") for k in ref}
    expected |= {"model_ema.decay", "model_ema.num_updates"}
    ours = {"model_ema." + k for k in ema.state_dict()}
    assert ours == expected
    assert "model_ema.diffusion_modelinput_blocks00weight" in ours
    assert ema.decay.dtype == torch.float32 and ema.num_updates.dtype == torch.int32


def test_ema_update_follows_the_warmup_recursion():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    frozen = nn.Linear(1, 1)
    frozen.weight.requires_grad_(False)
    model.extra = frozen  # non-trainable params get no shadow
    ema = LitEma(model, decay=0.9)
    assert "extraweight" not in dict(ema.named_buffers()) and "extrabias" in dict(
        ema.named_buffers()
    )
    shadow = model.weight.detach().clone()
    for n in range(1, 6):
        with torch.no_grad():
            model.weight.add_(torch.randn_like(model.weight))
        ema(model)
        d = min(0.9, (1 + n) / (10 + n))
        shadow = shadow - (1 - d) * (shadow - model.weight.detach())
        torch.testing.assert_close(ema.weight, shadow)
    assert int(ema.num_updates) == 5
    ema.reset_num_updates()
    assert int(ema.num_updates) == 0


def test_ema_without_num_updates_uses_fixed_decay():
    model = nn.Linear(2, 2)
    ema = LitEma(model, decay=0.5, use_num_upates=False)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema(model)
    torch.testing.assert_close(ema.weight, start + 0.5)
    assert int(ema.num_updates) == -1


def test_store_copy_restore_round_trip():
    model = nn.Linear(2, 2)
    ema = LitEma(model)
    with torch.no_grad():
        model.weight.add_(3.0)
    trained = model.weight.detach().clone()
    ema.store(model.parameters())
    ema.copy_to(model)
    torch.testing.assert_close(model.weight, trained - 3.0)
    ema.restore(model.parameters())
    torch.testing.assert_close(model.weight, trained)
    with pytest.raises(RuntimeError, match="store"):
        ema.restore(model.parameters())


def test_bad_decay_is_rejected():
    with pytest.raises(ValueError, match="decay"):
        LitEma(nn.Linear(1, 1), decay=1.5)
