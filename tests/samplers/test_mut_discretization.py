"""Discretizations against diffusers' schedulers and the formulas written out (mutation tests).

References: diffusers ``EulerDiscreteScheduler`` (Karras / exponential sigmas, ``final_sigmas_type``,
``_sigma_to_t``), ``DPMSolverMultistepScheduler`` (``leading`` spacing of the dpm style), EDM
eq. 5 (Karras sigmas), and diffusers' img2img rule (keep ``int(steps * strength)`` steps).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ldm.diffusion import alphas_cumprod_from_betas, make_beta_schedule
from ldm.diffusion.discretization import (
    ZERO_SNR_ALPHA_BAR,
    DiscreteSchedule,
    Ladder,
    Level,
    build_sigmas,
    exponential_sigmas,
    img2img_start,
    karras_sigmas,
    make_ladder,
    spaced_timesteps,
    vp_timesteps,
)

pytestmark = pytest.mark.usefixtures("one_thread")

AC = alphas_cumprod_from_betas(make_beta_schedule("linear", 1000, 0.00085, 0.012))
SIG = np.sqrt((1 - AC.numpy()) / AC.numpy())
SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def t_of(sigma: float) -> float:
    return float(np.interp(math.log(sigma), np.log(SIG), np.arange(1000)))


def test_schedule_basics_and_errors():
    assert DiscreteSchedule(AC.float()).alphas_cumprod.dtype == torch.float64
    s = DiscreteSchedule(AC)
    assert s.num_timesteps == 1000
    assert s.sigma_min == pytest.approx(SIG[0], rel=1e-6)
    assert s.sigma_max == pytest.approx(SIG[-1], rel=1e-6)
    assert s.interpolation == "log"
    with pytest.raises(ValueError, match="interpolation"):
        DiscreteSchedule(AC, "cubic")
    with pytest.raises(ValueError, match="at least 2"):
        DiscreteSchedule(AC[:1])
    # a zero terminal SNR schedule: alpha_bar floored for sigma, kept exact for the last level
    zs = DiscreteSchedule(torch.tensor([0.9, 0.5, 0.0], dtype=torch.float64))
    assert float(zs.alphas_cumprod[-1]) == ZERO_SNR_ALPHA_BAR
    assert float(zs.alphas_cumprod_exact[-1]) == 0.0
    assert zs.sigma_max == pytest.approx(math.sqrt((1 - 2**-24) / 2**-24))
    # log-sigma interpolation in float64 at a t that float32 cannot hold
    assert float(s.t_to_sigma(500.3)) == pytest.approx(SIG[500] ** 0.7 * SIG[501] ** 0.3, rel=1e-12)
    # the smallest schedule: two timesteps
    two = DiscreteSchedule(torch.tensor([0.9, 0.5], dtype=torch.float64))
    assert float(two.sigma_to_t(two.t_to_sigma(0.5))) == pytest.approx(0.5)
    # clamping outside [0, T-1]
    assert float(s.t_to_sigma(-3.0)) == pytest.approx(SIG[0], rel=1e-12)
    assert float(s.t_to_sigma(1500.0)) == pytest.approx(SIG[-1], rel=1e-12)
    assert float(s.sigma_to_t(SIG[0] / 10)) == 0.0
    assert float(s.sigma_to_t(SIG[-1] * 10)) == 999.0
    assert float(s.sigma_to_t(0.0)) == 0.0
    assert float(s.sigma_to_t(SIG[-1])) == pytest.approx(999.0, abs=1e-9)
    # sigma_to_t agrees with diffusers' interpolation (log-linear in sigma between neighbours)
    sig = torch.tensor([0.05, 0.7, 3.0, 13.0], dtype=torch.float64)
    np.testing.assert_allclose(s.sigma_to_t(sig).numpy(), [t_of(float(v)) for v in sig], atol=1e-9)
    lin = DiscreteSchedule(AC, "linear")
    np.testing.assert_allclose(
        lin.sigma_to_t(sig).numpy(), np.interp(sig.numpy(), SIG, np.arange(1000)), atol=1e-9
    )
    assert lin.sigma_to_t(sig).shape == (4,)
    assert s.sigma_to_t(torch.tensor([[0.7, 3.0]])).shape == (1, 2)


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_exponential_and_sigma_min_ladders_match_diffusers(spacing, diffusers):
    e = diffusers.EulerDiscreteScheduler(
        **SD, use_exponential_sigmas=True, timestep_spacing=spacing, final_sigmas_type="sigma_min"
    )
    e.set_timesteps(9)
    ours = build_sigmas(
        DiscreteSchedule(AC, "linear"), 9, exponential=True, final_sigma="sigma_min"
    )
    if spacing == "linspace":  # diffusers spans the spaced sigmas; linspace spans the schedule
        np.testing.assert_allclose(ours.numpy(), e.sigmas.numpy(), rtol=5e-5)
    e = diffusers.EulerDiscreteScheduler(
        **SD, timestep_spacing=spacing, final_sigmas_type="sigma_min"
    )
    e.set_timesteps(9)
    ours = build_sigmas(DiscreteSchedule(AC, "linear"), 9, timestep_spacing=spacing, steps_offset=0)
    np.testing.assert_allclose(ours[:-1].numpy(), e.sigmas[:-1].numpy(), rtol=5e-5)
    assert float(ours[-1]) == 0.0
    ours = build_sigmas(DiscreteSchedule(AC, "linear"), 9, timestep_spacing=spacing,
                        final_sigma="sigma_min")  # fmt: skip
    np.testing.assert_allclose(ours.numpy(), e.sigmas.numpy(), rtol=5e-5)


def test_karras_exponential_formulas_and_build_options():
    # EDM eq. 5 with rho = 7 by default
    k = karras_sigmas(4, 0.1, 10.0)
    i = np.arange(4) / 3
    expected = (10.0 ** (1 / 7) + i * (0.1 ** (1 / 7) - 10.0 ** (1 / 7))) ** 7
    np.testing.assert_allclose(k.numpy(), expected, rtol=1e-12)
    k3 = karras_sigmas(4, 0.1, 10.0, rho=3.0)
    np.testing.assert_allclose(
        k3.numpy(), (10 ** (1 / 3) + i * (0.1 ** (1 / 3) - 10 ** (1 / 3))) ** 3
    )
    np.testing.assert_allclose(
        exponential_sigmas(3, 0.1, 10.0).numpy(), [10.0, 1.0, 0.1], rtol=1e-12
    )
    sched = DiscreteSchedule(AC)
    b = build_sigmas(sched, 4, karras=True, rho=3.0, sigma_min=0.1, sigma_max=10.0)
    np.testing.assert_allclose(b.numpy(), list(k3.numpy()) + [0.0], rtol=1e-12)
    b = build_sigmas(sched, 3, exponential=True, sigma_min=0.1, sigma_max=10.0)
    np.testing.assert_allclose(b.numpy(), [10.0, 1.0, 0.1, 0.0], rtol=1e-12)
    b = build_sigmas(sched, 3, karras=True, final_sigma="sigma_min")
    assert float(b[0]) == pytest.approx(SIG[-1]) and float(b[-1]) == pytest.approx(SIG[0])
    # leading with an offset, dpm style
    b = build_sigmas(sched, 4, timestep_spacing="leading", steps_offset=1, style="dpm")
    np.testing.assert_allclose(b[:-1].numpy(), SIG[[801, 601, 401, 201]], rtol=1e-12)
    with pytest.raises(ValueError, match="at most one"):
        build_sigmas(sched, 3, karras=True, exponential=True)
    with pytest.raises(ValueError, match="final_sigma"):
        build_sigmas(sched, 3, final_sigma="one")


def test_spacings_by_hand_and_errors(diffusers):
    np.testing.assert_array_equal(spaced_timesteps("leading", 4, 1000), [750, 500, 250, 0])
    np.testing.assert_array_equal(spaced_timesteps("leading", 4, 1000, 3), [753, 503, 253, 3])
    np.testing.assert_array_equal(spaced_timesteps("trailing", 4, 1000), [999, 749, 499, 249])
    np.testing.assert_allclose(spaced_timesteps("linspace", 4, 1000), [999, 666, 333, 0])
    np.testing.assert_array_equal(
        spaced_timesteps("linspace", 4, 1000, style="dpm"), [999, 749, 500, 250]
    )
    np.testing.assert_array_equal(
        spaced_timesteps("leading", 4, 1000, 1, "dpm"), [801, 601, 401, 201]
    )
    d = diffusers.DPMSolverMultistepScheduler(**SD, timestep_spacing="leading", steps_offset=3)
    d.set_timesteps(4)
    np.testing.assert_array_equal(
        spaced_timesteps("leading", 4, 1000, 3, "dpm"), d.timesteps.numpy()
    )
    assert spaced_timesteps("leading", 1, 1000).tolist() == [0.0]
    # trailing with as many steps as timesteps (diffusers: arange(T, 0, -T / N).round() - 1)
    assert spaced_timesteps("trailing", 10, 10).tolist() == list(range(9, -1, -1))
    ts = spaced_timesteps("leading", 4, 1000)
    assert ts.dtype == np.float64 and ts.strides[0] > 0
    with pytest.raises(ValueError, match="steps must be"):
        spaced_timesteps("leading", 0, 1000)
    with pytest.raises(ValueError, match="style"):
        spaced_timesteps("leading", 4, 1000, style="x")
    with pytest.raises(ValueError, match="timestep_spacing"):
        spaced_timesteps("uniform", 4, 1000)
    with pytest.raises(ValueError, match="leave"):
        spaced_timesteps("leading", 4, 1000, 250)  # 750 + 250 = 1000 > 999
    spaced_timesteps("leading", 4, 1000, 249)  # 999 fits
    with pytest.raises(ValueError, match="leave"):
        spaced_timesteps("leading", 4, 1000, -1)
    # vp_timesteps: offset 1 for leading when it fits (SD), else 0
    assert vp_timesteps(4, 1000) == [751, 501, 251, 1]
    assert vp_timesteps(4, 1000, "trailing") == [999, 749, 499, 249]
    assert vp_timesteps(1000, 1000) == list(range(999, -1, -1))  # 1000 would leave [0, 999]
    assert vp_timesteps(4, 1000, "leading", 0) == [750, 500, 250, 0]
    assert vp_timesteps(3, 10, "linspace") == [9, 4, 0]  # 4.5 rounds to even
    assert vp_timesteps(4, 13) == [10, 7, 4, 1]  # (4 - 1) * 3 + 1 = 10 <= 12 fits
    # diffusers' DDIM leading with steps_offset=1: step ratio T // N = 1, the last timestep fits
    assert vp_timesteps(7, 10) == [7, 6, 5, 4, 3, 2, 1]
    assert vp_timesteps(9, 10) == [9, 8, 7, 6, 5, 4, 3, 2, 1]  # (9 - 1) * 1 + 1 = 9 <= 9
    assert vp_timesteps(10, 10) == list(range(9, -1, -1))  # 10 would leave [0, 9]
    assert vp_timesteps(5, 3) == [1, 1, 1, 1, 1]  # more steps than timesteps: T // N = 0


def test_ladder_strength_and_hand_off():
    levels = [
        Level(float(s), t, 1 / (1 + s**2))
        for s, t in ((9.0, 900), (5.0, 700), (2.0, 400), (1.0, 100))
    ]
    lad = Ladder(levels + [Level(0.0, None, 1.0)])
    assert lad.sigmas == [9.0, 5.0, 2.0, 1.0, 0.0] and lad.steps == 4
    assert img2img_start(4, 0.5) == 2 and img2img_start(4, 0.6) == 2  # int(2.4) = 2 steps kept
    assert img2img_start(4, 1.0) == 0 and img2img_start(4, 0.0) == 4 and img2img_start(4, 0.75) == 1
    with pytest.raises(ValueError, match="strength"):
        img2img_start(4, 1.5)
    with pytest.raises(ValueError, match="strength"):
        img2img_start(4, -0.1)
    assert lad.from_strength(0.5).sigmas == [2.0, 1.0, 0.0]
    # hand-off at 0.5 of T = 1000: levels with t >= 500 are the base's
    assert lad.switch_index(0.5, 1000) == 2
    assert lad.switch_index(0.3, 1000) == 2  # cutoff 700: t = 700 counts
    assert lad.switch_index(0.29, 1000) == 1  # cutoff 710: t = 700 is after the hand-off
    assert lad.until(0.5, 1000).sigmas == [9.0, 5.0, 2.0]
    assert lad.after(0.5, 1000).sigmas == [2.0, 1.0, 0.0]
    for bad in (0.0, 1.0, -0.5):
        with pytest.raises(ValueError, match="denoising_start"):
            lad.switch_index(bad, 1000)
    no_t = Ladder([Level(2.0, None, 0.2), Level(0.0, None, 1.0)])
    with pytest.raises(ValueError, match="discrete"):
        no_t.switch_index(0.5, 1000)
    assert Ladder([Level(2.0, 900, 0.2), Level(0.0, None, 1.0)]).switch_index(0.5, 1000) == 1
    mid = Ladder([Level(2.0, 900, 0.2), Level(1.0, None, 0.5), Level(0.0, None, 1.0)])
    with pytest.raises(ValueError, match="discrete"):
        mid.switch_index(0.5, 1000)


def test_make_ladder_branches():
    sched = DiscreteSchedule(AC)
    # integer timesteps (VP solvers), last level at t = 0 for final_sigma="sigma_min"
    lad = make_ladder(4, schedule=sched, integer_timesteps=True, timestep_spacing="leading",
                      steps_offset=None, final_sigma="sigma_min")  # fmt: skip
    assert [lv.t for lv in lad.levels] == [751, 501, 251, 1, 0]
    assert [lv.alpha_bar for lv in lad.levels] == pytest.approx(AC[[751, 501, 251, 1, 0]].tolist())
    assert lad.sigmas == pytest.approx(SIG[[751, 501, 251, 1, 0]].tolist())
    # fractional timesteps (k style linspace), final 0
    lad = make_ladder(3, schedule=sched, timestep_spacing="linspace")
    assert [lv.t for lv in lad.levels[:-1]] == [999.0, 499.5, 0.0]
    assert lad.levels[1].sigma == pytest.approx(math.sqrt(SIG[499] * SIG[500]))
    assert lad.levels[1].alpha_bar == pytest.approx(1 / (1 + SIG[499] * SIG[500]))
    assert lad.levels[-1] == Level(0.0, None, 1.0)
    # rounded timesteps of fractional levels
    lad = make_ladder(3, schedule=sched, timestep_spacing="linspace", round_timesteps=True)
    assert lad.levels[1].t == 499.5  # a spacing's own t is kept
    lad = make_ladder(3, schedule=sched, karras=True, round_timesteps=True)
    k = karras_sigmas(3, SIG[0], SIG[-1])
    assert [lv.t for lv in lad.levels[:-1]] == [round(t_of(float(s))) for s in k]
    lad = make_ladder(3, schedule=sched, karras=True)
    assert [lv.t for lv in lad.levels[:-1]] == pytest.approx([t_of(float(s)) for s in k], abs=1e-6)
    assert lad.sigmas[:-1] == pytest.approx(k.tolist())
    # exponential with an explicit range on a schedule
    lad = make_ladder(3, schedule=sched, exponential=True, sigma_min=0.1, sigma_max=10.0)
    assert lad.sigmas == pytest.approx([10.0, 1.0, 0.1, 0.0])
    assert lad.levels[1].alpha_bar == pytest.approx(0.5)
    # explicit timesteps and sigmas
    lad = make_ladder(2, schedule=sched, timesteps=[800, 300])
    assert [lv.t for lv in lad.levels] == [800, 300, None]
    assert lad.levels[0].alpha_bar == pytest.approx(float(AC[800]))
    lad = make_ladder(2, schedule=sched, sigmas=[5.0, 1.0, 0.0])
    assert lad.sigmas == [5.0, 1.0, 0.0]
    assert lad.levels[0].t == pytest.approx(t_of(5.0), abs=1e-6)
    assert lad.levels[-1] == Level(0.0, None, 1.0)
    lad = make_ladder(2, schedule=sched, sigmas=[5.0, 1.0, 0.0], round_timesteps=True)
    assert lad.levels[0].t == round(t_of(5.0))
    # no schedule: a continuous sigma range
    lad = make_ladder(3, sigma_min=0.5, sigma_max=8.0, exponential=True, final_sigma="sigma_min")
    assert lad.sigmas == pytest.approx([8.0, 2.0, 0.5, 0.5])
    assert [lv.t for lv in lad.levels] == [None] * 4
    assert lad.levels[-1].alpha_bar == pytest.approx(1 / 1.25)
    lad = make_ladder(3, sigma_min=0.1, sigma_max=10.0, karras=True, rho=3.0)
    i = np.arange(3) / 2
    expected = (10 ** (1 / 3) + i * (0.1 ** (1 / 3) - 10 ** (1 / 3))) ** 3
    assert lad.sigmas == pytest.approx([*expected.tolist(), 0.0])
    lad = make_ladder(1, sigma_min=0.1, sigma_max=10.0, sigmas=[3.0, 0.0])
    assert lad.levels[0] == Level(3.0, None, 0.1)
    with pytest.raises(ValueError, match="at most one"):
        make_ladder(3, schedule=sched, karras=True, exponential=True)
    with pytest.raises(ValueError, match="final_sigma"):
        make_ladder(3, schedule=sched, final_sigma="one")
    with pytest.raises(ValueError, match="sigma_min and sigma_max"):
        make_ladder(3, sigma_min=0.1, karras=True)
    with pytest.raises(ValueError, match="sigma_min and sigma_max"):
        make_ladder(3, sigma_max=0.1, karras=True)
    with pytest.raises(ValueError, match="sigma-conditioned"):
        make_ladder(3, sigma_min=0.1, sigma_max=1.0)
    with pytest.raises(ValueError, match="sigma-conditioned"):
        make_ladder(3, sigma_min=0.1, sigma_max=1.0, karras=True, timesteps=[5, 1])


def test_make_ladder_zero_terminal_snr_keeps_alpha_bar_zero():
    ac = torch.tensor([0.99, 0.6, 0.2, 0.0], dtype=torch.float64)
    lad = make_ladder(2, schedule=DiscreteSchedule(ac), timesteps=[3, 1], final_sigma="sigma_min")
    assert [lv.alpha_bar for lv in lad.levels] == [0.0, 0.6, 0.99]
    assert lad.levels[-1].t == 0


def test_make_ladder_defaults_and_exact_sigmas():
    sched = DiscreteSchedule(AC)
    lad = make_ladder(3, schedule=sched)  # linspace, no offset, final 0
    assert [lv.t for lv in lad.levels] == [999.0, 499.5, 0.0, None]
    lad = make_ladder(4, schedule=sched, timestep_spacing="leading")
    assert [lv.t for lv in lad.levels[:-1]] == [750.0, 500.0, 250.0, 0.0]
    # explicit sigmas are kept in float64 exactly as given
    assert make_ladder(2, schedule=sched, sigmas=[5.1, 0.3, 0.0]).sigmas == [5.1, 0.3, 0.0]
    # Karras sigmas for a VP solver (integer_timesteps only rounds a timestep spacing)
    lad = make_ladder(3, schedule=sched, karras=True, integer_timesteps=True)
    k = karras_sigmas(3, SIG[0], SIG[-1])
    assert lad.sigmas[:-1] == pytest.approx(k.tolist())
