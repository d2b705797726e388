"""Autoencoder losses against values written out here (taming-transformers / CompVis formulas):
the disc_start switch, the adaptive weight of VQGAN Eq. 7 on a hand-made graph, the KL and VQ
totals with every weight away from 1, the conditional discriminator input, the PatchGAN layout,
ActNorm's data-dependent init, the DCGAN init and where LPIPS looks for its weight files."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.distributions import DiagonalGaussianDistribution
from ldm.modules.losses import LPIPS, LPIPSWithDiscriminator, VQLPIPSWithDiscriminator
from ldm.modules.losses import lpips as lpips_mod
from ldm.modules.losses.discriminator import ActNorm, NLayerDiscriminator, weights_init
from ldm.modules.losses.gan import adaptive_weight, adopt_weight, hinge_d_loss, vanilla_d_loss
from ldm.modules.losses.perceptual import build_lpips, reconstruction_loss

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread is fastest


class StubPerceptual(nn.Module):
    """Stands in for LPIPS: a per-image distance [B, 1, 1, 1] (here the mean cubed difference, so
    the argument order shows)."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (x - y).pow(3).mean(dim=(1, 2, 3), keepdim=True)


def _record_build(monkeypatch, module: str) -> list:
    """Replace `build_lpips` in `module` by a recorder that returns the stub."""
    built = []

    def fake_build(weight, vgg, heads):
        built.append((weight, vgg, heads))
        return StubPerceptual()

    monkeypatch.setattr(f"ldm.modules.losses.{module}.build_lpips", fake_build)
    return built


def _layout(d: nn.Module) -> list:
    return [(type(m).__name__, tuple(p.shape for p in m.parameters())) for m in d.modules()]


def _inputs(size: int = 32):
    g = torch.Generator().manual_seed(0)
    last = nn.Conv2d(4, 3, 3, padding=1)
    h = torch.randn(2, 4, size, size, generator=g)
    x = torch.rand(2, 3, size, size, generator=g) * 2 - 1
    post = DiagonalGaussianDistribution(torch.randn(2, 4, 4, 4, generator=g))
    return x, last(h), post, last.weight


