"""Other names of the samplers (k-diffusion / ComfyUI, A1111, diffusers scheduler classes): each
resolves to the registered function with the options its name implies; Karras names equal
karras=True; names we lack and unknown names say so."""

from __future__ import annotations

import pytest
import torch

from ldm.diffusion import alphas_cumprod_from_betas, make_beta_schedule
from ldm.engine.defaults import check_sampling_defaults, resolve_sampling
from ldm.samplers import SAMPLERS, get_sampler, resolve_sampler, sample
from ldm.samplers.aliases import ALIASES, ALIASES_WITH_OPTIONS, NOT_IMPLEMENTED

AC = alphas_cumprod_from_betas(make_beta_schedule("linear", 1000, 0.00085, 0.012))

EXPECTED = {
    # k-diffusion / ComfyUI
    "euler_ancestral": "euler_a",
    "dpm_2_ancestral": "dpm_2_a",
    "dpmpp_2s_ancestral": "dpmpp_2s_a",
    "lms": "lms",
    "dpm_adaptive": "dpm_adaptive",
    "sample_euler_ancestral": "euler_a",
    # A1111 labels
    "Euler a": "euler_a",
    "Euler": "euler",
    "LMS": "lms",
    "Heun": "heun",
    "DPM2": "dpm_2",
    "DPM2 a": "dpm_2_a",
    "DPM++ 2S a": "dpmpp_2s_a",
    "DPM++ 2M": "dpmpp_2m",
    "DPM++ SDE": "dpmpp_sde",
    "DPM++ 2M SDE": "dpmpp_2m_sde",
    "DPM++ 3M SDE": "dpmpp_3m_sde",
    "DDIM": "ddim",
    "PLMS": "plms",
    "UniPC": "unipc",
    # k-diffusion-era scripts
    "k_euler_a": "euler_a",
    "k_lms": "lms",
    "k_euler": "euler",
    "k_heun": "heun",
    "k_dpm_2": "dpm_2",
    "k_dpm_2_a": "dpm_2_a",
    # DPM-Solver flags
    "dpm_solver": "dpmpp_2m",
    "dpm_solver++": "dpmpp_2m",
    # diffusers scheduler classes
    "DDIMScheduler": "ddim",
    "PNDMScheduler": "plms",
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_a",
    "HeunDiscreteScheduler": "heun",
    "LMSDiscreteScheduler": "lms",
    "KDPM2DiscreteScheduler": "dpm_2",
    "KDPM2AncestralDiscreteScheduler": "dpm_2_a",
    "DPMSolverMultistepScheduler": "dpmpp_2m",
    "UniPCMultistepScheduler": "unipc",
    "DDPMScheduler": "ddpm",
}


def toy(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return 0.5 * torch.tanh(x) + 0.001 * t.reshape(-1, *[1] * (x.ndim - 1))  # [B, 1, ...]


def test_alias_tables_point_at_registered_samplers():
    targets = [*ALIASES.values(), *(t for t, _ in ALIASES_WITH_OPTIONS.values())]
    assert set(targets) <= set(SAMPLERS)
    assert set(NOT_IMPLEMENTED.values()) <= set(SAMPLERS)
    assert not set(NOT_IMPLEMENTED) & (set(ALIASES) | set(SAMPLERS))


@pytest.mark.parametrize("name,canonical", sorted(EXPECTED.items()))
def test_each_alias_resolves_to_the_canonical_function_and_options(name, canonical):
    assert resolve_sampler(name) == (canonical, {})
    assert get_sampler(name) is SAMPLERS[canonical]
    assert resolve_sampler(name.upper()) == resolve_sampler(f"  {name.lower()} ") == (canonical, {})


@pytest.mark.parametrize(
    "name,canonical",
    [
        ("DPM++ 2M Karras", "dpmpp_2m"),
        ("dpmpp_2m_karras", "dpmpp_2m"),
        ("LMS Karras", "lms"),
        ("DPM2 a Karras", "dpm_2_a"),
        ("DPM++ SDE Karras", "dpmpp_sde"),
        ("k_euler_a_karras", "euler_a"),
        ("euler_ancestral_karras", "euler_a"),
    ],
)
def test_karras_names_imply_karras_sigmas(name, canonical):
    assert resolve_sampler(name) == (canonical, {"karras": True})
    assert resolve_sampler(name, {"karras": True, "eta": 0.5}) == (
        canonical,
        {"karras": True, "eta": 0.5},
    )
    with pytest.raises(ValueError, match="karras=True, but karras=False was given"):
        resolve_sampler(name, {"karras": False})
    with pytest.raises(ValueError, match="the function alone cannot carry"):
        get_sampler(name)  # would drop the Karras sigmas


def test_comfyui_uni_pc_is_unipc_bh1():
    assert resolve_sampler("uni_pc") == ("unipc", {"variant": "bh1"})
    assert resolve_sampler("uni_pc_bh2") == ("unipc", {})


def test_karras_from_the_name_samples_like_passing_karras():
    x_T = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
    kw = dict(steps=4, alphas_cumprod=AC)
    named = sample(toy, x_T, sampler="DPM++ 2M Karras", **kw)
    explicit = sample(toy, x_T, sampler="dpmpp_2m", karras=True, **kw)
    both = sample(toy, x_T, sampler="dpmpp_2m_karras", karras=True, **kw)
    plain = sample(toy, x_T, sampler="dpmpp_2m", **kw)
    assert torch.equal(named, explicit) and torch.equal(both, explicit)
    assert not torch.allclose(named, plain)  # the ladder did change


@pytest.mark.parametrize(
    "name,closest",
    [
        ("dpm_fast", "dpm_adaptive"),
        ("DPM fast", "dpm_adaptive"),
        ("DPMSolverSinglestepScheduler", "dpmpp_2m"),
        ("DEISMultistepScheduler", "dpmpp_2m"),
        ("LCMScheduler", "euler_a"),
    ],
)
def test_known_names_we_lack_name_the_closest(name, closest):
    with pytest.raises(
        ValueError, match=f"'{name}' is not implemented here; the closest is '{closest}'"
    ):
        resolve_sampler(name)


def test_unknown_names_suggest_and_list():
    with pytest.raises(ValueError) as err:
        get_sampler("eulr_a")
    msg = str(err.value)
    assert "unknown sampler 'eulr_a' (did you mean 'euler_a'?)" in msg
    assert all(name in msg for name in ("ddim", "dpmpp_2m", "unipc"))


def test_generate_settings_resolve_aliases_and_karras():
    class Model:
        sampling_defaults = {"sampler": "dpmpp_2m", "options": {"karras": False}, "steps": 3}

    name, steps, _, opts = resolve_sampling(Model(), "DPM++ 2M Karras", None, 2.0, {})
    assert (name, steps, opts) == ("dpmpp_2m", 3, {"karras": True})  # the name beats the record
    name, _, _, opts = resolve_sampling(Model(), "DDIMScheduler", None, 2.0, {"eta": 0.0})
    assert (name, opts) == ("ddim", {"eta": 0.0})
    with pytest.raises(ValueError, match="karras=False"):
        resolve_sampling(Model(), "dpmpp_2m_karras", None, 2.0, {"karras": False})
    stored = check_sampling_defaults({"sampler": "Euler a Karras", "options": {"eta": 1.0}})
    assert stored == {"sampler": "euler_a", "options": {"eta": 1.0, "karras": True}}
