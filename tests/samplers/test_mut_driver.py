"""The solver driver with recording solvers: start noise, img2img, hand-off, masks, defaults (mutation tests).

Two throw-away solvers (one per view) record what the driver hands them and return their start
point, so each of the driver's formulas is checked against its written-out value: x_T * sigma_max
(k-diffusion), sqrt(1 + sigma^2) x_T (VP unit variance), x0 + sigma x_T and
sqrt(a) x0 + sqrt(1 - a) x_T (img2img), VP <-> VE hand-off latents.
"""

from __future__ import annotations

import math

import pytest
import torch

from ldm.diffusion import alphas_cumprod_from_betas, make_beta_schedule
from ldm.diffusion.denoiser import DiscreteDenoiser, SigmaDenoiser
from ldm.diffusion.discretization import Ladder, Level
from ldm.diffusion.edm import SigmaTraining
from ldm.samplers import SAMPLERS, sample
from ldm.samplers.context import SamplerContext
from ldm.samplers.driver import SOLVERS, BoundDenoiser, KnownRegion, VPChain, register_solver

pytestmark = pytest.mark.usefixtures("one_thread")

AC = alphas_cumprod_from_betas(make_beta_schedule("linear", 1000, 0.00085, 0.012))
SIG = ((1 - AC) / AC).sqrt()
REC: dict = {}


@pytest.fixture
def solvers():
    """Registers ``test_rec_ve`` / ``test_rec_vp`` (+ variants with defaults); removed afterwards."""
    names = []

    def add(name, view, **defaults):
        def solver(model, x, ladder, ctx, *, calls=0, shift=0.0):
            REC.clear()
            REC.update(model=model, x=x.clone(), ladder=ladder, ctx=ctx)
            outs = []
            for i in range(calls):  # evaluate the model at the first levels
                if view == "ve":
                    outs.append(model(x, ladder[i]))
                else:
                    outs.append(model(x, i))
            REC["outs"] = outs
            return x + shift

        solver.__doc__ = f"records ({view})"
        register_solver(name, view=view, **defaults)(solver)
        names.append(name)

    add("test_rec_ve", "ve")
    add("test_rec_vp", "vp")
    add(
        "test_rec_vp_lead",
        "vp",
        timestep_spacing="leading",
        steps_offset=None,
        final_sigma="sigma_min",
    )
    add("test_rec_ve_def", "ve", defaults_of=lambda o: {"karras": o.get("shift", 0.0) > 0})
    add("test_rec_ve_vpnoise", "ve", noise_scaling="vp")
    add("test_rec_ve_exp", "ve", exponential=True)
    add("test_rec_ve_dpm", "ve", style="dpm", timestep_spacing="leading")
    add("test_rec_ve_off", "ve", timestep_spacing="leading", steps_offset=1)
    yield
    for n in names:
        SOLVERS.pop(n, None)
        SAMPLERS.pop(n, None)


def zero(x, t):
    return torch.zeros_like(x)


def run(name, x, **kw):
    kw.setdefault("alphas_cumprod", AC)
    return sample(zero, x, sampler=name, steps=kw.pop("steps", 4), disable=True, **kw)


def test_registration_and_errors(solvers):
    assert SAMPLERS["test_rec_ve"].__name__ == "sample_test_rec_ve"
    assert SAMPLERS["test_rec_ve"].__doc__ == "records (ve)"
    assert SOLVERS["test_rec_vp"].view == "vp" and SOLVERS["test_rec_ve"].view == "ve"
    with pytest.raises(ValueError, match="view"):
        register_solver("test_bad", view="edm")
    try:
        register_solver("test_rec_default")(lambda d, x, s, c: x)
        assert SOLVERS["test_rec_default"].view == "ve"
    finally:
        SOLVERS.pop("test_rec_default", None), SAMPLERS.pop("test_rec_default", None)
    assert "test_bad" not in SOLVERS
    x = torch.ones(2, 3)
    with pytest.raises(ValueError, match="noise_scaling"):
        run("test_rec_ve", x, noise_scaling="unit")
    with pytest.raises(ValueError, match="at most one"):
        run("test_rec_vp", x, final_sigma="zero", set_alpha_to_one=True)
    with pytest.raises(ValueError, match="alphas_cumprod"):
        sample(zero, x, sampler="test_rec_ve", steps=2, alphas_cumprod=None)
    with pytest.raises(ValueError, match="unknown option"):
        run("test_rec_ve", x, churn=1.0)