def _grad_norm(y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.autograd.grad(y, w, retain_graph=True)[0].norm()


# --- gan.py


def test_adopt_weight_switches_at_the_threshold() -> None:
    assert adopt_weight(2.0, 0) == 2.0  # default threshold 0
    assert adopt_weight(2.0, 4, 5) == 0.0  # default value 0 before the threshold
    assert adopt_weight(2.0, 5, 5) == 2.0
    assert adopt_weight(2.0, 4, 5, value=0.3) == 0.3


def test_adaptive_weight_on_a_hand_made_graph() -> None:
    """x_rec = w (elementwise, h = 1): grad_w (a . x_rec) = a, so lambda = d_w ||a|| / (||b|| + 1e-4)
    clamped to [0, 1e4]; the graph stays usable for the backward of the total loss."""
    w = torch.ones(2, 2, requires_grad=True)

    def run(a: list[float], b: list[float], d_w: float) -> torch.Tensor:
        xrec = w * torch.ones(2, 2)
        nll = (torch.tensor(a).view(2, 2) * xrec).sum()
        g = (torch.tensor(b).view(2, 2) * xrec).sum()
        lam = adaptive_weight(nll, g, w, d_w)
        assert not lam.requires_grad and lam.ndim == 0
        (nll + g).backward()  # both autograd.grad calls kept the shared graph
        return lam

    assert run([3, 4, 0, 0], [0.6, 0.8, 0, 0], 0.5).item() == pytest.approx(0.5 * 5 / 1.0001)
    assert run([0.3, 0.4, 0, 0], [0.6, 0.8, 0, 0], 1.0).item() == pytest.approx(0.5 / 1.0001)
    assert run([0.3, 0.4, 0, 0], [0, 0, 0, 0], 1.0).item() == pytest.approx(5000.0)
    assert run([3, 4, 0, 0], [0, 0, 0, 0], 2.0).item() == pytest.approx(2e4)  # clamped at 1e4


def test_adaptive_weight_is_zero_without_a_graph() -> None:
    w = torch.ones(2, requires_grad=True)
    nll, g = (3 * w).sum(), (w * w).sum()
    assert adaptive_weight(nll, g, None, 1.0).item() == 0.0
    assert adaptive_weight(nll.detach(), g, w, 1.0).item() == 0.0
    with torch.no_grad():
        assert adaptive_weight(nll, g, w, 1.0).item() == 0.0
    assert adaptive_weight(nll, g, w, 1.0).item() > 0  # the same call with the graph
    meta = torch.empty((), device="meta")
    assert adaptive_weight(meta, meta, None, 1.0).device.type == "meta"


# --- contperceptual.py (KL)


@pytest.mark.parametrize("disc_loss", ["hinge", "vanilla"])
def test_kl_loss_every_term_with_weights_away_from_one(disc_loss: str, monkeypatch) -> None:
    """CompVis contperceptual: rec = w_pix |x - x_rec|^2 + w_p P(x, x_rec); nll = rec / e^s + s;
    total = sum(weights * nll) / B + w_kl sum(KL) / B + lambda f g, lambda from the unweighted nll;
    discriminator step f * D-loss."""
    built = _record_build(monkeypatch, "contperceptual")
    x, xrec, post, w = _inputs()
    loss = LPIPSWithDiscriminator(
        disc_start=3,
        logvar_init=0.5,
        kl_weight=0.1,
        pixelloss_weight=2.0,
        disc_factor=0.5,
        disc_weight=0.7,
        perceptual_weight=0.25,
        pixel_loss="l2",
        disc_loss=disc_loss,
        disc_num_layers=2,
        use_actnorm=True,
        vgg_weights="v.pth",
        lpips_weights="h.pth",
    )
    assert built == [(0.25, "v.pth", "h.pth")]
    assert _layout(loss.discriminator) == _layout(NLayerDiscriminator(3, 64, 2, True))
    weights = torch.tensor([0.2, 3.0]).view(2, 1, 1, 1)
    total, log = loss(x, xrec, post, 0, global_step=3, last_layer=w, weights=weights)

    p = (x - xrec).pow(3).mean(dim=(1, 2, 3), keepdim=True)
    rec = 2.0 * (xrec - x) ** 2 + 0.25 * p
    nll = rec / math.exp(0.5) + 0.5
    nll_mean = nll.sum() / 2
    kl = (0.5 * (post.mean**2 + post.var - 1 - post.logvar).sum(dim=(1, 2, 3))).sum() / 2
    g = -loss.discriminator(xrec).mean()
    lam = 0.7 * _grad_norm(nll_mean, w) / (_grad_norm(g, w) + 1e-4)
    expect = (weights * nll).sum() / 2 + 0.1 * kl + lam * 0.5 * g
    torch.testing.assert_close(total, expect, rtol=1e-5, atol=1e-5)
    want = {
        "total_loss": expect,
        "logvar": torch.tensor(0.5),
        "kl_loss": kl,
        "nll_loss": nll_mean,
        "rec_loss": rec.mean(),
        "d_weight": lam,
        "disc_factor": torch.tensor(0.5),
        "g_loss": g,
    }
    assert set(log) == {f"train/{k}" for k in want}
    for k, v in want.items():
        torch.testing.assert_close(log[f"train/{k}"], v.detach(), rtol=1e-5, atol=1e-5)

    d_loss, dlog = loss(x, xrec, post, 1, global_step=3, split="val")
    real, fake = loss.discriminator(x).detach(), loss.discriminator(xrec).detach()
    ref = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}[disc_loss]
    torch.testing.assert_close(d_loss, 0.5 * ref(real, fake))
    assert set(dlog) == {"val/disc_loss", "val/logits_real", "val/logits_fake"}
    torch.testing.assert_close(dlog["val/disc_loss"], d_loss.detach())
    torch.testing.assert_close(dlog["val/logits_real"], real.mean())
    torch.testing.assert_close(dlog["val/logits_fake"], fake.mean())


