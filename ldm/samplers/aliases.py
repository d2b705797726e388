"""Other names of our samplers: k-diffusion / ComfyUI, A1111 labels, diffusers scheduler classes.

Names are matched case-insensitively with runs of spaces collapsed. A `` Karras`` / ``_karras``
suffix (A1111 "DPM++ 2M Karras", ComfyUI-style "dpmpp_2m_karras") means the same sampler with
Karras sigmas (``karras=True``; Karras et al. 2022, eq. 5). A name maps here only when it is the
same algorithm; a well-known name we do not implement gets its own message naming the closest
sampler we have (``NOT_IMPLEMENTED``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ldm.util import did_you_mean

#: other name (lower case) -> registered sampler name
ALIASES: dict[str, str] = {
    # k-diffusion functions (sample_<name>) and ComfyUI's KSampler names
    "euler_ancestral": "euler_a",
    "dpm_2_ancestral": "dpm_2_a",
    "dpmpp_2s_ancestral": "dpmpp_2s_a",
    "uni_pc_bh2": "unipc",
    # ComfyUI's *_gpu: the same solver, the Brownian noise drawn on the accelerator
    "dpmpp_sde_gpu": "dpmpp_sde",
    "dpmpp_2m_sde_gpu": "dpmpp_2m_sde",
    "dpmpp_3m_sde_gpu": "dpmpp_3m_sde",
    # k-diffusion-era scripts (lstein / InvokeAI, hlky)
    "k_euler": "euler",
    "k_euler_a": "euler_a",
    "k_heun": "heun",
    "k_lms": "lms",
    "k_dpm_2": "dpm_2",
    "k_dpm_2_a": "dpm_2_a",
    # the CompVis / Stability scripts' --dpm_solver: DPM-Solver++(2M)
    "dpm_solver": "dpmpp_2m",
    "dpm_solver++": "dpmpp_2m",
    "dpm-solver": "dpmpp_2m",
    "dpm-solver++": "dpmpp_2m",
    # AUTOMATIC1111 web UI labels
    "euler a": "euler_a",
    "dpm2": "dpm_2",
    "dpm2 a": "dpm_2_a",
    "dpm++ 2s a": "dpmpp_2s_a",
    "dpm++ 2m": "dpmpp_2m",
    "dpm++ sde": "dpmpp_sde",
    "dpm++ 2m sde": "dpmpp_2m_sde",
    "dpm++ 3m sde": "dpmpp_3m_sde",
    "dpm adaptive": "dpm_adaptive",
    # diffusers scheduler classes (their defaults: DPM-Solver++ of order 2, UniPC bh2, PNDM = PLMS)
    "ddimscheduler": "ddim",
    "ddpmscheduler": "ddpm",
    "pndmscheduler": "plms",
    "eulerdiscretescheduler": "euler",
    "eulerancestraldiscretescheduler": "euler_a",
    "heundiscretescheduler": "heun",
    "lmsdiscretescheduler": "lms",
    "kdpm2discretescheduler": "dpm_2",
    "kdpm2ancestraldiscretescheduler": "dpm_2_a",
    "dpmsolvermultistepscheduler": "dpmpp_2m",
    "dpmsolversdescheduler": "dpmpp_sde",
    "unipcmultistepscheduler": "unipc",
}

#: other name (lower case) -> (registered sampler, the options the name implies)
ALIASES_WITH_OPTIONS: dict[str, tuple[str, dict[str, Any]]] = {
    "uni_pc": ("unipc", {"variant": "bh1"}),  # ComfyUI's uni_pc is UniPC-bh1
}

#: well-known name (lower case) we do not implement -> the closest sampler we have
NOT_IMPLEMENTED: dict[str, str] = {
    "dpm_fast": "dpm_adaptive",
    "dpm fast": "dpm_adaptive",
    "dpmsolversinglestepscheduler": "dpmpp_2m",
    "deismultistepscheduler": "dpmpp_2m",
    "deis": "dpmpp_2m",
    "lcmscheduler": "euler_a",
    "lcm": "euler_a",
    "dpm++ 2m sde heun": "dpmpp_2m_sde",
    "heunpp2": "heun",
    "ipndm": "plms",
    "restart": "heun",
}

KARRAS_SUFFIXES = (" karras", "_karras")


def _key(name: str) -> str:
    return " ".join(name.strip().lower().split())


def _lookup(key: str, registered: Mapping[str, Any]) -> tuple[str, dict[str, Any]] | None:
    by_lower = {n.lower(): n for n in registered}
    for candidate in (key, key.removeprefix("sample_")):
        if candidate in by_lower:
            return by_lower[candidate], {}
        if candidate in ALIASES and ALIASES[candidate] in registered:
            return ALIASES[candidate], {}
        if candidate in ALIASES_WITH_OPTIONS and ALIASES_WITH_OPTIONS[candidate][0] in registered:
            target, options = ALIASES_WITH_OPTIONS[candidate]
            return target, dict(options)
    return None


def resolve_sampler_name(name: str, registered: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """(the registered sampler ``name`` means, the options it implies, e.g. ``{"karras": True}``).

    An unknown name raises ValueError naming the valid ones (and a close match); a well-known name
    we do not implement raises ValueError naming the closest sampler we have.
    """
    if not isinstance(name, str):
        raise ValueError(
            f"sampler name must be a string, got {name!r}; valid names are: "
            f"{', '.join(sorted(registered))}"
        )
    if name in registered:
        return name, {}
    key = _key(name)
    found = _lookup(key, registered)
    if found is not None:
        return found
    base = next((key[: -len(s)] for s in KARRAS_SUFFIXES if key.endswith(s)), None)
    if base:
        found = _lookup(base, registered)
        if found is not None:
            return found[0], {**found[1], "karras": True}
    for k in (key, base):
        if k in NOT_IMPLEMENTED:
            raise ValueError(
                f"sampler {name!r} is not implemented here; the closest is "
                f"'{NOT_IMPLEMENTED[k]}'. Valid names are: {', '.join(sorted(registered))}"
            )
    candidates = [*registered, *ALIASES, *ALIASES_WITH_OPTIONS]
    raise ValueError(
        f"unknown sampler {name!r}{did_you_mean(key, candidates)}; valid names are: "
        f"{', '.join(sorted(registered))} (k-diffusion, ComfyUI, A1111 and diffusers scheduler "
        "names work too, see ldm.samplers.aliases)"
    )


def merge_name_options(
    name: str, implied: Mapping[str, Any], options: Mapping[str, Any]
) -> dict[str, Any]:
    """``options`` plus what the sampler ``name`` implies; an explicit option that contradicts the
    name (``karras=False`` with "DPM++ 2M Karras") raises ValueError naming both."""
    for key, value in implied.items():
        if key in options and options[key] != value:
            raise ValueError(
                f"sampler {name!r} means {key}={value!r}, but {key}={options[key]!r} was given; "
                f"drop one of them (or name the sampler without the {key} part)"
            )
    return {**options, **implied}
