"""Autoencoder losses: LPIPS (parity with the `lpips` package, local weights only), GAN switches,
adaptive weight, and construction from the CompVis target paths."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from ldm.modules.distributions import DiagonalGaussianDistribution
from ldm.modules.losses import (
    LPIPS,
    LPIPSWeightsMissing,
    LPIPSWithDiscriminator,
    VQLPIPSWithDiscriminator,
)
from ldm.modules.losses.gan import hinge_d_loss, vanilla_d_loss
from ldm.modules.losses.lpips import _SLICES
from ldm.util import instantiate_from_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture
def no_lpips_files(monkeypatch, tmp_path):
    """An environment where no LPIPS weight file can be found."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv("LDM_VGG16_WEIGHTS", raising=False)
    monkeypatch.delenv("LDM_LPIPS_WEIGHTS", raising=False)
    monkeypatch.setattr("ldm.modules.losses.lpips._lpips_package_heads", lambda: None)


def _fake_vgg_file(path: Path) -> Path:
    """A torchvision-format VGG16 `features.N.*` file with random weights."""
    torch.manual_seed(3)
    sd = {}
    for k, v in LPIPS(load_weights=False).net.state_dict().items():
        _, idx, p = k.split(".")
        sd[f"features.{idx}.{p}"] = torch.randn_like(v) * 0.05
    torch.save(sd, path)
    return path


@pytest.mark.slow  # `import lpips` alone takes ~10 s (it imports scipy, skimage, ...)
def test_lpips_matches_lpips_package(tmp_path, monkeypatch) -> None:
    lpips_pkg = pytest.importorskip("lpips")
    import lpips.pretrained_networks as pn
    from torchvision.models.vgg import cfgs, make_layers

    # the reference builds torchvision's whole vgg16 (with a 102M-parameter classifier it never
    # uses) for `.features`; hand it the same `features` trunk alone to keep the test fast
    monkeypatch.setattr(
        pn.tv, "vgg16", lambda **kw: SimpleNamespace(features=make_layers(cfgs["D"]))
    )
    ref = lpips_pkg.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False).eval()
    # export the reference's (random) VGG trunk in torchvision's layout, then load ours from files
    vgg = {}
    for k, v in ref.net.state_dict().items():  # slice{s}.{idx}.{p}
        _, idx, p = k.split(".")
        vgg[f"features.{idx}.{p}"] = v
    torch.save(vgg, tmp_path / "vgg16-397923af.pth")
    heads = {f"lin{i}.model.1.weight": ref.lins[i].model[1].weight.detach() for i in range(5)}
    torch.save(heads, tmp_path / "vgg.pth")
    ours = LPIPS(vgg_weights=tmp_path / "vgg16-397923af.pth", lpips_weights=tmp_path / "vgg.pth")
    assert ours.weights_loaded
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        d_ours, d_ref = ours(x, y), ref(x, y)
    assert d_ours.shape == (2, 1, 1, 1)
    torch.testing.assert_close(d_ours, d_ref, atol=1e-5, rtol=1e-4)
    assert torch.all(ours(x, x) == 0) and torch.all(d_ours > 0)
    assert not any(p.requires_grad for p in ours.parameters())


def test_lpips_without_files_names_the_file_and_the_way_out(no_lpips_files) -> None:
    lp = LPIPS()  # building works offline ...
    assert not lp.weights_loaded
    with pytest.raises(LPIPSWeightsMissing) as err:  # ... running does not
        lp(torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 16, 16))
    msg = str(err.value)
    assert "vgg16-397923af.pth" in msg and "download.pytorch.org" in msg
    assert "perceptual_weight: 0" in msg and "LDM_VGG16_WEIGHTS" in msg


def test_lpips_weights_from_a_checkpoint_state_dict_count_as_loaded(no_lpips_files) -> None:
    src = LPIPS(load_weights=False)
    dst = LPIPS()
    dst.load_state_dict(src.state_dict())
    assert dst.weights_loaded
    x = torch.rand(1, 3, 16, 16)
    assert dst(x, x).item() == 0.0


def test_lpips_vgg_slices_follow_torchvision_indices(tmp_path, monkeypatch) -> None:
    vgg_file = _fake_vgg_file(tmp_path / "vgg16.pth")
    heads = {
        f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1)
        for i, c in enumerate((64, 128, 256, 512, 512))
    }
    torch.save(heads, tmp_path / "heads.pth")
    monkeypatch.setenv("LDM_VGG16_WEIGHTS", str(vgg_file))
    monkeypatch.setenv("LDM_LPIPS_WEIGHTS", str(tmp_path / "heads.pth"))
    lp = LPIPS()
    sd = torch.load(vgg_file)
    a, b = _SLICES[2]
    torch.testing.assert_close(
        lp.net.slice3.get_submodule(str(b - 2)).weight, sd[f"features.{b - 2}.weight"]
    )
    torch.testing.assert_close(lp.lin4.model[1].weight, heads["lin4.model.1.weight"])