def test_kl_loss_defaults_are_compvis(monkeypatch) -> None:
    """Defaults: logvar 0, KL weight 1, L1 pixels of weight 1, LPIPS of weight 1 (built from the
    default file locations), hinge, disc_factor = disc_weight = 1, the 3-layer BatchNorm PatchGAN
    on 3 channels."""
    built = _record_build(monkeypatch, "contperceptual")
    loss = LPIPSWithDiscriminator(disc_start=0)
    assert built == [(1.0, None, None)]
    assert loss.disc_loss is hinge_d_loss
    assert _layout(loss.discriminator) == _layout(NLayerDiscriminator(3, 64, 3, False))
    x, xrec, post, w = _inputs()
    total, log = loss(x, xrec, post, 0, global_step=0, last_layer=w)
    rec = (xrec - x).abs() + (x - xrec).pow(3).mean(dim=(1, 2, 3), keepdim=True)
    nll = rec.sum() / 2
    g = -loss.discriminator(xrec).mean()
    lam = _grad_norm(nll, w) / (_grad_norm(g, w) + 1e-4)
    expect = nll + post.kl().sum() / 2 + lam * g
    torch.testing.assert_close(total, expect, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(log["train/d_weight"], lam.detach(), rtol=1e-5, atol=1e-6)
    d_loss, _ = loss(x, xrec, post, 1, global_step=0)
    real, fake = loss.discriminator(x).detach(), loss.discriminator(xrec).detach()
    torch.testing.assert_close(d_loss, hinge_d_loss(real, fake))


def test_kl_loss_on_the_meta_device_keeps_its_zeros_there() -> None:
    loss = LPIPSWithDiscriminator(disc_start=10, perceptual_weight=0.0)
    x = torch.empty(2, 3, 32, 32, device="meta")
    post = DiagonalGaussianDistribution(torch.empty(2, 8, 4, 4, device="meta"))
    _, log = loss(x, x, post, 0, global_step=0)
    assert log["train/g_loss"].device.type == "meta"
    assert log["train/d_weight"].device.type == "meta"


def test_conditional_discriminator_sees_the_condition_channels() -> None:
    x, xrec, post, w = _inputs()
    cond = torch.rand(2, 1, 32, 32)
    loss = LPIPSWithDiscriminator(
        disc_start=0, perceptual_weight=0.0, disc_conditional=True, disc_in_channels=4
    )
    _, log = loss(x, xrec, post, 0, global_step=0, last_layer=w, cond=cond)
    torch.testing.assert_close(
        log["train/g_loss"], -loss.discriminator(torch.cat([xrec, cond], 1)).mean().detach()
    )
    _, dlog = loss(x, xrec, post, 1, global_step=0, cond=cond)
    torch.testing.assert_close(
        dlog["train/logits_real"], loss.discriminator(torch.cat([x, cond], 1)).mean().detach()
    )
    with pytest.raises(ValueError, match="needs `cond`"):
        loss(x, xrec, post, 1, global_step=0)
    plain = LPIPSWithDiscriminator(disc_start=0, perceptual_weight=0.0, disc_in_channels=4)
    with pytest.raises(ValueError, match="disc_conditional=False"):
        plain(x, xrec, post, 1, global_step=0, cond=cond)
    # the VQ loss (taming) concatenates a given cond even when disc_conditional is False
    vq = VQLPIPSWithDiscriminator(disc_start=0, perceptual_weight=0.0, disc_in_channels=4)
    _, vlog = vq(None, x, xrec, 1, global_step=0, cond=cond)
    torch.testing.assert_close(
        vlog["train/logits_fake"], vq.discriminator(torch.cat([xrec, cond], 1)).mean().detach()
    )
    _, glog = vq(None, x, xrec, 0, global_step=0, last_layer=w, cond=cond)
    torch.testing.assert_close(
        glog["train/g_loss"], -vq.discriminator(torch.cat([xrec, cond], 1)).mean().detach()
    )
    vq_cond = VQLPIPSWithDiscriminator(
        disc_start=0, perceptual_weight=0.0, disc_conditional=True, disc_in_channels=4
    )
    with pytest.raises(ValueError, match="needs `cond`"):
        vq_cond(None, x, xrec, 1, global_step=0)


# --- vqperceptual.py


def test_vq_loss_every_term_with_weights_away_from_one(monkeypatch) -> None:
    """taming vqperceptual: total = mean(rec) + lambda f g + w_q mean(q); logs p_loss, perplexity
    exp(H) of the code histogram and the number of codes used."""
    built = _record_build(monkeypatch, "vqperceptual")
    x, xrec, _, w = _inputs()
    loss = VQLPIPSWithDiscriminator(
        disc_start=2,
        codebook_weight=3.0,
        pixelloss_weight=0.5,
        disc_factor=0.25,
        disc_weight=0.6,
        perceptual_weight=2.0,
        disc_ndf=8,
        n_classes=8,
        pixel_loss="l2",
        disc_num_layers=2,
        use_actnorm=True,
        vgg_weights="v.pth",
        lpips_weights="h.pth",
    )
    assert built == [(2.0, "v.pth", "h.pth")]
    assert _layout(loss.discriminator) == _layout(NLayerDiscriminator(3, 8, 2, True))
    q = torch.tensor([0.2, 0.4])
    idx = torch.tensor([[0, 1], [1, 5]])
    total, log = loss(q, x, xrec, 0, global_step=2, last_layer=w, predicted_indices=idx)
    p = (x - xrec).pow(3).mean(dim=(1, 2, 3), keepdim=True)
    rec = 0.5 * (xrec - x) ** 2 + 2.0 * p
    nll = rec.mean()
    g = -loss.discriminator(xrec).mean()
    lam = 0.6 * _grad_norm(nll, w) / (_grad_norm(g, w) + 1e-4)
    expect = nll + lam * 0.25 * g + 3.0 * 0.3
    torch.testing.assert_close(total, expect, rtol=1e-5, atol=1e-5)
    want = {
        "total_loss": expect,
        "quant_loss": torch.tensor(0.3),
        "nll_loss": nll,
        "rec_loss": rec.mean(),
        "p_loss": p.mean(),
        "d_weight": lam,
        "disc_factor": torch.tensor(0.25),
        "g_loss": g,
        "perplexity": torch.tensor(2 * math.sqrt(2)),  # p = (1/4, 1/2, 1/4): exp(1.5 ln 2)
        "cluster_usage": torch.tensor(3.0),
    }
    assert set(log) == {f"train/{k}" for k in want}
    for k, v in want.items():
        torch.testing.assert_close(log[f"train/{k}"], v.detach(), rtol=1e-5, atol=1e-5)

    d_loss, dlog = loss(q, x, xrec, 1, global_step=2)
    real, fake = loss.discriminator(x).detach(), loss.discriminator(xrec).detach()
    torch.testing.assert_close(d_loss, 0.25 * hinge_d_loss(real, fake))
    torch.testing.assert_close(dlog["train/disc_loss"], d_loss.detach())
    torch.testing.assert_close(dlog["train/logits_real"], real.mean())
    torch.testing.assert_close(dlog["train/logits_fake"], fake.mean())


def test_vq_loss_defaults_without_codebook_loss_or_class_count(monkeypatch) -> None:
    built = _record_build(monkeypatch, "vqperceptual")
    loss = VQLPIPSWithDiscriminator(disc_start=1)
    assert built == [(1.0, None, None)] and loss.disc_loss is hinge_d_loss
    assert _layout(loss.discriminator) == _layout(NLayerDiscriminator(3, 64, 3, False))
    x, xrec, _, w = _inputs()
    idx = torch.tensor([0, 1, 1])
    total, log = loss(None, x, xrec, 0, global_step=1, last_layer=w, predicted_indices=idx)
    rec = (xrec - x).abs() + (x - xrec).pow(3).mean(dim=(1, 2, 3), keepdim=True)
    g = -loss.discriminator(xrec).mean()
    lam = _grad_norm(rec.mean(), w) / (_grad_norm(g, w) + 1e-4)
    torch.testing.assert_close(total, rec.mean() + lam * g, rtol=1e-5, atol=1e-5)
    assert log["train/quant_loss"].item() == 0.0
    assert "train/perplexity" not in log and "train/cluster_usage" not in log
    q = torch.tensor(0.4)  # default codebook weight 1
    total_q, _ = loss(q, x, xrec, 0, global_step=1, last_layer=w)
    torch.testing.assert_close(total_q, total + 0.4, rtol=1e-5, atol=1e-5)
    d_loss, _ = loss(None, x, xrec, 1, global_step=0)  # before disc_start: f = 0
    assert d_loss.item() == 0.0
    meta = torch.empty(2, 3, 32, 32, device="meta")
    _, mlog = loss(None, meta, meta, 0, global_step=0)
    assert mlog["train/quant_loss"].device.type == "meta"
    assert mlog["train/g_loss"].device.type == "meta"


# --- perceptual.py


def test_reconstruction_loss_pixel_terms_and_perceptual_term() -> None:
    x = torch.tensor([0.0, 1.0, -1.0, 0.5]).view(1, 1, 2, 2)
    y = torch.tensor([0.5, -1.0, -1.0, 0.0]).view(1, 1, 2, 2)
    rec, p = reconstruction_loss(x, y, None, 1.0)  # defaults: l1, weight 1
    assert rec.flatten().tolist() == [0.5, 2.0, 0.0, 0.5] and p.item() == 0.0
    rec, _ = reconstruction_loss(x, y, None, 1.0, "l2", 2.0)
    assert rec.flatten().tolist() == [0.5, 8.0, 0.0, 0.5]
    rec, p = reconstruction_loss(x, y, StubPerceptual(), 4.0, "l1", 1.0)
    d3 = ((0.0 - 0.5) ** 3 + 2.0**3 + 0.0 + 0.5**3) / 4  # mean (x - y)^3 = 2.0
    assert p.flatten().tolist() == [d3]
    assert rec.flatten().tolist() == [0.5 + 4 * d3, 2.0 + 4 * d3, 4 * d3, 0.5 + 4 * d3]
    meta = torch.empty(1, 3, 4, 4, device="meta")
    assert reconstruction_loss(meta, meta, None, 0.0)[1].device.type == "meta"


def test_build_lpips_only_for_a_positive_weight(monkeypatch) -> None:
    made = []

    class Fake(nn.Module):
        def __init__(self, vgg_weights=None, lpips_weights=None) -> None:
            super().__init__()
            made.append((vgg_weights, lpips_weights))

    monkeypatch.setattr("ldm.modules.losses.perceptual.LPIPS", Fake)
    assert build_lpips(0.0) is None and build_lpips(-1.0) is None and made == []
    net = build_lpips(0.5, "vgg.pth", "heads.pth")
    assert isinstance(net, Fake) and not net.training
    assert made == [("vgg.pth", "heads.pth")]


# --- discriminator.py


def _taming_nlayer(input_nc: int, ndf: int, n_layers: int, actnorm: bool) -> nn.Sequential:
    """taming.modules.discriminator.model.NLayerDiscriminator written out."""
    norm = ActNorm if actnorm else nn.BatchNorm2d
    seq = [nn.Conv2d(input_nc, ndf, 4, 2, 1), nn.LeakyReLU(0.2)]
    mult = 1
    for n in range(1, n_layers):
        prev, mult = mult, min(2**n, 8)
        seq += [nn.Conv2d(ndf * prev, ndf * mult, 4, 2, 1, bias=actnorm), norm(ndf * mult)]
        seq += [nn.LeakyReLU(0.2)]
    prev, mult = mult, min(2**n_layers, 8)
    seq += [nn.Conv2d(ndf * prev, ndf * mult, 4, 1, 1, bias=actnorm), norm(ndf * mult)]
    seq += [nn.LeakyReLU(0.2), nn.Conv2d(ndf * mult, 1, 4, 1, 1)]
    return nn.Sequential(*seq)


@pytest.mark.parametrize(
    "input_nc,ndf,n_layers,actnorm,size",
    [(3, 8, 3, False, 32), (4, 2, 4, True, 64), (1, 1, 5, False, 128), (3, 4, 2, False, 16)],
)
def test_patchgan_layout_is_taming(input_nc, ndf, n_layers, actnorm, size) -> None:
    ours = NLayerDiscriminator(input_nc, ndf, n_layers, actnorm).eval()
    ref = _taming_nlayer(input_nc, ndf, n_layers, actnorm).eval()
    ref.load_state_dict({k.removeprefix("main."): v for k, v in ours.state_dict().items()})
    assert [type(m) for m in ours.main] == [type(m) for m in ref]
    x = torch.randn(2, input_nc, size, size)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x))


