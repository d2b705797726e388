"""CompVis sampler facades: same numbers as `ldm.samplers.sample` and as the CompVis DDIM loop."""

import numpy as np
import pytest
import torch

from ldm.samplers import cfg_model_fn, sample
from ldm.util import instantiate_from_config

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread is fastest


def tiny_ldm(parameterization="eps"):
    torch.manual_seed(0)
    cfg = {
        "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
        "params": {
            "first_stage_config": {"target": "ldm.models.autoencoder.IdentityFirstStage"},
            "cond_stage_config": {"target": "torch.nn.Identity"},
            "cond_stage_key": "ctx",
            "conditioning_key": "crossattn",
            "first_stage_key": "image",
            "image_size": 4,
            "channels": 2,
            "linear_start": 0.00085,
            "linear_end": 0.012,
            "parameterization": parameterization,
            "use_ema": False,
            "unet_config": {
                "target": "toy_denoiser.ToyDenoiser",
                "params": {"in_channels": 2, "image_size": 4, "width": 32, "context_dim": 8},
            },
        },
    }
    return instantiate_from_config(cfg).eval()


def reference_ddim(model, x, cond, uc, scale, S, eta=0.0, noises=None, t_start=None):
    """The CompVis DDIMSampler loop (ddim.py p_sample_ddim), written out independently."""
    T = model.num_timesteps
    ts = np.asarray(list(range(0, T, T // S))) + 1
    ac = model.alphas_cumprod.double()
    a_all = ac[ts]
    a_prev_all = torch.cat([ac[:1], ac[ts[:-1]]])
    sig_all = eta * ((1 - a_prev_all) / (1 - a_all) * (1 - a_all / a_prev_all)).sqrt()
    steps = list(range(len(ts)))[::-1] if t_start is None else list(range(t_start))[::-1]
    for k, index in enumerate(steps):
        t = torch.full((x.shape[0],), int(ts[index]))
        out_c = model.apply_model(x, t, cond)
        out = out_c
        if scale != 1.0:
            out_u = model.apply_model(x, t, uc)
            out = out_u + scale * (out_c - out_u)
        a, a_prev, sig = a_all[index], a_prev_all[index], sig_all[index]
        if model.parameterization == "v":
            e = a.sqrt() * out + (1 - a).sqrt() * x
            pred_x0 = a.sqrt() * x - (1 - a).sqrt() * out
        else:
            e = out
            pred_x0 = (x - (1 - a).sqrt() * e) / a.sqrt()
        x = a_prev.sqrt() * pred_x0 + (1 - a_prev - sig**2).sqrt() * e
        if eta > 0:
            x = x + sig * noises[k]
    return x


@pytest.fixture(scope="module")
def cond():
    g = torch.Generator().manual_seed(1)
    return torch.randn(3, 5, 8, generator=g), torch.zeros(3, 5, 8)


@pytest.mark.parametrize("parameterization", ["eps", "v"])
def test_ddim_facade_equals_the_compvis_loop(parameterization, cond):
    from ldm.models.diffusion.ddim import DDIMSampler

    model = tiny_ldm(parameterization)
    c, uc = cond
    x_T = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(2))
    samples, inter = DDIMSampler(model).sample(
        S=25,
        batch_size=3,
        shape=(2, 4, 4),
        conditioning=c,
        verbose=False,
        x_T=x_T,
        unconditional_guidance_scale=5.0,
        unconditional_conditioning=uc,
        log_every_t=5,
    )
    ref = reference_ddim(model, x_T, c, uc, 5.0, 25)
    torch.testing.assert_close(samples, ref.float(), rtol=1e-5, atol=1e-5)
    assert set(inter) == {"x_inter", "pred_x0"} and len(inter["x_inter"]) >= 2
    torch.testing.assert_close(inter["x_inter"][-1], samples)


def test_ddim_facade_equals_ldm_samplers_sample(cond):
    from ldm.models.diffusion.ddim import DDIMSampler

    model = tiny_ldm()
    c, uc = cond
    x_T = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(3))
    for eta in (0.0, 1.0):
        legacy, _ = DDIMSampler(model).sample(
            S=20,
            batch_size=3,
            shape=(2, 4, 4),
            conditioning=c,
            eta=eta,
            x_T=x_T,
            verbose=False,
            unconditional_guidance_scale=3.0,
            unconditional_conditioning=uc,
            generator=torch.Generator().manual_seed(9),
        )
        fn = cfg_model_fn(model.apply_model, c, uc, 3.0)
        direct = sample(
            fn,
            x_T,
            sampler="ddim",
            steps=20,
            alphas_cumprod=model.alphas_cumprod,
            eta=eta,
            generator=torch.Generator().manual_seed(9),
        )
        torch.testing.assert_close(legacy, direct, rtol=1e-5, atol=1e-5)


def test_ddim_eta_one_with_shared_noise_equals_the_compvis_loop(cond):
    from ldm.models.diffusion.ddim import DDIMSampler

    model = tiny_ldm()
    c, _ = cond
    x_T = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(4))
    noises = []
    g = torch.Generator().manual_seed(11)
    legacy, _ = DDIMSampler(model).sample(
        S=10,
        batch_size=3,
        shape=(2, 4, 4),
        conditioning=c,
        eta=1.0,
        x_T=x_T,
        verbose=False,
        generator=g,
    )
    g = torch.Generator().manual_seed(11)
    noises = [torch.randn(x_T.shape, generator=g) for _ in range(10)]
    ref = reference_ddim(model, x_T, c, None, 1.0, 10, eta=1.0, noises=noises)
    torch.testing.assert_close(legacy, ref.float(), rtol=1e-5, atol=1e-5)


