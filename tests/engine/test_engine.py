"""DiffusionEngine composed from its parts, and the CompVis classes as translators into it."""

from __future__ import annotations

import pytest
import torch
from tiny_models import build_tiny, tiny_ldm_config

from ldm.engine.engine import DiffusionEngine
from ldm.models.diffusion.ddpm import DDPM, LatentDiffusion, translate
from ldm.samplers.guiders import ClassifierFreeGuidance, MultiGuidance, NoGuidance, guider_for
from ldm.util import ConfigError, instantiate_from_config

pytestmark = pytest.mark.usefixtures("one_thread")


def native_config() -> dict:
    """tiny_ldm_config written in the engine's own terms."""
    p = tiny_ldm_config()["model"]["params"]
    return {
        "target": "ldm.engine.engine.DiffusionEngine",
        "params": {
            "network_config": p["unet_config"],
            "denoiser_config": {
                "parameterization": "eps",
                "timesteps": 1000,
                "linear_start": p["linear_start"],
                "linear_end": p["linear_end"],
            },
            "conditioner_config": {
                "embedders": [
                    {"config": p["cond_stage_config"], "input_key": "txt", "ucg_rate": 0.0}
                ]
            },
            "first_stage_config": p["first_stage_config"],
            "conditioning_key": "crossattn",
            "first_stage_key": "jpg",
            "image_size": 8,
            "channels": 4,
            "scale_factor": 0.18215,
            "use_ema": False,
        },
    }


def test_native_engine_equals_the_compvis_translation():
    compvis = build_tiny(tiny_ldm_config())
    torch.manual_seed(0)
    native = instantiate_from_config(native_config())
    assert type(native) is DiffusionEngine and isinstance(compvis, DiffusionEngine)
    sd_c, sd_n = compvis.state_dict(), native.state_dict()
    assert sorted(sd_c) == sorted(sd_n)  # the SD key layout: model.diffusion_model.*, ...
    native.load_state_dict(sd_c)
    batch = {"jpg": torch.rand(2, 16, 16, 3) * 2 - 1, "txt": ["a", "b c"]}
    losses = []
    for m in (compvis, native):
        torch.manual_seed(3)
        losses.append(
            m.training_step({k: list(v) if k == "txt" else v for k, v in batch.items()}, 0)
        )
    assert torch.equal(losses[0], losses[1])


def test_translation_maps_compvis_parameters():
    p = tiny_ldm_config()["model"]["params"]
    out = translate("latent", {**p, "ucg_training": {"txt": {"p": 0.1, "val": ""}}})
    assert out["network_config"] is p["unet_config"]
    assert out["denoiser_config"]["linear_start"] == p["linear_start"]
    (embedder,) = out["conditioner_config"]["embedders"]
    assert embedder["config"] is p["cond_stage_config"]  # the same object: errors name its path
    assert (embedder["input_key"], embedder["ucg_rate"], embedder["null"]) == ("txt", 0.1, "")
    with pytest.raises(ConfigError, match="did you mean 'linear_start'"):
        translate("latent", {**p, "linear_strat": 0.1})
    with pytest.raises(ConfigError, match="ucg_training names 'caption'"):
        translate("latent", {**p, "ucg_training": {"caption": {"p": 0.1}}})
    with pytest.raises(ConfigError, match="DDPM has none"):
        translate("ddpm", {"unet_config": p["unet_config"], "ucg_training": {"txt": {"p": 0.1}}})


def test_compvis_positional_arguments_bind_in_the_originals_order():
    p = dict(tiny_ldm_config()["model"]["params"])
    first, cond = p.pop("first_stage_config"), p.pop("cond_stage_config")
    model = LatentDiffusion(first, cond, **p)
    assert model.cond_stage_key == "txt" and model.conditioner.input_key == "txt"
    with pytest.raises(TypeError, match="multiple values"):
        LatentDiffusion(first, cond, first_stage_config=first, **p)
    unet = {"target": "toy_denoiser.ToyDenoiser", "params": {"in_channels": 3}}
    ddpm = DDPM(unet, 100, image_size=1, use_ema=False)
    assert ddpm.num_timesteps == 100 and ddpm.conditioner is None


def test_guiders():
    def net(x, t, c):
        return x * c

    x, t = torch.ones(2, 3), torch.zeros(2)
    c, u = torch.full((2, 3), 3.0), torch.full((2, 3), 1.0)
    assert torch.equal(NoGuidance().model_fn(net, c)(x, t), x * 3)
    cfg = ClassifierFreeGuidance(2.0).model_fn(net, c, u)(x, t)
    assert torch.equal(cfg, 1 + 2.0 * (3 - 1) * x)
    # one scale over the chain u -> c is classifier-free guidance
    assert torch.equal(MultiGuidance([2.0]).model_fn(net, c, u)(x, t), cfg)
    # two conditionings, two scales: u + s1 (c1 - u) + s2 (c - c1)
    c1 = torch.full((2, 3), 2.0)
    two = MultiGuidance([1.5, 4.0], conds=[c1]).model_fn(net, c, u)(x, t)
    assert torch.equal(two, torch.full((2, 3), 1 + 1.5 * 1 + 4.0 * 1))
    assert isinstance(guider_for(1.0), NoGuidance)
    with pytest.raises(ValueError, match="unconditional"):
        ClassifierFreeGuidance(3.0).model_fn(net, c)