def test_nlayer_defaults() -> None:
    d = NLayerDiscriminator()
    ref = _taming_nlayer(3, 64, 3, False)
    assert [(k, v.shape) for k, v in d.state_dict().items()] == [
        ("main." + k, v.shape) for k, v in ref.state_dict().items()
    ]


def test_actnorm_initializes_from_the_first_training_batch() -> None:
    x = torch.tensor([[1.0, 2.0], [3.0, 6.0]]).view(2, 2, 1, 1)  # channel 0: 1, 3; channel 1: 2, 6
    an = ActNorm(2)
    out = an(x)
    # mean (2, 4), unbiased std (sqrt 2, sqrt 8)
    torch.testing.assert_close(an.loc.flatten(), torch.tensor([-2.0, -4.0]))
    torch.testing.assert_close(an.scale.flatten(), 1 / (torch.tensor([2.0, 8.0]).sqrt() + 1e-6))
    a, b = 1 / (2**0.5 + 1e-6), 2 / (8**0.5 + 1e-6)  # (x - mean) / (std + 1e-6)
    torch.testing.assert_close(out.flatten(), torch.tensor([-a, -b, a, b]))
    assert an.initialized.item() == 1
    assert ActNorm(2).state_dict()["initialized"].dtype == torch.uint8  # taming's buffer
    again = an(torch.zeros(2, 2, 1, 1))  # no second init: the same affine map
    torch.testing.assert_close(again.flatten(), (an.scale * an.loc).detach().flatten().repeat(2))
    fresh = ActNorm(2).eval()  # evaluation never initializes
    torch.testing.assert_close(fresh(x), x)
    assert fresh.initialized.item() == 0