def test_img2img_stochastic_encode_and_decode(cond):
    from ldm.models.diffusion.ddim import DDIMSampler

    model = tiny_ldm()
    c, uc = cond
    sampler = DDIMSampler(model)
    sampler.make_schedule(ddim_num_steps=20, ddim_eta=0.0, verbose=False)
    x0 = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(5))
    noise = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(6))
    t_enc = 12
    z = sampler.stochastic_encode(x0, torch.tensor([t_enc] * 3), noise=noise)
    a = model.alphas_cumprod.double()[int(sampler.ddim_timesteps[t_enc])]
    torch.testing.assert_close(z, (a.sqrt() * x0 + (1 - a).sqrt() * noise).float())
    out = sampler.decode(
        z, c, t_enc, unconditional_guidance_scale=2.0, unconditional_conditioning=uc
    )
    ref = reference_ddim(model, z, c, uc, 2.0, 20, t_start=t_enc)
    torch.testing.assert_close(out, ref.float(), rtol=1e-5, atol=1e-5)


def test_plms_and_dpm_solver_facades_use_the_named_solvers(cond):
    from ldm.models.diffusion.dpm_solver import DPMSolverSampler
    from ldm.models.diffusion.plms import PLMSSampler

    model = tiny_ldm()
    c, _ = cond
    x_T = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(7))
    fn = cfg_model_fn(model.apply_model, c, None, 1.0)
    plms, _ = PLMSSampler(model).sample(
        S=20, batch_size=3, shape=(2, 4, 4), conditioning=c, x_T=x_T, verbose=False
    )
    ts = [int(t) for t in (np.arange(0, 1000, 50) + 1)[::-1]]
    direct = sample(
        fn, x_T, sampler="plms", steps=20, alphas_cumprod=model.alphas_cumprod, timesteps=ts
    )
    torch.testing.assert_close(plms, direct, rtol=1e-5, atol=1e-5)
    dpm, none = DPMSolverSampler(model).sample(
        S=15, batch_size=3, shape=(2, 4, 4), conditioning=c, x_T=x_T
    )
    assert none is None
    direct = sample(fn, x_T, sampler="dpmpp_2m", steps=15, alphas_cumprod=model.alphas_cumprod)
    torch.testing.assert_close(dpm, direct, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="eta must be 0"):
        PLMSSampler(model).sample(S=5, batch_size=3, shape=(2, 4, 4), conditioning=c, eta=0.5)


def test_mask_keeps_the_known_region(cond):
    from ldm.models.diffusion.ddim import DDIMSampler

    model = tiny_ldm()
    c, _ = cond
    x0 = torch.randn(3, 2, 4, 4)
    mask = torch.zeros(3, 1, 4, 4)
    mask[..., :2] = 1.0  # keep the left half
    out, _ = DDIMSampler(model).sample(
        S=10, batch_size=3, shape=(2, 4, 4), conditioning=c, mask=mask, x0=x0, verbose=False
    )
    torch.testing.assert_close(out[..., :2], x0[..., :2])
    assert (out[..., 2:] - x0[..., 2:]).abs().mean() > 0.1


def test_unsupported_compvis_options_fail_loudly(cond):
    from ldm.models.diffusion.ddim import DDIMSampler

    with pytest.raises(ValueError, match="temperature"):
        DDIMSampler(tiny_ldm()).sample(
            S=5, batch_size=3, shape=(2, 4, 4), conditioning=cond[0], temperature=0.5
        )