def test_start_noise_scalings(solvers):
    x = torch.full((2, 3), 2.0)
    sig = [5.0, 1.0, 0.0]
    out = run("test_rec_ve", x, sigmas=sig, steps=2)  # k-diffusion: x_T * sigma_max
    torch.testing.assert_close(out, x * 5.0)
    assert REC["ladder"] == sig
    out = run("test_rec_ve", x, sigmas=sig, steps=2, noise_scaling="vp")
    torch.testing.assert_close(out, x * math.sqrt(26.0))
    out = run("test_rec_ve_vpnoise", x, sigmas=sig, steps=2)  # a solver's default
    torch.testing.assert_close(out, x * math.sqrt(26.0))
    out = run("test_rec_vp", x, sigmas=sig, steps=2)  # VP default: unit variance, x_T as is
    torch.testing.assert_close(out, x)
    out = run("test_rec_vp", x, sigmas=sig, steps=2, noise_scaling="sigma")
    torch.testing.assert_close(out, x * 5.0 / math.sqrt(26.0))  # sigma * sqrt(alpha_bar)
    out = run("test_rec_ve", x, sigmas=sig, steps=2, shift=1.5)
    torch.testing.assert_close(out, x * 5.0 + 1.5)


def test_context_and_chain(solvers):
    seen = []
    g = torch.Generator().manual_seed(0)
    sample(zero, torch.ones(1, 2), sampler="test_rec_vp", steps=3, alphas_cumprod=AC,
           timesteps=[900, 500, 100], callback=seen.append, generator=g, disable=True)  # fmt: skip
    ctx = REC["ctx"]
    assert isinstance(ctx, SamplerContext)
    assert ctx.generator is g and ctx.callback == seen.append and ctx.disable is True
    assert ctx.name == "test_rec_vp" and ctx.total == 3
    chain = REC["ladder"]
    assert chain.timesteps == [900, 500, 100]
    assert chain.alphas == pytest.approx(AC[[900, 500, 100]].tolist())
    assert chain.alphas_prev == pytest.approx([float(AC[500]), float(AC[100]), 1.0])
    c = VPChain.of(Ladder([Level(2.0, 7, 0.2), Level(1.0, None, 0.5), Level(0.0, None, 1.0)]))
    assert (c.timesteps, c.alphas, c.alphas_prev) == ([7, None], [0.2, 0.5], [0.5, 1.0])


