"""The four official SD configs build their whole `model` section into our classes (meta device),
with the state-dict keys and shapes of real SD checkpoints and the CompVis schedule buffers."""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ldm.engine.schedule import SCHEDULE_BUFFERS
from ldm.models.diffusion.ddpm import LatentDiffusion, LatentInpaintDiffusion
from ldm.util import ConfigError, instantiate_from_config

CONFIGS = Path(__file__).parents[1] / "configs" / "official"
DATA = Path(__file__).parents[1] / "data"

CASES = {
    "v1-inference": (LatentDiffusion, "eps", "sd-v1-unet-vae.tsv", 4),
    "v2-inference": (LatentDiffusion, "eps", "sd-v2-unet-vae.tsv", 4),
    "v2-inference-v": (LatentDiffusion, "v", "sd-v2-unet-vae.tsv", 4),
    "v2-inpainting-inference": (LatentInpaintDiffusion, "eps", "sd-v2-unet-vae.tsv", 9),
}


def _reference(tsv: str) -> dict[str, tuple[int, ...]]:
    out = {}
    for line in (DATA / tsv).read_text().splitlines()[1:]:
        key, shape = line.split("\t")
        out[key] = tuple(int(s) for s in shape.split("x")) if shape else ()
    return out


@pytest.fixture(scope="module")
def built() -> dict:
    models = {}
    for name in CASES:
        cfg = OmegaConf.load(CONFIGS / f"{name}.yaml")
        with torch.device("meta"):
            models[name] = instantiate_from_config(cfg.model)
    return models


@pytest.mark.parametrize("name", list(CASES))
def test_official_config_builds_with_sd_keys(built, name):
    cls, parameterization, tsv, in_ch = CASES[name]
    model = built[name]
    assert type(model) is cls
    assert model.parameterization == parameterization
    assert model.model.conditioning_key == (
        "hybrid" if cls is LatentInpaintDiffusion else "crossattn"
    )
    assert model.scale_factor == pytest.approx(0.18215)
    assert not model.use_ema
    sd = model.state_dict()
    ref = _reference(tsv)
    ours = {
        k: tuple(v.shape) for k, v in sd.items() if k.startswith(("model.", "first_stage_model."))
    }
    if cls is LatentInpaintDiffusion:  # the only difference of the inpainting U-Net
        ref["model.diffusion_model.input_blocks.0.0.weight"] = (320, in_ch, 3, 3)
    missing = sorted(set(ref) - set(ours))
    extra = sorted(set(ours) - set(ref))
    assert not missing and not extra, (missing[:5], extra[:5])
    wrong = [k for k in ref if ref[k] != ours[k]]
    assert not wrong, wrong[:5]
    # schedule buffers as in SD files: 12 of shape [1000]; no scale_factor / logvar entries
    others = sorted(
        k for k in sd if not k.startswith(("model.", "first_stage_model.", "cond_stage_model."))
    )
    assert others == sorted(SCHEDULE_BUFFERS)
    assert all(sd[k].shape == (1000,) for k in SCHEDULE_BUFFERS)
    # frozen first / cond stage; only the U-Net trains
    assert all(not p.requires_grad for p in model.first_stage_model.parameters())
    assert all(not p.requires_grad for p in model.cond_stage_model.parameters())
    assert {id(p) for p in model.trainable_parameters()} == {
        id(p) for p in model.model.parameters()
    }


def test_sd_schedule_buffers_match_compvis_formulas(built):
    """SD's linear_start 0.00085, linear_end 0.012 'linear' schedule: betas linear in sqrt space."""
    import numpy as np

    model = built["v1-inference"]
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    ac = np.cumprod(1 - betas)
    ac_prev = np.append(1.0, ac[:-1])
    var = betas * (1 - ac_prev) / (1 - ac)
    expect = {
        "betas": betas,
        "alphas_cumprod": ac,
        "alphas_cumprod_prev": ac_prev,
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1 / ac - 1),
        "log_one_minus_alphas_cumprod": np.log(1 - ac),
        "posterior_log_variance_clipped": np.log(np.maximum(var, 1e-20)),
        "posterior_mean_coef1": betas * np.sqrt(ac_prev) / (1 - ac),
        "posterior_mean_coef2": (1 - ac_prev) * np.sqrt(1 - betas) / (1 - ac),
    }
    for name, value in expect.items():
        buf = getattr(model, name)
        assert buf.dtype == torch.float32
        np.testing.assert_allclose(buf.numpy(), value.astype(np.float32), rtol=1e-6, atol=1e-9)


def test_config_typo_names_the_parameter():
    cfg = OmegaConf.load(CONFIGS / "v1-inference.yaml")
    cfg.model.params.linear_strat = 0.1
    with pytest.raises(ConfigError, match="linear_strat.*linear_start"):
        with torch.device("meta"):
            instantiate_from_config(cfg.model)


@pytest.mark.parametrize(
    "name,key,cond_cls,trainable",
    [
        ("cin256-v2", "crossattn", "ClassEmbedder", True),
        ("lsun_churches-ldm-kl-8", None, None, False),
        ("celebahq-ldm-vq-4", None, None, False),
    ],
)
def test_compvis_latent_diffusion_configs_build(name, key, cond_cls, trainable):
    """CompVis latent-diffusion configs: class-conditional (trainable ClassEmbedder) and
    unconditional ('__is_unconditional__') models with KL and VQ first stages."""
    cfg = OmegaConf.load(CONFIGS.parent / "compvis" / f"{name}.yaml")
    with torch.device("meta"):
        model = instantiate_from_config(cfg.model)
    assert type(model) is LatentDiffusion
    assert model.model.conditioning_key == key
    assert type(model.cond_stage_model).__name__ == (cond_cls or "NoneType")
    assert model.cond_stage_trainable is trainable
    ids = {id(p) for p in model.trainable_parameters()}
    if trainable:
        assert all(id(p) in ids for p in model.cond_stage_model.parameters())
    assert not any(id(p) in ids for p in model.first_stage_model.parameters())


def test_base_learning_rate_under_params_points_to_model_base_learning_rate():
    """``model.params.base_learning_rate=1e-5`` (a common slip): the fix, not only the refusal."""
    from ldm.models.diffusion.ddpm import translate

    with pytest.raises(ConfigError) as info:
        translate("latent", {"base_learning_rate": 1e-5, "unet_config": {}})
    msg = str(info.value)
    assert "LatentDiffusion has no parameter 'base_learning_rate'" in msg
    assert "it belongs at model.base_learning_rate" in msg
    assert "model.base_learning_rate=1e-5" in msg
