"""generate(): the one way images are made. Every entry point gives the same images for the same
seed and settings; the recorded sampling defaults are used when none are given; sigma-trained
(EDM, VE) models sample with any solver, from the API and from the command."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import build_tiny, tiny_ldm_config

import ldm
from ldm.checkpoint.prune import save_state_dict
from ldm.commands.pngmeta import read_params
from ldm.commands.sample import run

pytestmark = pytest.mark.usefixtures("one_thread")

DEFAULTS = {"sampler": "dpmpp_2m", "steps": 4, "guidance_scale": 3.0}
PROMPTS = ["a red square", "a blue circle"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    cfg = tiny_ldm_config()
    model = build_tiny(cfg)
    return save_state_dict(
        model.state_dict(),
        tmp_path_factory.mktemp("run") / "last.ckpt",
        config=cfg,
        extras={"sampling_defaults": DEFAULTS},
    )


@pytest.fixture(scope="module")
def model(ckpt):
    return ldm.load_model(ckpt, device="cpu")


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im) for im in images])


def test_command_with_no_sampling_flags_uses_the_recorded_defaults_and_equals_generate(
    model, ckpt, tmp_path
):
    assert model.sampling_defaults == DEFAULTS
    flags = ["--ckpt", str(ckpt), "--prompt", PROMPTS[0], "--n_samples", "2", "--n_iter", "2"]
    paths = run("txt2img", [*flags, "--seed", "7", "--device", "cpu", "--outdir", str(tmp_path)])
    params = read_params(paths[0])
    assert (params["sampler"], params["steps"], params["scale"]) == ("dpmpp_2m", 4, 3.0)
    for k, first in enumerate((0, 2)):  # batch k uses seed 7 + k
        ours = model.generate(PROMPTS[0], num_images_per_prompt=2, seed=7 + k)
        png = pixels(Image.open(p).convert("RGB") for p in paths[first : first + 2])
        np.testing.assert_array_equal(png, pixels(ours))
        assert read_params(paths[first])["seed"] == 7 + k
    # the defaults are what generate() used: naming them gives the same images, others do not
    named = model.generate(PROMPTS, seed=3, output="tensor", **DEFAULTS)
    torch.testing.assert_close(model.generate(PROMPTS, seed=3, output="tensor"), named)
    other = model.generate(PROMPTS, seed=3, output="tensor", sampler="ddim", steps=4)
    assert (other - named).abs().max() > 1e-3


def test_shapes_evaluation_ddim_facade_and_image_logger_equal_generate(model):
    from ldm.evaluation import sample_prompts
    from ldm.models.diffusion.ddim import DDIMSampler

    # ShapesEvaluation's sampling
    judged = sample_prompts(model, PROMPTS, sampler="ddim", steps=5, guidance_scale=3.0, seed=11)
    direct = model.generate(PROMPTS, sampler="ddim", steps=5, guidance_scale=3.0, seed=11)
    np.testing.assert_array_equal(
        pixels(Image.fromarray(a) for a in _to_uint8(judged)), pixels(direct)
    )
    # the CompVis DDIM facade with conditioning tensors
    c = model.get_learned_conditioning(PROMPTS)
    uc = model.get_unconditional_conditioning(len(PROMPTS))
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    facade, _ = DDIMSampler(model).sample(
        S=5,
        batch_size=2,
        shape=(4, 8, 8),
        conditioning=c,
        unconditional_guidance_scale=3.0,
        unconditional_conditioning=uc,
        x_T=x_T,
        verbose=False,
    )
    z = model.generate(
        PROMPTS, x_T=x_T, sampler="ddim", steps=5, guidance_scale=3.0, output="latent"
    )
    assert torch.equal(facade, z)
    # ImageLogger's log_images with a seed: its guided row is generate() with that seed
    batch = {"jpg": torch.rand(2, 16, 16, 3) * 2 - 1, "txt": list(PROMPTS)}
    log = model.log_images(
        batch, N=2, ddim_steps=5, unconditional_guidance_scale=3.0, seed=11, inpaint=False
    )
    row = model.generate(
        PROMPTS, sampler="ddim", steps=5, guidance_scale=3.0, seed=11, output="latent"
    )
    assert torch.equal(log["samples_cfg_scale_3.00"], model.decode_first_stage(row))


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] images as the PNG bytes generate() writes."""
    x = ((images + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    return (x * 255).round().astype(np.uint8)


def test_negative_prompt_and_guidance_take_effect(model):
    base = model.generate(PROMPTS[0], seed=1, output="tensor")
    neg = model.generate(PROMPTS[0], seed=1, output="tensor", negative_prompt="blurry")
    unguided = model.generate(PROMPTS[0], seed=1, output="tensor", guidance_scale=1.0)
    assert (base - neg).abs().max() > 1e-4
    assert (base - unguided).abs().max() > 1e-4
    # negative prompt "" is the unconditional prompt
    empty = model.generate(PROMPTS[0], seed=1, output="tensor", negative_prompt="")
    torch.testing.assert_close(empty, base)


def test_img2img_and_inpainting_masks_through_generate(model):
    init = torch.rand(1, 3, 16, 16)
    a = model.generate(PROMPTS[0], init_image=init, strength=0.5, seed=2, output="tensor")
    b = model.generate(PROMPTS[0], init_image=init, strength=0.5, seed=2, output="tensor")
    torch.testing.assert_close(a, b)
    weak = model.generate(PROMPTS[0], init_image=init, strength=0.05, seed=2, output="tensor")
    strong = model.generate(PROMPTS[0], init_image=init, strength=1.0, seed=2, output="tensor")
    assert (weak - init).abs().mean() < (strong - init).abs().mean()
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 8:] = 1.0  # repaint the right half
    inpainted = model.generate(PROMPTS[0], init_image=init, mask=mask, seed=2, output="tensor")
    left_kept = model.generate(PROMPTS[0], init_image=init, mask=mask, seed=4, output="tensor")
    # outside the mask both keep the same known latent; inside they differ by their seeds
    assert (inpainted[..., :4] - left_kept[..., :4]).abs().max() < (
        inpainted[..., 12:] - left_kept[..., 12:]
    ).abs().max()
    with pytest.raises(ValueError, match="init_image"):
        model.generate(PROMPTS[0], mask=mask)
    with pytest.raises(ValueError, match="output"):
        model.generate(PROMPTS[0], output="png")


def test_old_runs_get_their_defaults_from_the_evaluation_they_were_judged_with(ckpt, tmp_path):
    from ldm.checkpoint.safe_load import read_checkpoint

    old = read_checkpoint(ckpt)
    cfg = copy.deepcopy(old.embedded_config)
    cfg["lightning"] = {
        "callbacks": {
            "shapes_evaluation": {
                "target": "ldm.evaluation.ShapesEvaluation",
                "params": {"sampler": "unipc", "steps": 9, "guidance_scale": 2.5},
            }
        }
    }
    path = save_state_dict(old.state_dict, tmp_path / "old.ckpt", config=cfg)  # no record
    loaded = ldm.load_model(path, device="cpu")
    assert loaded.sampling_defaults == {"sampler": "unipc", "steps": 9, "guidance_scale": 2.5}


def test_engine_saves_and_restores_its_sampling_defaults(model):
    checkpoint: dict = {}
    model.on_save_checkpoint(checkpoint)
    assert checkpoint["sampling_defaults"] == DEFAULTS
    clone = build_tiny(tiny_ldm_config())
    assert clone.sampling_defaults == {}
    clone.on_load_checkpoint(checkpoint)
    assert clone.sampling_defaults == DEFAULTS
    with pytest.raises(ValueError, match="sampler"):
        clone.on_load_checkpoint({"sampling_defaults": {"sampler": "nope"}})


# ---------------------------------------------------------------------- sigma-trained models
MEAN = torch.tensor([0.5, -0.3, 0.1])
STD = torch.tensor([0.2, 0.3, 0.25])


def _train_sigma_model(kind: str):
    from ldm.engine.engine import DiffusionEngine

    torch.manual_seed(0)
    training = {"kind": kind, "c_noise_scale": 250.0 if kind == "edm" else 50.0}
    if kind == "ve":  # c_skip = 1: the network learns the noise itself; a short sigma range
        training.update(sigma_min=0.01, sigma_max=5.0)
    model = DiffusionEngine(
        network_config={
            "target": "toy_denoiser.ToyDenoiser",
            "params": {"in_channels": 3, "image_size": 2, "width": 96},
        },
        denoiser_config={"sigma_training": training},
        image_size=2,
        channels=3,
        use_ema=False,
        monitor=None,
    )
    g = torch.Generator().manual_seed(2)
    opt = torch.optim.AdamW(model.model.parameters(), lr=3e-3)
    for i in range(400 if kind == "edm" else 600):
        x = MEAN + STD * torch.randn(256, 2, 2, 3, generator=g)  # [B, H, W, C]
        loss = model.training_step({"image": x}, i)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.mark.parametrize("kind", ["edm", "ve"])
def test_sigma_trained_model_samples_with_three_solvers_from_api_and_command(kind, tmp_path):
    model = _train_sigma_model(kind)
    cfg = {
        "model": {
            "target": "ldm.engine.engine.DiffusionEngine",
            "params": {
                "network_config": {
                    "target": "toy_denoiser.ToyDenoiser",
                    "params": {"in_channels": 3, "image_size": 2, "width": 96},
                },
                "denoiser_config": {"sigma_training": model.sigma_training.__dict__},
                "image_size": 2,
                "channels": 3,
                "use_ema": False,
            },
        }
    }
    path = save_state_dict(model.state_dict(), tmp_path / f"{kind}.ckpt", config=cfg)
    loaded = ldm.load_model(path, device="cpu")
    outs = {}
    for solver in ("euler", "dpmpp_2m", "ddim"):
        z = loaded.generate(
            num_images_per_prompt=3000, sampler=solver, steps=30, seed=0, output="latent"
        )
        per_channel = z.permute(1, 0, 2, 3).reshape(3, -1)  # [C, N]
        torch.testing.assert_close(per_channel.mean(1), MEAN, atol=0.06, rtol=0)
        torch.testing.assert_close(per_channel.std(1), STD, atol=0.06, rtol=0)
        outs[solver] = z
        # the command: same images as generate() for the same solver and seed
        out_dir = tmp_path / f"{kind}-{solver}"
        flags = ["--ckpt", str(path), "--sampler", solver, "--steps", "30", "--seed", "5"]
        pngs = run(
            "txt2img",
            [
                *flags,
                "--n_samples",
                "2",
                "--n_iter",
                "1",
                "--device",
                "cpu",
                "--outdir",
                str(out_dir),
            ],
        )
        ours = loaded.generate(num_images_per_prompt=2, sampler=solver, steps=30, seed=5)
        png = pixels(Image.open(p).convert("RGB") for p in pngs[:2])
        np.testing.assert_array_equal(png, pixels(ours))
    # the solver asked for is the solver used
    assert (outs["euler"] - outs["dpmpp_2m"]).abs().max() > 1e-3
    assert (outs["ddim"] - outs["dpmpp_2m"]).abs().max() > 1e-3


def test_sigma_model_refuses_timestep_spacings_with_a_clear_error():
    from ldm.engine.engine import DiffusionEngine

    model = DiffusionEngine(
        network_config={"target": "toy_denoiser.ToyDenoiser", "params": {"in_channels": 3}},
        denoiser_config={"sigma_training": {"kind": "edm"}},
        image_size=1,
        use_ema=False,
    )
    with pytest.raises(ValueError, match="sigma-conditioned.*karras"):
        model.generate(sampler="euler", steps=3, timestep_spacing="leading", output="latent")


def test_run_directories_made_before_recording_give_their_judged_settings(tmp_path):
    import json

    from ldm.engine.defaults import defaults_from_run_dir

    run = tmp_path / "2026-01-01T00-00-00_txt2img"
    (run / "checkpoints").mkdir(parents=True)
    ckpt = run / "checkpoints" / "last.ckpt"
    assert defaults_from_run_dir(ckpt) == {}
    (run / "configs").mkdir()
    (run / "configs" / "x-lightning.yaml").write_text(
        "lightning:\n  callbacks:\n    ev:\n      target: ldm.evaluation.ShapesEvaluation\n"
        "      params: {sampler: heun, steps: 12, guidance_scale: 2.0}\n"
    )
    assert defaults_from_run_dir(ckpt) == {"sampler": "heun", "steps": 12, "guidance_scale": 2.0}
    sampling = {"sampler": "euler", "steps": 9, "guidance_scale": 3.5, "seed": 0, "karras": True}
    (run / "final_scores.json").write_text(json.dumps({"sampling": sampling}))
    assert defaults_from_run_dir(ckpt) == {
        "sampler": "euler",
        "steps": 9,
        "guidance_scale": 3.5,
        "options": {"karras": True},
    }
    assert defaults_from_run_dir(tmp_path / "elsewhere.ckpt") == {}


def test_shapes_evaluation_records_what_the_model_is_judged_with():
    from ldm.evaluation import ShapesEvaluation

    model = build_tiny(tiny_ldm_config())
    cb = ShapesEvaluation(n_per_split=1, sampler="heun", steps=7, guidance_scale=2.0)
    cb.on_fit_start(None, model)
    assert model.sampling_defaults == {
        "sampler": "heun",
        "steps": 7,
        "guidance_scale": 2.0,
        "options": {},
    }
    checkpoint: dict = {}
    model.on_save_checkpoint(checkpoint)
    assert checkpoint["sampling_defaults"]["sampler"] == "heun"
    # a config that names its own defaults keeps them
    model.sampling_defaults = dict(DEFAULTS)
    cb.on_fit_start(None, model)
    assert model.sampling_defaults == DEFAULTS


def test_init_images_keep_their_size_rounded_to_the_latent_grid(model):
    init = torch.rand(1, 3, 17, 21)  # the tiny first stage has f = 2
    out = model.generate(PROMPTS[0], init_image=init, strength=0.5, seed=0, output="tensor")
    assert out.shape == (1, 3, 16, 20)
    with pytest.raises(ValueError, match="height 17 must be a multiple of 2.*use 16 or 18"):
        model.generate(PROMPTS[0], height=17, output="latent")
    with pytest.raises(ValueError, match="not both"):
        model.generate(PROMPTS[0], cond=torch.zeros(1, 77, 32), output="latent")


def test_sizes_the_unet_cannot_halve_evenly_generate(model):
    """The tiny U-Net downsamples once (even latent sides); 9 x 7 latents (18 x 14 pixels, or an
    init image of 19 x 15 rounded down to the grid) work, as diffusers' U-Net does."""
    out = model.generate(PROMPTS[0], height=18, width=14, steps=2, seed=0, output="tensor")
    assert out.shape == (1, 3, 18, 14) and torch.isfinite(out).all()
    init = torch.rand(1, 3, 19, 15)
    out = model.generate(
        PROMPTS[0], init_image=init, strength=0.5, steps=2, seed=0, output="tensor"
    )
    assert out.shape == (1, 3, 18, 14)
    tiny = model.generate(PROMPTS[0], init_image=torch.rand(1, 3, 1, 5), steps=2, output="tensor")
    assert tiny.shape == (1, 3, 2, 4)  # at least one latent cell
