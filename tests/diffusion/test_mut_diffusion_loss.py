"""The diffusion training objective against hand-computed values (DDPM L_simple / L_vlb weights,
Min-SNR / truncated-SNR weighting, offset noise, input perturbation, learned log-variance, the
sigma-conditioned loss). Each expectation is written out here from the papers' formulas."""

from __future__ import annotations

import math

import pytest
import torch

from ldm.diffusion import losses
from ldm.diffusion.denoiser import DiscreteDenoiser, SigmaDenoiser
from ldm.diffusion.edm import SigmaTraining
from ldm.diffusion.objective import DiffusionLoss

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread is fastest

# a 3-step schedule small enough to do by hand: alpha = 1 - beta = (0.9, 0.8, 0.5),
# alpha_bar = (0.9, 0.72, 0.36), beta_tilde_t = beta_t (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t)
# = (0, 0.2 * 0.1 / 0.28, 0.5 * 0.28 / 0.64) = (0, 1/14, 7/32)
BETAS = torch.tensor([0.1, 0.2, 0.5], dtype=torch.float64)
AC = torch.tensor([0.9, 0.72, 0.36], dtype=torch.float64)
VAR = torch.tensor([0.0, 1 / 14, 7 / 32], dtype=torch.float64)


def test_elementwise_loss_by_hand() -> None:
    pred, target = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.5, 1.0, 0.5])
    assert losses.elementwise_loss(pred, target).tolist() == [0.25, 9.0, 0.0]  # default: l2
    assert losses.elementwise_loss(pred, target, "l2").tolist() == [0.25, 9.0, 0.0]
    assert losses.elementwise_loss(pred, target, "l1").tolist() == [0.5, 3.0, 0.0]
    with pytest.raises(ValueError, match="loss_type"):
        losses.elementwise_loss(pred, target, "huber")


def test_lvlb_weights_by_hand() -> None:
    """eps: beta^2 / (2 sigma^2 alpha (1 - abar)): t=1: 0.04 / (2/14 * 0.8 * 0.28) = 1.25,
    t=2: 0.25 / (7/16 * 0.5 * 0.64) = 25/14. x0: (beta sqrt(abar_prev) / (1 - abar))^2 / (2 sigma^2):
    t=1: 0.036 / 0.0784 * 7 = 45/14, t=2: 0.18 / 0.4096 / (7/16) = 1.0044642857.
    v: the eps weight times abar: 0.9, 9/14. w_0 := w_1 (sigma_0 = 0)."""
    w = {p: losses.lvlb_weights(BETAS, AC, VAR, p) for p in ("eps", "x0", "v")}
    for p in w:
        assert w[p].dtype == torch.float32
    torch.testing.assert_close(w["eps"], torch.tensor([1.25, 1.25, 25 / 14]))
    torch.testing.assert_close(w["x0"], torch.tensor([45 / 14, 45 / 14, 0.18 / 0.4096 * 16 / 7]))
    torch.testing.assert_close(w["v"], torch.tensor([0.9, 0.9, 9 / 14]))
    with pytest.raises(ValueError, match="parameterization"):
        losses.lvlb_weights(BETAS, AC, VAR, "score")


def test_lvlb_weights_short_and_zero_terminal_snr_schedules() -> None:
    # one step: sigma_0 = 0 makes the only weight infinite; there is no L_{t-1} term -> 0
    w1 = losses.lvlb_weights(BETAS[:1], AC[:1], VAR[:1], "eps")
    assert w1.tolist() == [0.0]
    # two steps: w_0 is copied from w_1 (not left at 1/0)
    w2 = losses.lvlb_weights(BETAS[:2], AC[:2], VAR[:2], "eps")
    torch.testing.assert_close(w2, torch.tensor([1.25, 1.25]))
    # zero terminal SNR (beta_T = 1, abar_T = 0, beta_tilde_T = 0.28): eps weight 1 / 0 -> 0,
    # v weight (1 / 0) * 0 -> 0, x0 weight (sqrt(0.72))^2 / (2 * 0.28) = 9/7 stays
    b = torch.tensor([0.1, 0.2, 1.0], dtype=torch.float64)
    ac = torch.tensor([0.9, 0.72, 0.0], dtype=torch.float64)
    var = torch.tensor([0.0, 1 / 14, 0.28], dtype=torch.float64)
    assert losses.lvlb_weights(b, ac, var, "eps")[2].item() == 0.0
    assert losses.lvlb_weights(b, ac, var, "v")[2].item() == 0.0
    assert losses.lvlb_weights(b, ac, var, "x0")[2].item() == pytest.approx(9 / 7, rel=1e-6)