def test_lpips_value_is_eq1_on_torchvision_vgg16_features(tmp_path, monkeypatch) -> None:
    """Zhang et al. 2018, Eq. 1 written out on torchvision's own VGG16: unit-normalise relu1_2,
    relu2_2, relu3_3, relu4_3, relu5_3 (indices 3, 8, 15, 22, 29) of both images after the LPIPS
    input scaling, square the difference, weight channels by w_l, average space, sum layers."""
    from torchvision.models.vgg import cfgs, make_layers

    vgg_file = _fake_vgg_file(tmp_path / "vgg16.pth")
    g = torch.Generator().manual_seed(5)
    heads = {
        f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1, generator=g)
        for i, c in enumerate((64, 128, 256, 512, 512))
    }
    torch.save(heads, tmp_path / "heads.pth")
    monkeypatch.setenv("LDM_VGG16_WEIGHTS", str(vgg_file))
    monkeypatch.setenv("LDM_LPIPS_WEIGHTS", str(tmp_path / "heads.pth"))
    ours = LPIPS().eval()

    features = make_layers(cfgs["D"])  # torchvision's vgg16 trunk
    features.load_state_dict(
        {k.removeprefix("features."): v for k, v in torch.load(vgg_file).items()}
    )
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def taps(x: torch.Tensor) -> list[torch.Tensor]:
        out, h = [], (x - shift) / scale
        for i, layer in enumerate(features[:30]):  # the last max-pool is not used
            h = layer(h)
            if i in (3, 8, 15, 22, 29):
                out.append(h)
        return out

    x = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    y = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    with torch.no_grad():
        expect = torch.zeros(2)
        for i, (a, b) in enumerate(zip(taps(x), taps(y))):
            a = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            b = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            w = heads[f"lin{i}.model.1.weight"].view(1, -1, 1, 1)
            expect += (w * (a - b).pow(2)).sum(1).mean(dim=(1, 2))
        got = ours(x, y)
    assert got.shape == (2, 1, 1, 1)
    torch.testing.assert_close(got.flatten(), expect, rtol=1e-5, atol=1e-6)
    assert torch.count_nonzero(ours(x, x)) == 0  # d(x, x) = 0


def test_perceptual_weight_zero_needs_no_files(no_lpips_files) -> None:
    loss = LPIPSWithDiscriminator(disc_start=0, perceptual_weight=0.0)
    assert loss.perceptual_loss is None
    assert not any(k.startswith("perceptual_loss") for k in loss.state_dict())


def _kl_inputs(requires_grad: bool = True):
    torch.manual_seed(0)
    last = torch.nn.Conv2d(8, 3, 3, padding=1)
    h = torch.randn(2, 8, 32, 32)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    xrec = last(h)
    post = DiagonalGaussianDistribution(torch.randn(2, 8, 4, 4))
    return x, xrec, post, last.weight


def test_disc_inactive_before_disc_start_and_active_after() -> None:
    loss = LPIPSWithDiscriminator(disc_start=100, perceptual_weight=0.0, kl_weight=1e-3)
    x, xrec, post, w = _kl_inputs()
    total, log = loss(x, xrec, post, 0, global_step=99, last_layer=w)
    expected = (xrec - x).abs().sum() / 2 + 1e-3 * post.kl().sum() / 2  # logvar = 0
    torch.testing.assert_close(total, expected)
    assert log["train/disc_factor"] == 0 and log["train/g_loss"] == 0
    d_loss, _ = loss(x, xrec, post, 1, global_step=99)
    assert d_loss.item() == 0.0
    assert not loss.disc_active(99) and loss.disc_active(100)

    total_on, log_on = loss(x, xrec, post, 0, global_step=100, last_layer=w)
    assert log_on["train/disc_factor"] == 1.0
    assert log_on["train/g_loss"] != 0
    d_on, _ = loss(x, xrec, post, 1, global_step=100)
    assert d_on.item() > 0
    assert not torch.allclose(total_on, total)


def test_adaptive_weight_is_finite_positive_and_the_gradient_ratio() -> None:
    loss = LPIPSWithDiscriminator(disc_start=0, perceptual_weight=0.0, disc_weight=0.5)
    x, xrec, post, w = _kl_inputs()
    _, log = loss(x, xrec, post, 0, global_step=0, last_layer=w)
    d_weight = log["train/d_weight"]
    assert torch.isfinite(d_weight) and d_weight > 0
    nll = (xrec - x).abs().sum() / 2
    g = -loss.discriminator(xrec).mean()
    gn = torch.autograd.grad(nll, w, retain_graph=True)[0].norm()
    gg = torch.autograd.grad(g, w, retain_graph=True)[0].norm()
    torch.testing.assert_close(d_weight, 0.5 * gn / (gg + 1e-4), rtol=1e-4, atol=1e-6)
    with torch.no_grad():  # evaluation: no graph, weight 0 instead of an error
        _, log_eval = loss(x, xrec.detach(), post, 0, global_step=0, last_layer=w, split="val")
    assert log_eval["val/d_weight"] == 0


