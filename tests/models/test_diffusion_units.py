"""DDPM / LatentDiffusion pieces: targets, weights, conditioning routing, CFG dropout, checkpoints,
scale_by_std, inpainting widening, log_images."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from ldm.diffusion import losses
from ldm.engine.conditioner import Conditioner, Embedder
from ldm.engine.network import DiffusionWrapper
from ldm.util import ConfigError, instantiate_from_config

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread is fastest


TOY = "toy_denoiser.ToyDenoiser"


def tiny(**overrides):
    params = {
        "first_stage_config": {"target": "ldm.models.autoencoder.IdentityFirstStage"},
        "cond_stage_config": "__is_unconditional__",
        "first_stage_key": "image",
        "image_size": 2,
        "channels": 2,
        "linear_start": 0.00085,
        "linear_end": 0.012,
        "use_ema": False,
        "unet_config": {"target": TOY, "params": {"in_channels": 2, "image_size": 2, "width": 16}},
    }
    params.update(overrides)
    torch.manual_seed(0)
    return instantiate_from_config(
        {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": params}
    )


class Recorder:
    """apply_model replacement: remembers x_t and returns zeros, so loss_simple = mean(target^2)."""

    def __init__(self):
        self.x = None

    def __call__(self, x, t, cond=None):
        self.x = x.detach().clone()
        return torch.zeros_like(x)


def _ac(model, t):
    return model.alphas_cumprod.double()[t].float().view(-1, 1, 1, 1)


@pytest.mark.parametrize("parameterization", ["eps", "x0", "v"])
def test_targets_and_forward_process(parameterization):
    model = tiny(parameterization=parameterization)
    rec = Recorder()
    model.apply_model = rec
    x0, noise = torch.randn(4, 2, 2, 2), torch.randn(4, 2, 2, 2)
    t = torch.tensor([0, 10, 500, 999])
    _, logs = model.p_losses(x0, None, t, noise)
    a = _ac(model, t)
    torch.testing.assert_close(rec.x, a.sqrt() * x0 + (1 - a).sqrt() * noise)
    target = {"eps": noise, "x0": x0, "v": a.sqrt() * noise - (1 - a).sqrt() * x0}[parameterization]
    torch.testing.assert_close(logs["train/loss_simple"], (target**2).mean())


def test_input_perturbation_noises_x_t_but_not_the_target():
    model = tiny(input_perturbation=0.1)
    rec = Recorder()
    model.apply_model = rec
    x0, noise = torch.randn(64, 2, 2, 2), torch.randn(64, 2, 2, 2)
    t = torch.full((64,), 999)
    _, logs = model.p_losses(x0, None, t, noise)
    a = _ac(model, t)
    used = (rec.x - a.sqrt() * x0) / (1 - a).sqrt()
    diff = used - noise
    assert diff.std().item() == pytest.approx(0.1, rel=0.15)
    torch.testing.assert_close(logs["train/loss_simple"], (noise**2).mean())


def test_offset_noise_adds_a_per_channel_constant():
    model = tiny(offset_noise=0.5)
    rec = Recorder()
    model.apply_model = rec
    x0, noise = torch.zeros(256, 2, 2, 2), torch.randn(256, 2, 2, 2)
    t = torch.full((256,), 999)
    model.p_losses(x0, None, t, noise)
    offset = rec.x / (1 - _ac(model, t)).sqrt() - noise  # [B, C, H, W], constant over H, W
    torch.testing.assert_close(offset, offset[:, :, :1, :1].expand_as(offset))
    assert offset[:, :, 0, 0].std().item() == pytest.approx(0.5, rel=0.15)


def test_min_snr_gamma_weights():
    snr = torch.tensor([0.1, 1.0, 5.0, 50.0])
    np.testing.assert_allclose(losses.min_snr_weights(snr, 5.0, "eps"), [1, 1, 1, 0.1], rtol=1e-6)
    np.testing.assert_allclose(losses.min_snr_weights(snr, 5.0, "v"), snr.clamp(max=5) / (snr + 1))
    np.testing.assert_allclose(losses.min_snr_weights(snr, 5.0, "x0"), [0.1, 1, 5, 5])
    model = tiny(min_snr_gamma=5.0)
    model.apply_model = Recorder()
    x0, noise = torch.randn(4, 2, 2, 2), torch.randn(4, 2, 2, 2)
    t = torch.tensor([0, 100, 400, 999])
    loss, _ = model.p_losses(x0, None, t, noise)
    a = model.alphas_cumprod.double()[t]
    w = (a / (1 - a)).clamp(max=5) / (a / (1 - a))
    expected = (w.float() * (noise**2).mean(dim=(1, 2, 3))).mean()
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("loss_type", ["l1", "l2"])
def test_loss_type_and_the_elbo_term(loss_type):
    """L = l_simple_weight * mean_b(mean |eps|^p) + elbo_weight * mean_b(w_t mean |eps|^p), with
    w_t = beta_t^2 / (2 sigma_t^2 alpha_t (1 - a_t)) (DDPM Eq. 5 -> 12; w_0 := w_1), for an eps
    model that outputs zeros (so the error is the noise itself)."""
    model = tiny(loss_type=loss_type, l_simple_weight=0.5, original_elbo_weight=2.0)
    model.apply_model = Recorder()
    x0, noise = torch.randn(4, 2, 2, 2), torch.randn(4, 2, 2, 2)
    t = torch.tensor([0, 100, 400, 999])
    loss, log = model.p_losses(x0, None, t, noise)
    err = noise.abs() if loss_type == "l1" else noise**2
    per_item = err.double().mean(dim=(1, 2, 3))  # [B]
    b = model.betas.double()
    a = torch.cumprod(1 - b, 0)
    a_prev = torch.cat([torch.ones(1, dtype=torch.float64), a[:-1]])
    var = b * (1 - a_prev) / (1 - a)
    w = b**2 / (2 * var * (1 - b) * (1 - a))
    w[0] = w[1]
    vlb = (w[t] * per_item).mean()
    torch.testing.assert_close(
        log["train/loss_simple"].double(), per_item.mean(), rtol=1e-5, atol=0
    )
    torch.testing.assert_close(log["train/loss_vlb"].double(), vlb, rtol=1e-4, atol=0)
    expected = 0.5 * per_item.mean() + 2.0 * vlb
    torch.testing.assert_close(loss.double(), expected, rtol=1e-4, atol=0)


def test_snr_weight_floor_gives_clamped_x0_weights():
    snr = torch.tensor([0.001, 0.1, 1.0, 3.0, 50.0])
    x0_weight = {"eps": snr, "v": snr + 1, "x0": torch.ones_like(snr)}
    for param, native in x0_weight.items():
        w = losses.min_snr_weights(snr, 5.0, param, floor=1.0)
        torch.testing.assert_close(w * native, torch.tensor([1.0, 1.0, 1.0, 3.0, 5.0]))
        # floor only: truncated SNR max(SNR, 1) (Salimans & Ho 2022)
        w = losses.min_snr_weights(snr, None, param, floor=1.0)
        torch.testing.assert_close(w * native, torch.tensor([1.0, 1.0, 1.0, 3.0, 50.0]))
    model = tiny(parameterization="v", min_snr_gamma=5.0, snr_weight_floor=1.0)
    model.apply_model = Recorder()
    x0, noise = torch.randn(4, 2, 2, 2), torch.randn(4, 2, 2, 2)
    t = torch.tensor([0, 100, 400, 999])
    loss, _ = model.p_losses(x0, None, t, noise)
    a = model.alphas_cumprod.double()[t]
    snr_t = a / (1 - a)
    v = a.sqrt()[:, None, None, None] * noise - (1 - a).sqrt()[:, None, None, None] * x0
    w = snr_t.clamp(1.0, 5.0) / (snr_t + 1)
    expected = (w.float() * (v.float() ** 2).mean(dim=(1, 2, 3))).mean()
    torch.testing.assert_close(loss, expected)
    with pytest.raises(ConfigError, match="snr_weight_floor=6.0 is above min_snr_gamma=5.0"):
        tiny(min_snr_gamma=5.0, snr_weight_floor=6.0)


def test_vlb_weights_eps_match_compvis_and_x0_v_are_consistent():
    model = tiny(original_elbo_weight=1.0)
    b = model.betas.double()
    ac = torch.cumprod(1 - b, 0)
    ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    var = b * (1 - ac_prev) / (1 - ac)  # beta_tilde (DDPM Eq. 7), v_posterior = 0
    w_eps = b**2 / (2 * var * (1 - b) * (1 - ac))
    w_eps[0] = w_eps[1]
    torch.testing.assert_close(model.lvlb_weights.double(), w_eps, rtol=1e-5, atol=0)
    # the same L_{t-1} expressed for x0 / v errors: eps - eps_hat = -sqrt(a)/sqrt(1-a) (x0 - x0_hat)
    w_x0 = losses.lvlb_weights(b, ac, var, "x0").double()
    w_v = losses.lvlb_weights(b, ac, var, "v").double()
    torch.testing.assert_close(w_x0[1:], (w_eps * ac / (1 - ac))[1:], rtol=1e-4, atol=0)
    torch.testing.assert_close(w_v[1:], (w_eps * ac)[1:], rtol=1e-5, atol=0)


def test_learned_logvar_enters_loss_and_optimizer():
    model = tiny(learn_logvar=True, logvar_init=0.5)
    assert isinstance(model.logvar, nn.Parameter)
    assert any(p is model.logvar for p in model.trainable_parameters())
    assert "logvar" in model.state_dict()
    model.apply_model = Recorder()
    x0, noise = torch.randn(2, 2, 2, 2), torch.randn(2, 2, 2, 2)
    loss, logs = model.p_losses(x0, None, torch.tensor([3, 7]), noise)
    simple = (noise**2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(loss, (simple / math.exp(0.5) + 0.5).mean())
    assert "train/loss_gamma" in logs
    assert "logvar" not in tiny().state_dict()


class FakeUNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, context=None, y=None):
        self.calls.append({"x": x, "context": context, "y": y})
        return x[:, :2]


@pytest.mark.parametrize(
    "key,expect_channels,expect_context,expect_y",
    [
        (None, 2, None, None),
        ("concat", 5, None, None),
        ("crossattn", 2, (1, 7, 4), None),
        ("hybrid", 5, (1, 7, 4), None),
        ("adm", 2, None, (1, 6)),
        ("hybrid-adm", 5, (1, 7, 4), (1, 6)),
        ("crossattn-adm", 2, (1, 7, 4), (1, 6)),
    ],
)
def test_diffusion_wrapper_routes_each_conditioning_key(
    monkeypatch, key, expect_channels, expect_context, expect_y
):
    import ldm.engine.network as cond_mod

    monkeypatch.setattr(cond_mod, "instantiate_from_config", lambda cfg: FakeUNet())
    w = DiffusionWrapper({"target": "x"}, key)
    x, t = torch.zeros(1, 2, 3, 3), torch.zeros(1)
    c_concat = [torch.ones(1, 3, 3, 3)]
    c_cross = [torch.ones(1, 3, 4), torch.ones(1, 4, 4)]  # concatenated along tokens
    adm = torch.ones(1, 6)
    kwargs = {"c_concat": c_concat, "c_crossattn": c_cross, "c_adm": adm}
    if key == "adm":
        kwargs["c_crossattn"] = [adm]
    w(x, t, **kwargs)
    call = w.diffusion_model.calls[-1]
    assert call["x"].shape[1] == expect_channels
    assert (None if call["context"] is None else tuple(call["context"].shape)) == expect_context
    assert (None if call["y"] is None else tuple(call["y"].shape)) == expect_y
    with pytest.raises(ValueError, match="conditioning_key"):
        DiffusionWrapper({"target": "x"}, "cross-attn")


def test_conditioner_drops_each_input_with_its_own_rate():
    ident = lambda v: v  # noqa: E731
    cond = Conditioner(
        [
            Embedder("txt", ident, ucg_rate=0.3, null=""),
            Embedder("cls", ident, kind="vector", ucg_rate=1.0, null=9),
            Embedder("img", ident, kind="concat"),
        ]
    )
    batch = {"txt": ["a"] * 2000, "cls": torch.full((2000,), 3), "img": [1] * 2000}
    cond.drop(batch, torch.Generator().manual_seed(0))
    frac = sum(t == "" for t in batch["txt"]) / 2000
    assert frac == pytest.approx(0.3, abs=0.04)
    assert torch.equal(batch["cls"], torch.full((2000,), 9))
    assert batch["img"] == [1] * 2000  # no rate: untouched
    with pytest.raises(KeyError, match="txt"):
        cond.drop({"cls": torch.zeros(2)})

    # the unconditional inputs: null values or the negative prompt; concat inputs kept
    def lengths(v):
        return torch.tensor([float(len(x)) for x in v])[:, None]  # [B, 1]

    text = Conditioner([Embedder("txt", lengths, null="")])
    assert text.uncond({"txt": ["x", "yy"]}, 2).tolist() == [[0.0], [0.0]]
    assert text.uncond({"txt": ["a", "b"]}, 2, "blurry").tolist() == [[6.0], [6.0]]
    assert text.uncond({"txt": ["a", "b"]}, 2, ["ab", "abc"]).tolist() == [[2.0], [3.0]]
    both = Conditioner(
        [Embedder("txt", lengths, null=""), Embedder("img", lengths, kind="concat")],
        assemble=lambda outs: {"c_crossattn": [outs[0]], "c_concat": [outs[1]]},
    )
    inputs = {"txt": ["aaaa", "b"], "img": ["xyz", "xyz"]}
    outs = both.embed(inputs)
    un = both.uncond(inputs, 2, outputs=outs)
    assert un["c_concat"][0] is outs[1]  # the concat input is the same in cond and uncond
    assert un["c_crossattn"][0].tolist() == [[0.0], [0.0]]


class Captions(nn.Module):
    """Text conditioner for tests: [B, 1, 4] embedding of len(caption); records its inputs."""

    def __init__(self, ucg_rate=0.0, dim=4):
        super().__init__()
        self.ucg_rate = ucg_rate
        self.proj = nn.Linear(1, dim)
        self.seen = []

    def forward(self, text):
        self.seen.append(list(text))
        lengths = torch.tensor([[float(len(s))] for s in text])
        return self.proj(lengths)[:, None]  # [B, 1, 4]


def _text_ldm(ucg_rate=0.0, trainable=False):
    return tiny(
        cond_stage_config={"target": f"{__name__}.Captions", "params": {"ucg_rate": ucg_rate}},
        cond_stage_key="txt",
        conditioning_key="crossattn",
        cond_stage_trainable=trainable,
        unet_config={
            "target": TOY,
            "params": {"in_channels": 2, "image_size": 2, "width": 16, "context_dim": 4},
        },
    )


def test_frozen_conditioner_ucg_rate_is_applied_in_training_steps():
    model = _text_ldm(ucg_rate=1.0)
    batch = {"image": torch.zeros(3, 2, 2, 2), "txt": ["cat", "dog", "x"]}
    model.train()
    assert not model.cond_stage_model.training  # frozen conditioners stay in eval mode
    assert model.conditioner.entries[0].ucg_rate == 1.0
    model.training_step({"image": batch["image"], "txt": list(batch["txt"])}, 0)
    assert model.cond_stage_model.seen[-1] == ["", "", ""]
    model.eval()
    model.get_input(batch, "image")
    assert model.cond_stage_model.seen[-1] == ["cat", "dog", "x"]
    uc = model.get_unconditional_conditioning(3)
    assert model.cond_stage_model.seen[-1] == [""] and uc.shape == (3, 1, 4)


def test_trainable_conditioner_is_optimized_and_encodes_in_forward():
    model = _text_ldm(trainable=True)
    params = {id(p) for p in model.trainable_parameters()}
    assert all(id(p) in params for p in model.cond_stage_model.parameters())
    z, c = model.get_input({"image": torch.zeros(2, 2, 2, 2), "txt": ["a", "bb"]}, "image")
    assert c == ["a", "bb"]  # raw captions; encoded with gradients inside forward
    loss, _ = model(z, c)
    loss.backward()
    assert model.cond_stage_model.proj.weight.grad is not None


def test_scale_by_std_sets_the_buffer_from_the_first_batch():
    model = tiny(scale_by_std=True)
    assert "scale_factor" in model.state_dict()
    data = 3.0 * torch.randn(64, 2, 2, 2)  # B x H x W x C
    model.on_train_batch_start({"image": data}, 0)
    assert float(model.scale_factor) == pytest.approx(1 / data.std().item(), rel=1e-5)
    z, _ = model.get_input({"image": data}, "image")
    assert z.std().item() == pytest.approx(1.0, rel=1e-5)
    with pytest.raises(ConfigError, match="zero_terminal_snr"):
        tiny(zero_terminal_snr=True)


def test_checkpoint_round_trip_and_ignore_keys(tmp_path):
    src = tiny(use_ema=True)
    with torch.no_grad():  # trained weights differ from a fresh init and from the stored EMA
        src.model.diffusion_model.inp.weight.add_(1.0)
    path = tmp_path / "m.ckpt"
    torch.save({"state_dict": src.state_dict(), "global_step": 5}, path)
    dst = tiny(use_ema=True, ckpt_path=str(path), linear_start=0.001)
    for k, v in src.state_dict().items():
        torch.testing.assert_close(dst.state_dict()[k], v)
    # the schedule of the checkpoint wins, also for the float64 copy used by the math
    torch.testing.assert_close(dst.alphas_cumprod_f64.float(), src.alphas_cumprod)
    # a file without EMA weights (e.g. SD v1 pruned): the EMA starts from the loaded weights
    noema = tiny(use_ema=True, ckpt_path=str(path), ignore_keys=["model_ema."])
    torch.testing.assert_close(
        noema.model_ema.diffusion_modelinpweight, src.model.diffusion_model.inp.weight
    )
    part = tiny(
        use_ema=True, ckpt_path=str(path), ignore_keys=["model_ema."], reset_num_ema_updates=True
    )
    assert int(part.model_ema.num_updates) == 0
    torch.testing.assert_close(
        part.model.diffusion_model.inp.weight, src.model.diffusion_model.inp.weight
    )


def test_make_it_fit_tiles_and_rescales():
    from ldm.engine.init_weights import fit_tensor

    old = torch.arange(6.0).view(2, 3)
    new = fit_tensor(old, torch.Size([4, 6]))
    assert new.shape == (4, 6)
    # each old input column is copied twice, so its weight is halved; rows are tiled
    torch.testing.assert_close(new[:2, :3], old / 2)
    torch.testing.assert_close(new[2:, 3:], old / 2)
    torch.testing.assert_close(new.sum(dim=1)[:2], old.sum(dim=1))


UNET = {
    "target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
    "params": {
        "image_size": 8,
        "in_channels": 4,
        "out_channels": 4,
        "model_channels": 32,
        "attention_resolutions": [1],
        "num_res_blocks": 1,
        "channel_mult": [1],
        "num_head_channels": 16,
        "use_spatial_transformer": True,
        "context_dim": 8,
        "use_linear_in_transformer": True,
        "legacy": False,
    },
}


def _inpaint_params(in_channels, **extra):
    unet = {"target": UNET["target"], "params": dict(UNET["params"], in_channels=in_channels)}
    return dict(
        first_stage_config={"target": "ldm.models.autoencoder.IdentityFirstStage"},
        cond_stage_config={"target": f"{__name__}.Captions", "params": {"dim": 8}},
        cond_stage_key="txt",
        first_stage_key="jpg",
        image_size=8,
        channels=4,
        linear_start=0.00085,
        linear_end=0.012,
        unet_config=unet,
        **extra,
    )


def test_inpainting_model_starts_from_a_4_channel_checkpoint(tmp_path):
    torch.manual_seed(0)
    base = instantiate_from_config(
        {
            "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
            "params": _inpaint_params(4, conditioning_key="crossattn", use_ema=True),
        }
    )
    path = tmp_path / "sd.ckpt"
    torch.save({"state_dict": base.state_dict()}, path)
    inp = instantiate_from_config(
        {
            "target": "ldm.models.diffusion.ddpm.LatentInpaintDiffusion",
            "params": _inpaint_params(
                9, conditioning_key="hybrid", use_ema=True, ckpt_path=str(path)
            ),
        }
    )
    w = inp.model.diffusion_model.input_blocks[0][0].weight
    assert w.shape == (32, 9, 3, 3)
    torch.testing.assert_close(w[:, :4], base.model.diffusion_model.input_blocks[0][0].weight)
    assert w[:, 4:].abs().max() == 0
    assert inp.model_ema.diffusion_modelinput_blocks00weight.shape == (32, 9, 3, 3)
    # with zero extra channels the widened model computes what the checkpoint computed
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 3, 8)
    t = torch.tensor([10, 700])
    c_cat = torch.randn(2, 5, 8, 8)
    out = inp.apply_model(x, t, {"c_concat": [c_cat], "c_crossattn": [ctx]})
    torch.testing.assert_close(out, base.apply_model(x, t, ctx))
    # get_input builds [mask resized, E(masked image)] as c_concat: 1 + 4 channels
    batch = {
        "jpg": torch.randn(2, 8, 8, 4),
        "masked_image": torch.randn(2, 8, 8, 4),
        "mask": torch.ones(2, 8, 8, 1),
        "txt": ["a", "bb"],
    }
    z, c = inp.get_input(batch, "jpg")
    assert c["c_concat"][0].shape == (2, 5, 8, 8)
    torch.testing.assert_close(c["c_concat"][0][:, 1:], batch["masked_image"].permute(0, 3, 1, 2))
    assert c["c_crossattn"][0].shape[0] == 2 and z.shape == (2, 4, 8, 8)
    log = inp.log_images(
        batch,
        N=2,
        ddim_steps=2,
        unconditional_guidance_scale=2.0,
        unconditional_guidance_label=torch.zeros(1, 3, 8, 1),
    )
    assert {"samples", "samples_cfg_scale_2.00", "masked_image", "mask"} <= set(log)
    assert log["samples"].shape == (2, 4, 8, 8) and log["mask"].shape == (2, 1, 8, 8)


def test_log_images_keys_and_ranges():
    model = _text_ldm()
    model.eval()
    batch = {"image": torch.rand(3, 2, 2, 2) * 2 - 1, "txt": ["a cat", "a dog", ""]}
    log = model.log_images(
        batch,
        N=3,
        n_row=2,
        ddim_steps=5,
        plot_denoise_rows=True,
        unconditional_guidance_scale=3.0,
        inpaint=False,
    )
    expected = {
        "inputs",
        "reconstruction",
        "conditioning",
        "diffusion_row",
        "samples",
        "denoise_row",
        "progressive_row",
        "samples_cfg_scale_3.00",
    }
    assert expected <= set(log)
    assert log["samples"].shape == (3, 2, 2, 2)
    cond = log["conditioning"]
    assert cond.shape == (3, 3, 2, 2) and cond.min() >= -1 and cond.max() <= 1
    from ldm.engine.image_rows import log_txt_as_img

    img = log_txt_as_img((64, 32), ["hello world", ""])
    assert img.shape == (2, 3, 32, 64)
    assert img[0].min() < 0 and (img[1] == 1).all()  # text is drawn in black; blank stays white


def test_pixel_ddpm_trains_and_logs_images():
    torch.manual_seed(0)
    model = instantiate_from_config(
        {
            "target": "ldm.models.diffusion.ddpm.DDPM",
            "params": {
                "image_size": 2,
                "channels": 2,
                "first_stage_key": "image",
                "timesteps": 100,
                "unet_config": {
                    "target": TOY,
                    "params": {"in_channels": 2, "image_size": 2, "width": 16},
                },
            },
        }
    )
    assert model.use_ema and model.monitor == "val/loss"
    assert model.num_timesteps == 100 and model.betas.shape == (100,)
    batch = {"image": torch.rand(4, 2, 2, 2) * 2 - 1}
    loss = model.training_step(batch, 0)
    loss.backward()
    assert model.model.diffusion_model.inp.weight.grad is not None
    log = model.log_images(batch, N=4, n_row=2, ddim_steps=5)
    assert {"inputs", "diffusion_row", "samples", "denoise_row"} <= set(log)
    assert log["samples"].shape == (4, 2, 2, 2)
    with pytest.raises(ConfigError, match="parameterization"):
        instantiate_from_config(
            {
                "target": "ldm.models.diffusion.ddpm.DDPM",
                "params": {
                    "unet_config": {"target": TOY, "params": {"in_channels": 2}},
                    "parameterization": "e",
                },
            }
        )


def test_zero_terminal_snr_v_model_trains_and_samples_finitely():
    model = tiny(zero_terminal_snr=True, parameterization="v")
    assert float(model.alphas_cumprod[-1]) == 0.0
    assert float(model.alphas_cumprod[0]) == pytest.approx(1 - 0.00085, rel=1e-5)
    loss, _ = model.p_losses(torch.randn(4, 2, 2, 2), None, torch.tensor([0, 500, 998, 999]))
    assert torch.isfinite(loss)
    model.eval()
    z, _ = model.sample_log(None, 2, ddim=True, ddim_steps=5, timestep_spacing="trailing")
    assert torch.isfinite(z).all()


def test_class_conditional_ldm_with_trainable_class_embedder():
    """CompVis cin256-v2 layout: ClassEmbedder (key class_label) trained with the U-Net; its own
    ucg_rate drops labels to the null class; the unconditional input is the null class."""
    model = tiny(
        cond_stage_config={
            "target": "ldm.modules.encoders.modules.ClassEmbedder",
            "params": {"embed_dim": 8, "n_classes": 11, "key": "class_label", "ucg_rate": 1.0},
        },
        cond_stage_key="class_label",
        cond_stage_trainable=True,
        conditioning_key="crossattn",
        unet_config={
            "target": TOY,
            "params": {"in_channels": 2, "image_size": 2, "width": 16, "context_dim": 8},
        },
    )
    batch = {"image": torch.zeros(4, 2, 2, 2), "class_label": torch.tensor([0, 1, 2, 3])}
    model.train()
    assert model.cond_stage_model.training
    z, c = model.get_input(batch, "image", bs=3)
    assert torch.equal(c["class_label"], torch.tensor([0, 1, 2]))  # raw labels, encoded in forward
    loss, _ = model(z, c)
    loss.backward()
    emb = model.cond_stage_model.embedding.weight
    assert emb.grad[10].abs().sum() > 0 and emb.grad[:10].abs().sum() == 0  # all dropped to null
    model.eval()
    uc = model.get_unconditional_conditioning(2)
    torch.testing.assert_close(uc, emb[10].expand(2, 1, 8))


def test_compvis_conversion_helpers_round_trip():
    model = tiny(v_posterior=0.1)
    x0, eps = torch.randn(3, 2, 2, 2), torch.randn(3, 2, 2, 2)
    t = torch.tensor([5, 300, 990])
    x_t = model.q_sample(x0, t, eps)
    torch.testing.assert_close(
        model.predict_start_from_noise(x_t, t, eps), x0, atol=2e-4, rtol=1e-4
    )
    v = model.get_v(x0, eps, t)
    torch.testing.assert_close(
        model.predict_start_from_z_and_v(x_t, t, v), x0, atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(model.predict_eps_from_z_and_v(x_t, t, v), eps, atol=1e-5, rtol=1e-5)
    mean, var, logvar = model.q_posterior(x0, x_t, t)
    # DDPM Eq. 7 from the betas alone: mu = b sqrt(a_prev) / (1 - a) x0 + (1 - a_prev) sqrt(alpha)
    # / (1 - a) x_t; CompVis v_posterior mixes beta_tilde with beta: (1 - v) beta_tilde + v beta
    b = model.betas.double()
    a = torch.cumprod(1 - b, 0)
    a_prev = torch.cat([torch.ones(1, dtype=torch.float64), a[:-1]])
    c1 = (b * a_prev.sqrt() / (1 - a))[t].view(-1, 1, 1, 1)
    c2 = ((1 - a_prev) * (1 - b).sqrt() / (1 - a))[t].view(-1, 1, 1, 1)
    expect_var = (0.9 * b * (1 - a_prev) / (1 - a) + 0.1 * b)[t]
    torch.testing.assert_close(mean.double(), c1 * x0 + c2 * x_t, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(var.flatten().double(), expect_var, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(logvar.flatten().double(), expect_var.log(), rtol=1e-5, atol=1e-6)