def test_lvlb_weights_are_computed_in_float64_from_float32_schedules() -> None:
    """The weights of a float32 schedule equal the float64 formula rounded once to float32 (no
    float32 intermediate: x0's sqrt(abar_prev) and beta^2 lose bits there)."""
    b32 = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64).pow(2).float()
    b = b32.double()
    ac = torch.cumprod(1 - b, 0)
    ac32 = ac.float()
    ac = ac32.double()  # the float32 schedule values, exactly
    ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    var32 = (b * (1 - ac_prev) / (1 - ac)).float()
    var = var32.double()
    eps = b**2 / (2 * var * (1 - b) * (1 - ac))
    x0 = (b * ac_prev.sqrt() / (1 - ac)) ** 2 / (2 * var)
    for p, ref in (("eps", eps), ("x0", x0), ("v", eps * ac)):
        ref = ref.clone()
        ref[0] = ref[1]
        got = losses.lvlb_weights(b32, ac32, var32, p)
        assert torch.equal(got, ref.float()), p


def test_min_snr_weights_without_bounds_are_ones() -> None:
    snr = torch.tensor([0.01, 1.0, 100.0], dtype=torch.float64)
    for p in ("eps", "x0", "v"):
        w = losses.min_snr_weights(snr, None, p)
        assert w.dtype == torch.float64 and w.tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("strength", [0.3, 1.0])