def test_default_ladders_and_overrides(solvers):
    x = torch.ones(1, 2)
    run("test_rec_ve", x, steps=3)  # linspace on the schedule, final 0
    assert REC["ladder"][:-1] == pytest.approx(
        [float(SIG[999]), math.sqrt(SIG[499] * SIG[500]), float(SIG[0])]
    )
    assert REC["ladder"][-1] == 0.0
    out = run("test_rec_vp_lead", x, steps=4)  # leading with SD's offset 1, last level t = 0
    torch.testing.assert_close(out, x)  # no hand-off: the VP result is returned as is
    assert REC["model"].ladder.levels[-1].t == 0
    assert REC["ladder"].timesteps == [751, 501, 251, 1]
    run("test_rec_vp_lead", x, steps=4, set_alpha_to_one=True)
    assert REC["ladder"].alphas_prev[-1] == 1.0
    run("test_rec_vp_lead", x, steps=4, final_sigma="zero")
    assert REC["ladder"].alphas_prev[-1] == 1.0
    run("test_rec_vp", x, steps=4, set_alpha_to_one=False)
    assert REC["ladder"].alphas_prev[-1] == pytest.approx(float(AC[0]))
    run("test_rec_vp_lead", x, steps=4, steps_offset=0, timestep_spacing="trailing")
    assert REC["ladder"].timesteps == [999, 749, 499, 249]
    run("test_rec_vp_lead", x, steps=4, steps_offset=2)
    assert REC["ladder"].timesteps == [752, 502, 252, 2]
    run("test_rec_vp", x, steps=4)  # VP: integer timesteps of the linspace spacing
    assert REC["ladder"].timesteps == [999, 666, 333, 0]
    # karras from a solver's option-dependent defaults; an explicit spacing beats it
    run("test_rec_ve_def", x, steps=3, shift=1.0)
    k = [
        (SIG[-1] ** (1 / 7) + i / 2 * (SIG[0] ** (1 / 7) - SIG[-1] ** (1 / 7))) ** 7
        for i in range(3)
    ]
    assert REC["ladder"][:-1] == pytest.approx([float(v) for v in k])
    run("test_rec_ve_def", x, steps=3, shift=1.0, timestep_spacing="trailing")
    assert REC["ladder"][0] == pytest.approx(float(SIG[999]))
    assert REC["ladder"][1] == pytest.approx(float(SIG[666]))
    run("test_rec_ve_def", x, steps=3, shift=1.0, exponential=True)
    assert REC["ladder"][1] == pytest.approx(math.sqrt(SIG[0] * SIG[-1]))
    run("test_rec_ve_def", x, steps=3, shift=0.0)
    assert REC["ladder"][1] == pytest.approx(math.sqrt(SIG[499] * SIG[500]))
    # karras with an explicit range and rho
    run("test_rec_ve", x, steps=3, karras=True, sigma_min=0.1, sigma_max=10.0, rho=3.0)
    k = [(10 ** (1 / 3) + i / 2 * (0.1 ** (1 / 3) - 10 ** (1 / 3))) ** 3 for i in range(3)]
    assert REC["ladder"] == pytest.approx([*k, 0.0])
    run("test_rec_ve", x, steps=3, exponential=True, sigma_max=10.0)
    assert REC["ladder"][0] == pytest.approx(10.0) and REC["ladder"][2] == pytest.approx(
        float(SIG[0])
    )
    run("test_rec_ve", x, steps=2, exponential=True, sigma_min=0.1)
    assert REC["ladder"][1] == pytest.approx(0.1) and REC["ladder"][0] == pytest.approx(
        float(SIG[-1])
    )


def test_default_denoiser_parameterization_interpolation_rounding(solvers):
    x = torch.ones(1, 2)
    ts = []

    def model(x, t):
        ts.append(float(t[0]))
        return torch.full_like(x, 0.5)

    sample(model, x, sampler="test_rec_ve", steps=2, sigmas=[3.0, 0.0], alphas_cumprod=AC,
           parameterization="x0", calls=1, disable=True)  # fmt: skip
    bound = REC["model"]
    assert isinstance(bound.denoiser, DiscreteDenoiser)
    assert bound.denoiser.parameterization == "x0"
    torch.testing.assert_close(REC["outs"][0], torch.full((1, 2), 0.5))  # x0: D = F
    assert bound.nfe == 1
    lin = DiscreteDenoiser(AC, interpolation="linear")
    sample(model, x, sampler="test_rec_ve", steps=1, sigmas=[3.0, 0.0], alphas_cumprod=AC,
           sigma_interpolation="linear", calls=1, disable=True)  # fmt: skip
    assert ts[-1] == pytest.approx(lin.t_of(3.0), abs=1e-4)
    assert REC["model"].denoiser.schedule.interpolation == "linear"
    sample(model, x, sampler="test_rec_ve", steps=1, sigmas=[3.0, 0.0], alphas_cumprod=AC,
           round_timesteps=True, calls=1, disable=True)  # fmt: skip
    assert ts[-1] == round(DiscreteDenoiser(AC).t_of(3.0))
    assert REC["model"].denoiser.round_timesteps is True