def multi_config() -> dict:
    """Two text encoders (one trainable) concatenated along features + a class vector (SDXL's shape)."""

    def text(width: int, trainable: bool, ucg: float) -> dict:
        return {
            "target": "ldm.modules.encoders.text_transformer.CLIPTextEncoder",
            "params": {"width": width, "layers": 1, "heads": 2, "max_length": 8},
            "input_key": "caption" if trainable else "caption_2",
            "input": "text",
            "ucg_rate": ucg,
            "is_trainable": trainable,
        }

    return {
        "target": "ldm.engine.engine.DiffusionEngine",
        "params": {
            "network_config": {
                "target": "toy_denoiser.ToyDenoiser",
                "params": {
                    "in_channels": 3,
                    "image_size": 4,
                    "width": 32,
                    "context_dim": 40,
                    "adm_in_channels": 6,
                },
            },
            "denoiser_config": {"parameterization": "v", "timesteps": 100},
            "conditioner_config": {
                "embedders": [
                    text(16, True, 0.5),
                    text(24, False, 0.0),
                    {
                        "target": "ldm.modules.encoders.class_embedder.ClassEmbedder",
                        "params": {"embed_dim": 6, "n_classes": 4, "key": "label", "ucg_rate": 0.0},
                        "input_key": "label",
                        "input": "class",
                        "kind": "vector",
                        "ucg_rate": 0.5,
                    },
                ]
            },
            "conditioning_key": "crossattn-adm",
            "image_size": 4,
            "channels": 3,
            "use_ema": False,
        },
    }


def test_several_embedders_assemble_by_kind_train_and_generate():
    torch.manual_seed(0)
    model = instantiate_from_config(multi_config())
    keys = model.state_dict().keys()
    assert any(k.startswith("conditioner.embedders.0.") for k in keys)
    assert any(k.startswith("conditioner.embedders.2.embedding") for k in keys)
    assert model.cond_stage_model is None
    cond = model.conditioner
    assert [e.kind for e in cond.entries] == ["crossattn", "crossattn", "vector"]
    assert cond.entries[2].null == 3  # the ClassEmbedder's null class
    inputs = {"caption": ["a b", "c"], "caption_2": ["d", "e f"], "label": torch.tensor([0, 2])}
    c = cond.encode(inputs)
    assert c["c_crossattn"][0].shape == (2, 8, 40) and c["c_adm"].shape == (2, 6)
    u = cond.uncond(inputs, 2, negative_prompt="bad")
    assert torch.equal(u["c_adm"][0], model.conditioner.embedders[2].embedding.weight[3])
    # per-embedder dropout in training, gradients only into the trainable embedder
    batch = {"image": torch.rand(64, 4, 4, 3) * 2 - 1, **{k: v for k, v in inputs.items()}}
    batch = {
        "image": batch["image"],
        "caption": ["a b"] * 64,
        "caption_2": ["d"] * 64,
        "label": torch.ones(64, dtype=torch.long),
    }
    model.train()
    loss = model.training_step(batch, 0)
    assert 10 < sum(t == "" for t in batch["caption"]) < 54  # ucg_rate 0.5
    assert (batch["label"] == 3).any() and (batch["label"] == 1).any()
    assert batch["caption_2"] == ["d"] * 64  # no dropout asked for
    loss.backward()
    grads = [p.grad is not None for p in model.conditioner.embedders.parameters()]
    n0 = len(list(model.conditioner.embedders[0].parameters()))
    assert all(grads[:n0]) and not any(grads[n0:])
    params = {id(p) for p in model.trainable_parameters()}
    assert all(id(p) in params for p in model.conditioner.embedders[0].parameters())
    # generate: the prompt fills the first text input, the batch the others
    model.eval()
    extra = {"caption_2": ["d", "d"], "label": torch.tensor([1, 1])}
    out = model.generate(
        "a b", num_images_per_prompt=2, batch=extra, sampler="euler", steps=4, seed=0,
        guidance_scale=2.0, output="latent",
    )  # fmt: skip
    other = model.generate(
        "a b", num_images_per_prompt=2, batch={**extra, "label": torch.tensor([2, 2])},
        sampler="euler", steps=4, seed=0, guidance_scale=2.0, output="latent",
    )  # fmt: skip
    assert out.shape == (2, 3, 4, 4) and (out - other).abs().max() > 1e-5
    # a given start noise reads the batch's inputs the same way
    x_T = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    again = model.generate(
        ["a b", "a b"], batch=extra, x_T=x_T, sampler="euler", steps=4, guidance_scale=2.0,
        output="latent",
    )  # fmt: skip
    assert torch.equal(again, out)
    with pytest.raises(KeyError, match="label"):
        model.generate("a b", batch={"caption_2": ["d"]}, steps=2, output="latent")


def test_a_batch_without_the_models_keys_is_a_config_error():
    """The data set yields 'image', the config reads 'jpg': a ConfigError (exit 2 from main.py)
    that names the config key, and still a KeyError for code that catches one."""
    model = build_tiny(tiny_ldm_config())  # first_stage_key jpg, cond_stage_key txt
    batch = {"image": torch.zeros(2, 16, 16, 3), "txt": ["a", "b"]}
    with pytest.raises(
        ConfigError, match=r"model.params.first_stage_key: the batch has no key 'jpg'"
    ) as err:
        model.training_step(batch, 0)
    assert isinstance(err.value, KeyError)
    assert str(err.value).startswith("model.params.first_stage_key")  # not KeyError's quoted repr