def test_offset_noise_is_noise_plus_strength_times_a_per_channel_draw(strength: float) -> None:
    """noise + s * n with n ~ N(0, 1) of shape [B, C, 1, ..., 1] from the given generator, in the
    noise's dtype (a 5-D video latent here)."""
    noise = torch.randn(2, 3, 2, 4, 4, dtype=torch.float64)
    torch.manual_seed(123)  # the global RNG must not be used
    out = losses.offset_noise(noise, strength, torch.Generator().manual_seed(7))
    n = torch.randn(2, 3, 1, 1, 1, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    assert out.dtype == torch.float64
    assert torch.equal(out, noise + strength * n)


def test_zero_offset_and_perturbation_return_the_noise_and_draw_nothing() -> None:
    noise = torch.randn(2, 3, 4, 4)
    g = torch.Generator().manual_seed(7)
    state = g.get_state()
    assert losses.offset_noise(noise, 0.0, g) is noise
    assert losses.perturb_noise(noise, 0.0, g) is noise
    assert torch.equal(g.get_state(), state)


@pytest.mark.parametrize("gamma", [0.1, 1.0])
def test_perturb_noise_is_noise_plus_gamma_times_a_fresh_draw(gamma: float) -> None:
    noise = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    torch.manual_seed(123)
    out = losses.perturb_noise(noise, gamma, torch.Generator().manual_seed(9))
    xi = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    assert out.dtype == torch.float64
    assert torch.equal(out, noise + gamma * xi)


def test_noise_draws_stay_on_the_noise_device() -> None:
    """The extra draws are made where the noise lives (meta stands in for an accelerator here)."""
    noise = torch.empty(2, 3, 4, 4, device="meta")
    assert losses.offset_noise(noise, 0.1).device.type == "meta"
    assert losses.perturb_noise(noise, 0.1).device.type == "meta"


# --- DiffusionLoss.discrete on a 3-step schedule with a fixed linear "network" F(x, t) = 0.5 x


def _half(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return 0.5 * x


def _weights(param: str = "eps") -> torch.Tensor:
    return losses.lvlb_weights(BETAS, AC, VAR, param)


def test_discrete_defaults_draw_the_noise_and_log_under_train() -> None:
    """L = l_simple_weight * mean_b(mean |F(x_t) - eps|) + elbo * mean_b(w_t mean |...|), x_t =
    sqrt(abar) x0 + sqrt(1 - abar) eps with eps drawn from the global RNG; logvar = 0."""
    x0 = torch.randn(2, 2, 3, 3)
    t = torch.tensor([2, 1])
    logvar = torch.zeros(3)
    obj = DiffusionLoss(loss_type="l1", l_simple_weight=0.5, original_elbo_weight=2.0)
    torch.manual_seed(5)
    loss, log = obj.discrete(_half, DiscreteDenoiser(AC), x0, t, AC, logvar, _weights())
    torch.manual_seed(5)
    eps = torch.randn_like(x0)
    a = AC[t].float().view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    per = (0.5 * x_t - eps).abs().mean(dim=(1, 2, 3))
    vlb = (torch.tensor([25 / 14, 1.25]) * per).mean()
    assert set(log) == {"train/loss_simple", "train/loss_vlb", "train/loss"}
    torch.testing.assert_close(log["train/loss_simple"], per.mean())
    torch.testing.assert_close(log["train/loss_vlb"], vlb)
    torch.testing.assert_close(loss, 0.5 * per.mean() + 2.0 * vlb)
    torch.testing.assert_close(log["train/loss"], loss)


def test_discrete_learned_logvar_logs_and_keeps_the_loss_dtype() -> None:
    """loss_t = L_simple / e^logvar_t + logvar_t; logged as loss_gamma, logvar as its mean; a
    float64 logvar does not turn the float32 loss into float64."""
    x0, noise = torch.randn(2, 2, 3, 3), torch.randn(2, 2, 3, 3)
    t = torch.tensor([0, 2])
    logvar = torch.tensor([0.5, -1.0, 0.25], dtype=torch.float64)
    obj = DiffusionLoss(l_simple_weight=3.0)
    loss, log = obj.discrete(
        _half, DiscreteDenoiser(AC), x0, t, AC, logvar, _weights(), noise, "val", True
    )
    a = AC[t].float().view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    per = ((0.5 * x_t - noise) ** 2).mean(dim=(1, 2, 3))
    lv = torch.tensor([0.5, 0.25])
    gamma = (per / lv.exp() + lv).mean()
    assert set(log) == {"val/loss_simple", "val/loss_vlb", "val/loss_gamma", "logvar", "val/loss"}
    torch.testing.assert_close(log["val/loss_gamma"], gamma)
    torch.testing.assert_close(log["logvar"], torch.tensor(-0.25 / 3, dtype=torch.float64))
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, 3.0 * gamma)
    torch.testing.assert_close(log["val/loss"], loss)


def test_discrete_snr_floor_alone_weights_the_loss() -> None:
    """Truncated SNR without a cap (eps): weight max(SNR, 1) / SNR; SNR = abar / (1 - abar) = 9 at
    t=0 (weight 1) and 0.5625 at t=2 (weight 1 / 0.5625)."""
    x0, noise = torch.randn(2, 2, 3, 3), torch.randn(2, 2, 3, 3)
    t = torch.tensor([0, 2])
    obj = DiffusionLoss(snr_weight_floor=1.0)
    den = DiscreteDenoiser(AC)
    loss, log = obj.discrete(_half, den, x0, t, AC, torch.zeros(3), _weights(), noise)
    a = AC[t].float().view(-1, 1, 1, 1)
    per = ((0.5 * (a.sqrt() * x0 + (1 - a).sqrt() * noise) - noise) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(loss, (per * torch.tensor([1.0, 1 / 0.5625])).mean())
    torch.testing.assert_close(log["train/loss_simple"], per.mean())


def test_discrete_offset_noise_is_in_x_t_and_target_perturbation_only_in_x_t() -> None:
    """eps' = eps + s_off * n[B, C, 1, 1] is both the noise of x_t and the eps target; the input
    perturbation gamma * xi (drawn after n) enters x_t only (Ning et al. 2023)."""
    x0, noise = torch.randn(2, 2, 3, 3), torch.randn(2, 2, 3, 3)
    t = torch.tensor([1, 2])
    seen = {}

    def net(x: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:
        seen["x"] = x
        return torch.zeros_like(x)

    obj = DiffusionLoss(offset_noise=0.3, input_perturbation=0.2)
    torch.manual_seed(11)
    _, log = obj.discrete(net, DiscreteDenoiser(AC), x0, t, AC, torch.zeros(3), _weights(), noise)
    torch.manual_seed(11)
    n = torch.randn(2, 2, 1, 1)
    xi = torch.randn(2, 2, 3, 3)
    target = noise + 0.3 * n
    a = AC[t].float().view(-1, 1, 1, 1)
    torch.testing.assert_close(seen["x"], a.sqrt() * x0 + (1 - a).sqrt() * (target + 0.2 * xi))
    torch.testing.assert_close(log["train/loss_simple"], (target**2).mean())


@pytest.mark.parametrize("loss_type", ["l1", "l2"])
def test_sigma_loss_ve_with_a_zero_network(loss_type: str) -> None:
    """VE (Karras et al. 2022 Table 1): D = x + sigma F = x for F = 0, so D - y = sigma n, and the
    weight 1 / sigma^2 leaves mean|n| / sigma (l1) or mean n^2 (l2); sigma = exp(U(log 0.02, log
    100)) is drawn before n from the global RNG."""
    y = torch.randn(3, 2, 4, 4)
    st = SigmaTraining("ve", sigma_min=0.02, sigma_max=100.0)
    obj = DiffusionLoss(loss_type=loss_type, l_simple_weight=0.5)
    torch.manual_seed(4)
    out, log = obj.sigma(lambda x, c: torch.zeros_like(x), SigmaDenoiser(st), y)
    torch.manual_seed(4)
    u = torch.rand(3)
    sigma = (math.log(0.02) + u * (math.log(100.0) - math.log(0.02))).exp()
    n = torch.randn(3, 2, 4, 4)
    if loss_type == "l1":
        per = n.abs().mean(dim=(1, 2, 3)) / sigma
    else:
        per = (n**2).mean(dim=(1, 2, 3))
    assert set(log) == {"train/loss_simple", "train/loss"}
    torch.testing.assert_close(log["train/loss_simple"], per.mean(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out, 0.5 * per.mean(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(log["train/loss"], out)