def test_sigma_denoiser_defaults_to_karras_and_refuses_hand_off(solvers):
    d = SigmaDenoiser(SigmaTraining("edm", sigma_min=0.1, sigma_max=10.0))
    x = torch.ones(1, 2)
    sample(zero, x, sampler="test_rec_ve", steps=3, denoiser=d, disable=True)
    k = [(10 ** (1 / 7) + i / 2 * (0.1 ** (1 / 7) - 10 ** (1 / 7))) ** 7 for i in range(3)]
    assert REC["ladder"] == pytest.approx([*k, 0.0])
    sample(zero, x, sampler="test_rec_ve", steps=2, denoiser=d, exponential=True, disable=True)
    assert REC["ladder"] == pytest.approx([10.0, 0.1, 0.0])
    with pytest.raises(ValueError, match="denoising_start"):
        sample(zero, x, sampler="test_rec_ve", steps=2, denoiser=d, denoising_end=0.5)
    with pytest.raises(ValueError, match="denoising_start"):
        sample(zero, x, sampler="test_rec_ve", steps=2, denoiser=d, denoising_start=0.5)


def test_img2img_start_points(solvers):
    x0, noise = torch.full((1, 2), 0.5), torch.full((1, 2), 2.0)
    sig = [9.0, 5.0, 2.0, 1.0, 0.0]
    out = run("test_rec_ve", noise, sigmas=sig, x0=x0, strength=0.5)
    assert REC["ladder"] == [2.0, 1.0, 0.0]
    torch.testing.assert_close(out, x0 + 2.0 * noise)
    out = run("test_rec_vp", noise, sigmas=sig, x0=x0, strength=0.5)
    a = 1 / (1 + 4.0)
    torch.testing.assert_close(out, math.sqrt(a) * x0 + math.sqrt(1 - a) * noise)
    assert REC["ladder"].alphas == pytest.approx([0.2, 0.5])
    # strength 1 with x0 given: pure noise start
    out = run("test_rec_ve", noise, sigmas=sig, x0=x0, strength=1.0)
    torch.testing.assert_close(out, 9.0 * noise)
    # no step left: x0 itself (a copy)
    out = run("test_rec_ve", noise, sigmas=sig, x0=x0, strength=0.1)
    torch.testing.assert_close(out, x0)
    assert out is not x0
    out = run("test_rec_ve", noise, sigmas=sig, x0=x0, strength=0.0)
    torch.testing.assert_close(out, x0)


def test_hand_off_between_models(solvers):
    x = torch.full((1, 2), 2.0)
    ts = [900, 700, 400, 100]
    # base: stops after the levels with t >= 500, returns the VE latent there
    out = run("test_rec_ve", x, timesteps=ts, denoising_end=0.5)
    assert REC["ladder"] == pytest.approx([float(SIG[900]), float(SIG[700]), float(SIG[400])])
    torch.testing.assert_close(out, x * float(SIG[900]))
    out = run("test_rec_vp", x, timesteps=ts, denoising_end=0.5)
    assert REC["ladder"].timesteps == [900, 700]
    torch.testing.assert_close(out, x / math.sqrt(float(AC[400])))  # VP -> VE at t = 400
    # refiner: continues from that latent (x_T is already the VE latent)
    out = run("test_rec_ve", x, timesteps=ts, denoising_start=0.5)
    assert REC["ladder"] == pytest.approx([float(SIG[400]), float(SIG[100]), 0.0])
    torch.testing.assert_close(out, x)
    out = run("test_rec_vp", x, timesteps=ts, denoising_start=0.5)
    torch.testing.assert_close(out, x * math.sqrt(float(AC[400])))  # VE -> VP
    # the last level is sigma 0: no conversion back
    out = run("test_rec_vp", x, timesteps=ts, denoising_start=0.5, denoising_end=0.95)
    assert REC["ladder"].timesteps == [400, 100]
    torch.testing.assert_close(out, x * math.sqrt(float(AC[400])))
    # an empty base part: x_T back (a copy)
    out = run("test_rec_ve", x, timesteps=ts, denoising_end=0.05)
    torch.testing.assert_close(out, x)
    assert out is not x
    with pytest.raises(ValueError, match="continues from x_T"):
        run("test_rec_ve", x, timesteps=ts, denoising_start=0.5, x0=x, strength=1.0)