def test_gan_losses() -> None:
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    torch.testing.assert_close(hinge_d_loss(real, fake), torch.tensor(0.5 * (0.25 + 0.5)))
    # softplus(u) = log(1 + e^u), by hand: 1/2 (mean softplus(-real) + mean softplus(fake))
    sp_real = (math.log1p(math.exp(-2.0)) + math.log1p(math.exp(-0.5))) / 2
    sp_fake = (math.log1p(math.exp(-2.0)) + math.log(2.0)) / 2
    torch.testing.assert_close(vanilla_d_loss(real, fake), torch.tensor(0.5 * (sp_real + sp_fake)))
    loss = LPIPSWithDiscriminator(disc_start=0, perceptual_weight=0.0, disc_loss="vanilla")
    assert loss.disc_loss is vanilla_d_loss


@pytest.mark.parametrize("kind", ["kl", "vq"])
def test_generator_loss_with_the_discriminator_on(kind: str) -> None:
    """VQGAN Eq. 7 / the KL loss: total = rec + lambda * (-E[D(x_rec)]) (+ kl_w * KL | + w * q);
    the discriminator step: hinge 1/2 (E[relu(1 - D(x))] + E[relu(1 + D(x_rec))])."""
    x, xrec, post, w = _kl_inputs()
    if kind == "kl":
        loss = LPIPSWithDiscriminator(disc_start=0, perceptual_weight=0.0, kl_weight=1e-3)
        total, log = loss(x, xrec, post, 0, global_step=5, last_layer=w)
        nll = (xrec - x).abs().sum() / 2  # logvar = 0: sum over pixels / batch
        rest = 1e-3 * post.kl().sum() / 2
    else:
        loss = VQLPIPSWithDiscriminator(disc_start=0, perceptual_weight=0.0, codebook_weight=2.0)
        q = torch.tensor(0.3)
        total, log = loss(q, x, xrec, 0, global_step=5, last_layer=w)
        nll = (xrec - x).abs().mean()
        rest = 2.0 * q
    with torch.no_grad():
        d_fake = loss.discriminator(xrec)
        d_real = loss.discriminator(x)
    g = -d_fake.mean()
    torch.testing.assert_close(log["train/g_loss"], g)
    lam = log["train/d_weight"]
    assert lam > 0
    torch.testing.assert_close(total, nll + rest + lam * g, rtol=1e-5, atol=1e-6)
    if kind == "kl":
        d_loss, _ = loss(x, xrec, post, 1, global_step=5)
    else:
        d_loss, _ = loss(q, x, xrec, 1, global_step=5)
    expect = 0.5 * ((1 - d_real).clamp_min(0).mean() + (1 + d_fake).clamp_min(0).mean())
    torch.testing.assert_close(d_loss, expect)


def test_vq_loss_terms() -> None:
    loss = VQLPIPSWithDiscriminator(
        disc_start=10, perceptual_weight=0.0, codebook_weight=2.0, n_classes=8
    )
    x, xrec, _, w = _kl_inputs()
    q = torch.tensor(0.3)
    total, log = loss(
        q, x, xrec, 0, global_step=0, last_layer=w, predicted_indices=torch.tensor([0, 1, 1, 5])
    )
    torch.testing.assert_close(total, (xrec - x).abs().mean() + 2.0 * q)
    assert log["train/cluster_usage"] == 3
    assert 1.0 < log["train/perplexity"] < 3.0


@pytest.mark.parametrize(
    "target",
    [
        "ldm.modules.losses.LPIPSWithDiscriminator",
        "ldm.modules.losses.contperceptual.LPIPSWithDiscriminator",
        "ldm.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
        "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
    ],
)
def test_losses_load_from_compvis_targets(target: str) -> None:
    loss = instantiate_from_config(
        {"target": target, "params": {"disc_start": 5, "perceptual_weight": 0}}
    )
    expected = VQLPIPSWithDiscriminator if "VQ" in target else LPIPSWithDiscriminator
    assert type(loss) is expected


@pytest.mark.parametrize("name", ["kl-f4", "kl-f8", "kl-f16", "kl-f32", "vq-f4", "vq-f8", "vq-f16"])
def test_compvis_autoencoder_configs_build_with_their_losses(name: str, no_lpips_files) -> None:
    cfg = OmegaConf.load(CONFIGS / "compvis" / f"{name}.yaml")
    with torch.device("meta"):
        model = instantiate_from_config(cfg.model)
    expected = VQLPIPSWithDiscriminator if name.startswith("vq") else LPIPSWithDiscriminator
    assert type(model.loss) is expected
    assert model.loss.perceptual_loss is not None  # LPIPS is part of the published losses
    assert {k.split(".")[1] for k in model.state_dict() if k.startswith("loss.")} >= {
        "perceptual_loss",
        "discriminator",
    }