def test_weights_init_is_dcgan() -> None:
    torch.manual_seed(0)
    d = NLayerDiscriminator(3, 64, 3).apply(weights_init)
    convs = [m for m in d.main if isinstance(m, nn.Conv2d)]
    norms = [m for m in d.main if isinstance(m, nn.BatchNorm2d)]
    for c in convs[1:4]:  # >= 131k weights each
        assert c.weight.mean().abs().item() < 1e-3
        assert c.weight.std().item() == pytest.approx(0.02, rel=0.02)
    bn_w = torch.cat([n.weight.detach() for n in norms])  # 896 weights
    assert bn_w.mean().item() == pytest.approx(1.0, abs=0.003)
    assert bn_w.std().item() == pytest.approx(0.02, rel=0.1)
    assert all(torch.count_nonzero(n.bias) == 0 for n in norms)
    kl = LPIPSWithDiscriminator(disc_start=0, perceptual_weight=0.0)
    assert kl.discriminator.main[2].weight.std().item() == pytest.approx(0.02, rel=0.02)


# --- lpips.py (weight lookup; the value itself: tests/modules/test_losses.py)


def test_weight_files_are_found_argument_first_then_environment_then_hub(
    monkeypatch, tmp_path
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    monkeypatch.delenv("LDM_VGG16_WEIGHTS", raising=False)
    monkeypatch.delenv("LDM_LPIPS_WEIGHTS", raising=False)
    monkeypatch.setattr("ldm.modules.losses.lpips._lpips_package_heads", lambda: None)
    hub = tmp_path / "th" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    files = {}
    for name in ("arg_vgg", "env_vgg", "arg_heads", "env_heads"):
        files[name] = tmp_path / f"{name}.pth"
        files[name].write_bytes(b"x")
    (hub / "vgg16-397923af.pth").write_bytes(b"x")
    (hub / "lpips_vgg_v0.1.pth").write_bytes(b"x")
    monkeypatch.setenv("LDM_VGG16_WEIGHTS", str(files["env_vgg"]))
    monkeypatch.setenv("LDM_LPIPS_WEIGHTS", str(files["env_heads"]))
    assert lpips_mod.find_vgg16_weights(files["arg_vgg"]) == files["arg_vgg"]
    assert lpips_mod.find_lpips_heads(files["arg_heads"]) == files["arg_heads"]
    missing = tmp_path / "nope.pth"
    assert lpips_mod.find_vgg16_weights(missing) == files["env_vgg"]
    assert lpips_mod.find_lpips_heads(missing) == files["env_heads"]
    monkeypatch.delenv("LDM_VGG16_WEIGHTS")
    monkeypatch.delenv("LDM_LPIPS_WEIGHTS")
    assert lpips_mod.find_vgg16_weights() == hub / "vgg16-397923af.pth"
    assert lpips_mod.find_lpips_heads() == hub / "lpips_vgg_v0.1.pth"
    (hub / "lpips_vgg_v0.1.pth").unlink()
    monkeypatch.setattr("ldm.modules.losses.lpips._lpips_package_heads", lambda: files["arg_heads"])
    assert lpips_mod.find_lpips_heads() == files["arg_heads"]


def test_lpips_eq1_on_a_functional_vgg16() -> None:
    """Zhang et al. 2018 Eq. 1 with random weights (a fast twin of the torchvision-based test in
    test_losses.py): scale the input by LPIPS' shift (-0.030, -0.088, -0.188) and scale (0.458,
    0.448, 0.450), run VGG16 convs (3x3, pad 1) + ReLU + 2x2 max-pools, tap relu1_2 ... relu5_3
    (torchvision indices 3, 8, 15, 22, 29), unit-normalise over channels (eps 1e-10), weight the
    squared difference by w_l (1x1, no bias), average over space, sum the five layers."""
    with torch.device("meta"):
        lp = LPIPS(load_weights=False)
    lp.scaling_layer = lpips_mod.ScalingLayer()  # its constants, on the CPU
    g = torch.Generator().manual_seed(0)
    sd = {}
    for k, v in lp.state_dict().items():
        if k.startswith("net.") and k.endswith("weight"):
            sd[k] = torch.randn(v.shape, generator=g) * (2 / v[0].numel()) ** 0.5
        elif k.startswith("net."):
            sd[k] = 0.1 * torch.randn(v.shape, generator=g)
        elif k.startswith("lin"):
            sd[k] = torch.rand(v.shape, generator=g)
    lp.load_state_dict(sd, strict=False, assign=True)
    assert lp.weights_loaded
    conv = {int(k.split(".")[2]): k for k in sd if k.startswith("net.") and k.endswith("weight")}
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def taps(x: torch.Tensor) -> list[torch.Tensor]:
        h, i, out = (x - shift) / scale, 0, []
        for v in (
            64,
            64,
            "M",
            128,
            128,
            "M",
            256,
            256,
            256,
            "M",
            512,
            512,
            512,
            "M",
            512,
            512,
            512,
        ):
            if v == "M":
                h, i = F.max_pool2d(h, 2, 2), i + 1
                continue
            k = conv[i]
            h = F.relu(F.conv2d(h, sd[k], sd[k.replace("weight", "bias")], padding=1))
            i += 2
            if i in (4, 9, 16, 23, 30):
                out.append(h)
        return out

    x = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    y = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    expect = torch.zeros(2)
    with torch.no_grad():
        for n, (a, b) in enumerate(zip(taps(x), taps(y))):
            a = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            b = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            w = sd[f"lin{n}.model.1.weight"].view(1, -1, 1, 1)
            expect += (w * (a - b).pow(2)).sum(1).mean(dim=(1, 2))
        got = lp(x, y)
    assert got.shape == (2, 1, 1, 1)
    torch.testing.assert_close(got.flatten(), expect, rtol=1e-5, atol=1e-6)


def test_normalize_tensor_is_unit_length_with_eps_1e_10() -> None:
    """taming's normalize_tensor: x / (||x||_channels + 1e-10)."""
    x = torch.tensor([[3.0, 4.0], [3e-10, 4e-10], [0.0, 0.0]]).view(3, 2, 1, 1)
    out = lpips_mod._normalize(x).flatten().tolist()
    assert out[:2] == pytest.approx([0.6, 0.8])
    assert out[2:4] == pytest.approx([3 / 6, 4 / 6])  # ||x|| = 5e-10, + 1e-10
    assert out[4:] == [0.0, 0.0]


def test_lpips_package_heads_need_an_installed_package(monkeypatch) -> None:
    from importlib.machinery import ModuleSpec

    monkeypatch.setattr(lpips_mod.importlib.util, "find_spec", lambda name: None)
    assert lpips_mod._lpips_package_heads() is None
    module_only = ModuleSpec("lpips", None)  # a plain module: no package folder
    monkeypatch.setattr(lpips_mod.importlib.util, "find_spec", lambda name: module_only)
    assert lpips_mod._lpips_package_heads() is None


def test_lpips_loads_its_given_files_with_weights_only(monkeypatch, tmp_path) -> None:
    """The paths given are the ones read, and only as plain tensors: a pickle with another object
    is refused even where TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD would relax torch.load's default."""
    import pickle
    from fractions import Fraction

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    monkeypatch.delenv("LDM_VGG16_WEIGHTS", raising=False)
    monkeypatch.delenv("LDM_LPIPS_WEIGHTS", raising=False)
    monkeypatch.setattr("ldm.modules.losses.lpips._lpips_package_heads", lambda: None)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    torch.save({"features.0.weight": Fraction(1, 3)}, tmp_path / "vgg.pth")
    (tmp_path / "heads.pth").write_bytes(b"x")
    with torch.device("meta"):
        lp = LPIPS(load_weights=False)
    with pytest.raises(pickle.UnpicklingError):
        lp.load_pretrained(tmp_path / "vgg.pth", tmp_path / "heads.pth")


def test_lpips_heads_file_is_copied_into_the_heads_with_weights_only(monkeypatch, tmp_path) -> None:
    """The heads file fills w_l (also without dropout in front); it is read as tensors only."""
    import pickle
    from fractions import Fraction

    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with torch.device("meta"):
        lp = LPIPS(load_weights=False, use_dropout=False)
    for i, c in enumerate((64, 128, 256, 512, 512)):
        setattr(lp, f"lin{i}", lpips_mod.NetLinLayer(c, use_dropout=False))
    monkeypatch.setattr(lp.net, "load_torchvision", lambda state: None)
    torch.save({"features.0.weight": torch.zeros(1)}, tmp_path / "vgg.pth")
    heads = {
        f"lin{i}.model.1.weight": torch.full((1, c, 1, 1), i + 1.0)
        for i, c in enumerate((64, 128, 256, 512, 512))
    }
    torch.save(heads, tmp_path / "heads.pth")
    lp.load_pretrained(tmp_path / "vgg.pth", tmp_path / "heads.pth")
    assert lp.weights_loaded is True
    for i in range(5):
        assert torch.equal(
            lp.get_submodule(f"lin{i}").model[0].weight, heads[f"lin{i}.model.1.weight"]
        )
    torch.save({**heads, "note": Fraction(1, 3)}, tmp_path / "heads.pth")
    with pytest.raises(pickle.UnpicklingError):
        lp.load_pretrained(tmp_path / "vgg.pth", tmp_path / "heads.pth")


def test_lpips_construction_loads_the_given_paths_or_keeps_the_error(monkeypatch) -> None:
    calls = []

    def fake_load(self, vgg=None, heads=None):
        calls.append((vgg, heads))
        raise lpips_mod.LPIPSWeightsMissing("no files")

    monkeypatch.setattr(LPIPS, "load_pretrained", fake_load)
    lp = LPIPS(vgg_weights="v.pth", lpips_weights="h.pth")
    assert calls == [("v.pth", "h.pth")]
    assert isinstance(lp._missing, lpips_mod.LPIPSWeightsMissing)


def test_lpips_package_heads_location() -> None:
    spec = importlib.util.find_spec("lpips")
    if spec is None:
        assert lpips_mod._lpips_package_heads() is None
        return
    pkg = Path(spec.origin).parent
    assert lpips_mod._lpips_package_heads() == pkg / "weights" / "v0.1" / "vgg.pth"


def test_lpips_layout_keys_and_frozen_eval_mode() -> None:
    """taming's key names (`lin{i}.model.1.weight` behind a dropout, `net.slice{k}.{i}`), frozen,
    in eval mode; building on the meta device does not look for files."""
    with torch.device("meta"):
        lp = LPIPS()
    assert lp.weights_loaded is False and lp._missing is None
    assert not lp.training and not any(p.requires_grad for p in lp.parameters())
    keys = set(lp.state_dict())
    heads = {f"lin{i}.model.1.weight" for i in range(5)}
    assert heads <= keys
    assert {"net.slice1.0.weight", "net.slice5.28.bias", "scaling_layer.shift"} <= keys
    assert [tuple(lp.state_dict()[f"lin{i}.model.1.weight"].shape) for i in range(5)] == [
        (1, c, 1, 1) for c in (64, 128, 256, 512, 512)
    ]
    with torch.device("meta"):
        plain = LPIPS(use_dropout=False)
    assert {f"lin{i}.model.0.weight" for i in range(5)} <= set(plain.state_dict())


def test_lpips_checkpoint_needs_both_trunk_and_heads_to_count_as_loaded() -> None:
    with torch.device("meta"):
        lp = LPIPS(load_weights=False)
        src = LPIPS(load_weights=False).state_dict()
    lp.load_state_dict({k: v for k, v in src.items() if not k.startswith("net.")}, strict=False)
    assert not lp.weights_loaded
    lp.load_state_dict({k: v for k, v in src.items() if not k.startswith("lin0")}, strict=False)
    assert not lp.weights_loaded
    lp.load_state_dict(src, assign=True)
    assert lp.weights_loaded


def test_lpips_built_without_weights_loads_its_own_paths_at_the_first_call() -> None:
    with torch.device("meta"):
        lp = LPIPS(vgg_weights="v.pth", lpips_weights="h.pth", load_weights=False)
    calls = []

    class Loaded(Exception):
        pass

    def fake_load(vgg=None, heads=None):
        calls.append((vgg, heads))
        raise Loaded

    lp.load_pretrained = fake_load
    with pytest.raises(Loaded):
        lp(torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 16, 16))
    assert calls == [("v.pth", "h.pth")]


def test_lpips_weight_files_with_the_wrong_keys_are_refused(tmp_path) -> None:
    with torch.device("meta"):
        lp = LPIPS(load_weights=False)
    with pytest.raises(ValueError, match="lacks"):
        lp.net.load_torchvision({"classifier.0.weight": torch.zeros(1)})  # no features.N.*