def test_masks_blend_the_known_region(solvers):
    x0 = torch.tensor([[1.0, -1.0]])
    mask = torch.tensor([[1.0, 0.0]])  # keep the first entry
    noise = torch.full((1, 2), 2.0)
    out = run("test_rec_ve", noise, sigmas=[4.0, 0.0], steps=1, x0=x0, mask=mask, shift=0.25)
    torch.testing.assert_close(out, torch.tensor([[1.0, 8.25]]))
    # hand-off with a mask: the known region noised to the last level with the call's generator
    ts = [900, 700, 400, 100]
    g = torch.Generator().manual_seed(3)
    out = sample(zero, noise, sampler="test_rec_ve", steps=4, alphas_cumprod=AC, timesteps=ts,
                 x0=x0, mask=mask, denoising_end=0.5, generator=g, disable=True)  # fmt: skip
    z = torch.randn(1, 2, generator=torch.Generator().manual_seed(3))
    assert float(out[0, 0]) == pytest.approx(1.0 + float(SIG[400]) * float(z[0, 0]), rel=1e-5)
    assert float(out[0, 1]) == pytest.approx(2.0 * float(SIG[900]), rel=1e-5)
    # a hand-off below sigma 1 (t = 100) still noises the known region
    g = torch.Generator().manual_seed(3)
    out = sample(zero, noise, sampler="test_rec_ve", steps=3, alphas_cumprod=AC,
                 timesteps=[900, 300, 100], x0=x0, mask=mask, denoising_end=0.8, generator=g,
                 disable=True)  # fmt: skip
    assert float(SIG[100]) < 1.0
    assert float(out[0, 0]) == pytest.approx(1.0 + float(SIG[100]) * float(z[0, 0]), rel=1e-5)
    # mask with denoising_start: x_T is the latent (no x0 / strength error)
    out = run("test_rec_ve", noise, timesteps=ts, x0=x0, mask=mask, denoising_start=0.5)
    torch.testing.assert_close(out, torch.tensor([[1.0, 2.0]]))
    with pytest.raises(ValueError, match="mask shape"):
        run("test_rec_ve", noise, sigmas=[4.0, 0.0], steps=1, x0=x0, mask=torch.ones(3))


def test_bound_denoiser_views_clip_and_known_region():
    ctx = SamplerContext(generator=torch.Generator().manual_seed(1))
    x0 = torch.tensor([[0.5, -0.5, 2.0]])
    mask = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    known = KnownRegion(x0, mask, ctx)
    assert known.mask.dtype == torch.float32
    x = torch.tensor([[3.0, 4.0, 5.0]])
    z = torch.randn(1, 3, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(
        known.blend_ve(x, 2.0), torch.tensor([[0.5 + 2.0 * float(z[0, 0]), 4.0, 5.0]])
    )
    torch.testing.assert_close(known.blend_ve(x, 0.0), torch.tensor([[0.5, 4.0, 5.0]]))
    ctx.generator = torch.Generator().manual_seed(1)
    a = 0.36
    expected = torch.tensor([[0.6 * 0.5 + 0.8 * float(z[0, 0]), 4.0, 5.0]])
    torch.testing.assert_close(known.blend_vp(x, a), expected)
    torch.testing.assert_close(known.final(x), torch.tensor([[0.5, 4.0, 5.0]]))

    def model(x_in, t):
        return torch.full_like(x_in, 3.0)  # x0-parameterized: D = 3 everywhere

    d = DiscreteDenoiser(AC, "x0")
    b = BoundDenoiser(d, model, clip_denoised=True)
    torch.testing.assert_close(b(x, 2.0), torch.ones(1, 3))
    eps, x0_hat = b.vp(x, Level(2.0, None, 0.2))
    torch.testing.assert_close(x0_hat, torch.ones(1, 3))
    # eps from the unclipped x0 = 3: (x - sqrt(a) 3) / sqrt(1 - a)
    torch.testing.assert_close(eps, (x - math.sqrt(0.2) * 3.0) / math.sqrt(0.8))
    assert b.nfe == 2
    b = BoundDenoiser(d, model)
    torch.testing.assert_close(b(x, 2.0), torch.full((1, 3), 3.0))
    torch.testing.assert_close(b.vp(x, Level(2.0, None, 0.2))[1], torch.full((1, 3), 3.0))
    # with a known region, the model sees the blended input
    seen = []

    def spy(x_in, t):
        seen.append(x_in.clone())
        return torch.zeros_like(x_in)

    known = KnownRegion(x0, torch.tensor([1.0, 0.0, 0.0]), SamplerContext())
    b = BoundDenoiser(DiscreteDenoiser(AC, "eps"), spy, known)
    b(x, 0.0)
    torch.testing.assert_close(seen[-1], torch.tensor([[0.5, 4.0, 5.0]]))  # sigma 0: c_in = 1
    b.vp(x, Level(0.0, None, 1.0))
    torch.testing.assert_close(seen[-1], torch.tensor([[0.5, 4.0, 5.0]]))


def test_known_region_noise_draws_and_clipping_both_sides():
    x0 = torch.tensor([[0.5, -0.5]])
    ctx = SamplerContext(generator=torch.Generator().manual_seed(4))
    known = KnownRegion(x0, torch.tensor([1.0, 0.0]), ctx)
    x = torch.tensor([[3.0, 4.0]])
    torch.testing.assert_close(known.blend_ve(x, 0.0), torch.tensor([[0.5, 4.0]]))
    # sigma 0 draws no noise: the next draw is still the generator's first
    z = torch.randn(1, 2, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(ctx.randn(x), z)
    ctx.generator = torch.Generator().manual_seed(4)
    out = known.blend_ve(x, 0.5)  # below 1 the known region is noised too
    torch.testing.assert_close(out, torch.tensor([[0.5 + 0.5 * float(z[0, 0]), 4.0]]))

    def model(x_in, t):
        return torch.tensor([[3.0, -3.0]])  # x0-parameterized: D = F

    b = BoundDenoiser(DiscreteDenoiser(AC, "x0"), model, clip_denoised=True)
    torch.testing.assert_close(b.vp(x, Level(2.0, None, 0.2))[1], torch.tensor([[1.0, -1.0]]))
    torch.testing.assert_close(b(x, 2.0), torch.tensor([[1.0, -1.0]]))
    torch.testing.assert_close(b(x, 2.0), torch.tensor([[1.0, -1.0]]))
    assert b.nfe == 3


def test_solver_defaults_reach_the_ladder(solvers):
    x = torch.ones(1, 2)
    run("test_rec_ve_exp", x, steps=3)  # a solver's exponential default
    assert REC["ladder"][:-1] == pytest.approx(
        [float(SIG[-1]), math.sqrt(SIG[0] * SIG[-1]), float(SIG[0])]
    )
    run("test_rec_ve_exp", x, steps=3, karras=True)  # an explicit karras beats it
    k = [
        (SIG[-1] ** (1 / 7) + i / 2 * (SIG[0] ** (1 / 7) - SIG[-1] ** (1 / 7))) ** 7
        for i in range(3)
    ]
    assert REC["ladder"][:-1] == pytest.approx([float(v) for v in k])
    # the dpm style: leading = k * (T // (N + 1)) without the last (diffusers' DPMSolverMultistep)
    run("test_rec_ve_dpm", x, steps=4)
    assert REC["ladder"][:-1] == pytest.approx(SIG[[800, 600, 400, 200]].tolist())
    run("test_rec_ve_off", x, steps=4)  # the solver's steps_offset
    assert REC["ladder"][:-1] == pytest.approx(SIG[[751, 501, 251, 1]].tolist())
    run("test_rec_ve", x, steps=4, timestep_spacing="leading")  # no offset by default
    assert REC["ladder"][:-1] == pytest.approx(SIG[[750, 500, 250, 0]].tolist())
    run("test_rec_vp", x, steps=4, timestep_spacing="leading")  # VP: 0 unless the solver says
    assert REC["ladder"].timesteps == [750, 500, 250, 0]


def test_rounding_clipping_and_masks_reach_the_model(solvers):
    ts = []

    def model(x, t):
        ts.append(float(t[0]))
        return torch.full_like(x, 3.0)

    x = torch.ones(1, 2)
    kw = dict(alphas_cumprod=AC, parameterization="x0", calls=1, disable=True)
    sample(model, x, sampler="test_rec_vp", steps=3, karras=True, round_timesteps=True, **kw)
    assert ts[-1] == round(ts[-1]) and ts[-1] == pytest.approx(999.0)
    sample(model, x, sampler="test_rec_vp", steps=3, karras=True, **kw)
    assert ts[-1] == pytest.approx(DiscreteDenoiser(AC).t_of(float(SIG[-1])), abs=1e-4)
    sample(
        model, x, sampler="test_rec_vp", steps=3, sigmas=[5.0, 1.0, 0.0], round_timesteps=True, **kw
    )
    assert ts[-1] == round(DiscreteDenoiser(AC).t_of(5.0)) != DiscreteDenoiser(AC).t_of(5.0)
    sample(model, x, sampler="test_rec_ve", steps=1, sigmas=[5.0, 0.0], **kw)
    torch.testing.assert_close(REC["outs"][0], torch.full((1, 2), 3.0))  # not clipped by default
    sample(model, x, sampler="test_rec_ve", steps=1, sigmas=[5.0, 0.0], clip_denoised=True, **kw)
    torch.testing.assert_close(REC["outs"][0], torch.ones(1, 2))
    sample(model, x, sampler="test_rec_vp", steps=1, sigmas=[5.0, 0.0], clip_denoised=True, **kw)
    torch.testing.assert_close(REC["outs"][0][1], torch.ones(1, 2))
    # the mask's known region is blended into the model's input at every call
    seen = []

    def spy(x_in, t):
        seen.append(x_in.clone())
        return torch.zeros_like(x_in)

    x0, mask = torch.tensor([[0.5, -0.5]]), torch.tensor([[1.0, 0.0]])
    g = torch.Generator().manual_seed(6)
    sample(spy, torch.full((1, 2), 2.0), sampler="test_rec_ve", steps=1, sigmas=[4.0, 0.0],
           alphas_cumprod=AC, x0=x0, mask=mask, calls=1, generator=g, disable=True)  # fmt: skip
    z = torch.randn(1, 2, generator=torch.Generator().manual_seed(6))
    c_in = 1 / math.sqrt(17.0)
    expected = torch.tensor([[(0.5 + 4.0 * float(z[0, 0])) * c_in, 8.0 * c_in]])
    torch.testing.assert_close(seen[-1], expected)


def test_driver_errors_name_the_sampler_and_need_x0():
    with pytest.raises(ValueError, match="'euler' got unknown option"):
        sample(zero, torch.ones(1, 2), sampler="euler", steps=2, alphas_cumprod=AC, churn=1.0)
    with pytest.raises(ValueError, match="need x0"):
        sample(zero, torch.ones(1, 2), sampler="euler", steps=2, alphas_cumprod=AC,
               mask=torch.ones(1, 2))  # fmt: skip


def test_registered_sampler_defaults_to_eps(solvers):
    def model(x, t):
        return torch.full_like(x, 0.5)

    x = torch.ones(1, 2)
    SAMPLERS["test_rec_ve"](model, x, steps=1, sigmas=[2.0, 0.0], alphas_cumprod=AC, calls=1)
    assert REC["model"].denoiser.parameterization == "eps"
    torch.testing.assert_close(REC["outs"][0], 2.0 * x - 2.0 * 0.5)  # eps: D = x - sigma F
