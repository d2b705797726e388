"""Discretizations of the noise axis, apart from any solver: the VP schedule as a sigma ladder,
timestep spacings, Karras and exponential sigmas, zero terminal SNR, img2img truncation.

``DiscreteSchedule``: sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) of a discrete VP schedule;
fractional timesteps interpolate log(sigma) between neighbouring integer timesteps (k-diffusion's
``DiscreteSchedule``), ``interpolation="linear"`` interpolates sigma itself (diffusers' Euler family
with ``interpolation_type="linear"``). ``sigma_to_t`` is the exact inverse of ``t_to_sigma``.

Spacings follow the diffusers scheduler with the same family (Lin et al. 2023, arXiv 2305.08891,
Table 2): ``style="k"`` (DDIM, PNDM, Euler/Heun/LMS family): ``linspace`` = N points from T-1 to 0
(fractional), ``leading`` = k * (T // N) + offset, ``trailing`` = round(T - k * T / N) - 1.
``style="dpm"`` (DPMSolverMultistep, UniPC): ``linspace`` = N+1 rounded points from T-1 to 0 without
the last, ``leading`` = k * (T // (N + 1)) + offset without the last, ``trailing`` as above.

``Ladder``: the levels a solver walks, each with its sigma, its (possibly fractional) timestep and
alpha_bar, ending in the target level (sigma 0, or sigma(t=0) = the last training level).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

# alpha_bar floor used for a zero-terminal-SNR schedule (sigma would be infinite), as diffusers does.
ZERO_SNR_ALPHA_BAR = 2.0**-24


class DiscreteSchedule:
    """sigma(t) on t in [0, T-1] from ``alphas_cumprod`` [T] (float64, CPU)."""

    def __init__(self, alphas_cumprod: torch.Tensor, interpolation: str = "log") -> None:
        if interpolation not in ("log", "linear"):
            raise ValueError(f"interpolation must be 'log' or 'linear', got {interpolation!r}")
        ac = torch.as_tensor(alphas_cumprod).detach().to("cpu", torch.float64).flatten()
        if ac.numel() < 2:
            raise ValueError(f"alphas_cumprod needs at least 2 entries, got {ac.numel()}")
        self.alphas_cumprod_exact = ac  # alpha_bar as trained (may end in 0)
        self.alphas_cumprod = ac.clamp(min=ZERO_SNR_ALPHA_BAR)
        self.sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()
        self.log_sigmas = self.sigmas.log()
        self.interpolation = interpolation
        self._table = self.log_sigmas if interpolation == "log" else self.sigmas

    @property
    def num_timesteps(self) -> int:
        return self.sigmas.numel()

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def t_to_sigma(self, t: torch.Tensor | float) -> torch.Tensor:
        """sigma at (fractional) timesteps t, interpolated in log-sigma (or sigma) space."""
        t = torch.as_tensor(t, dtype=torch.float64).clamp(0, self.num_timesteps - 1)
        lo = t.floor().long()
        hi = t.ceil().long()
        w = t - lo
        v = (1 - w) * self._table[lo] + w * self._table[hi]
        return v.exp() if self.interpolation == "log" else v

    def sigma_to_t(self, sigma: torch.Tensor | float) -> torch.Tensor:
        """(fractional) timestep of noise level sigma; inverse of ``t_to_sigma`` (clamped to [0, T-1])."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        v = sigma.clamp(min=1e-300).log() if self.interpolation == "log" else sigma
        table = self._table
        lo = (torch.searchsorted(table, v.reshape(-1), right=True) - 1).clamp(0, table.numel() - 2)
        lo = lo.reshape(v.shape)
        w = ((v - table[lo]) / (table[lo + 1] - table[lo])).clamp(0, 1)
        return lo + w


TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")


def spaced_timesteps(
    spacing: str,
    steps: int,
    num_timesteps: int,
    steps_offset: int = 0,
    style: str = "k",
) -> np.ndarray:
    """Descending inference timesteps [steps] (float64; fractional only for ``style="k"`` linspace)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    T, N = num_timesteps, steps
    if style not in ("k", "dpm"):
        raise ValueError(f"style must be 'k' or 'dpm', got {style!r}")
    if spacing == "linspace":
        if style == "k":
            ts = np.linspace(0, T - 1, N, dtype=np.float64)[::-1]
        else:
            ts = np.linspace(0, T - 1, N + 1).round()[::-1][:-1]
    elif spacing == "leading":
        if style == "k":
            ts = (np.arange(0, N) * (T // N)).round()[::-1] + steps_offset
        else:
            ts = (np.arange(0, N + 1) * (T // (N + 1))).round()[::-1][:-1] + steps_offset
    elif spacing == "trailing":
        ts = np.arange(T, 0, -T / N).round() - 1
    else:
        raise ValueError(
            f"unknown timestep_spacing {spacing!r}; expected one of {list(TIMESTEP_SPACINGS)}"
        )
    ts = np.array(ts, dtype=np.float64)  # a copy: positive strides for torch.from_numpy
    if ts.max() > T - 1 or ts.min() < 0:
        raise ValueError(
            f"timesteps from {ts.max():g} down to {ts.min():g} leave [0, {T - 1}] (spacing={spacing!r}, steps={N}, "
            f"steps_offset={steps_offset}); lower steps_offset or steps"
        )
    return ts


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """sigma_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho (EDM eq. 5)."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def exponential_sigmas(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """Sigmas evenly spaced in log(sigma) from sigma_max to sigma_min."""
    return torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64).exp()


def build_sigmas(
    schedule: DiscreteSchedule,
    steps: int,
    *,
    karras: bool = False,
    exponential: bool = False,
    rho: float = 7.0,
    timestep_spacing: str = "linspace",
    steps_offset: int = 0,
    style: str = "k",
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    final_sigma: str = "zero",
) -> torch.Tensor:
    """Descending noise levels [steps + 1] (float64) ending in 0 (or sigma(t=0) for final_sigma="sigma_min").

    Karras / exponential ladders span [sigma_min, sigma_max] of the whole training schedule unless
    given; otherwise sigma is read off the spaced timesteps through the schedule's interpolation.
    """
    if karras and exponential:
        raise ValueError("choose at most one of karras=True and exponential=True")
    lo = schedule.sigma_min if sigma_min is None else float(sigma_min)
    hi = schedule.sigma_max if sigma_max is None else float(sigma_max)
    if karras:
        sig = karras_sigmas(steps, lo, hi, rho)
    elif exponential:
        sig = exponential_sigmas(steps, lo, hi)
    else:
        ts = spaced_timesteps(timestep_spacing, steps, schedule.num_timesteps, steps_offset, style)
        sig = schedule.t_to_sigma(torch.from_numpy(ts))
    if final_sigma == "zero":
        last = 0.0
    elif final_sigma == "sigma_min":
        last = schedule.sigma_min
    else:
        raise ValueError(f"final_sigma must be 'zero' or 'sigma_min', got {final_sigma!r}")
    return torch.cat([sig, sig.new_tensor([last])])


FINAL_SIGMAS = ("zero", "sigma_min")


@dataclass(frozen=True)
class Level:
    """One noise level: sigma, its timestep on a discrete schedule (None off one) and alpha_bar."""

    sigma: float
    t: float | None
    alpha_bar: float


@dataclass
class Ladder:
    """Descending levels; a solver steps from each level to the next, ending at ``levels[-1]``."""

    levels: list[Level]

    @property
    def sigmas(self) -> list[float]:
        return [lv.sigma for lv in self.levels]

    @property
    def steps(self) -> int:
        return len(self.levels) - 1

    def from_strength(self, strength: float) -> Ladder:
        """The last ``int(steps * strength)`` steps (img2img starts part-way down; diffusers' rule)."""
        return Ladder(self.levels[img2img_start(self.steps, strength) :])

    def switch_index(self, fraction: float, num_timesteps: int) -> int:
        """Steps taken before the hand-off at ``fraction`` of the noise levels (diffusers'
        ``denoising_end`` / ``denoising_start``): those from levels with timestep t >=
        round(T - fraction * T)."""
        if not 0.0 < float(fraction) < 1.0:
            raise ValueError(f"denoising_start / denoising_end must be in (0, 1), got {fraction}")
        if any(lv.t is None for lv in self.levels[:-1]):
            raise ValueError(
                "a hand-off at a fraction of the noise levels needs a ladder on a discrete "
                "schedule (levels with timesteps)"
            )
        cutoff = int(round(num_timesteps - float(fraction) * num_timesteps))
        return sum(1 for lv in self.levels[:-1] if lv.t >= cutoff)

    def until(self, fraction: float, num_timesteps: int) -> Ladder:
        """The steps before the hand-off; the solver ends at the first level after it."""
        return Ladder(self.levels[: self.switch_index(fraction, num_timesteps) + 1])

    def after(self, fraction: float, num_timesteps: int) -> Ladder:
        """The steps from the hand-off on (a refiner continues the base's ladder)."""
        return Ladder(self.levels[self.switch_index(fraction, num_timesteps) :])


def img2img_start(steps: int, strength: float) -> int:
    """Index of the first step kept for img2img at ``strength`` (diffusers: keep int(steps * strength))."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    return steps - min(int(steps * strength), steps)


def vp_timesteps(
    steps: int,
    num_timesteps: int,
    timestep_spacing: str = "leading",
    steps_offset: int | None = None,
) -> list[int]:
    """Descending integer timesteps; ``steps_offset=None`` means 1 for "leading" (CompVis/SD) when it fits."""
    if steps_offset is None:
        fits = (steps - 1) * (num_timesteps // steps) + 1 <= num_timesteps - 1
        steps_offset = 1 if timestep_spacing == "leading" and fits else 0
    ts = spaced_timesteps(timestep_spacing, steps, num_timesteps, steps_offset, style="k")
    return [int(t) for t in ts.round()]


def make_ladder(
    steps: int,
    *,
    schedule: DiscreteSchedule | None = None,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    karras: bool = False,
    exponential: bool = False,
    rho: float = 7.0,
    timestep_spacing: str = "linspace",
    steps_offset: int | None = 0,
    style: str = "k",
    final_sigma: str = "zero",
    integer_timesteps: bool = False,
    round_timesteps: bool = False,
    sigmas: torch.Tensor | list[float] | None = None,
    timesteps: list[int] | None = None,
) -> Ladder:
    """Levels [steps + 1] for a discrete VP ``schedule`` or, without one, a continuous sigma range.

    ``sigmas`` / ``timesteps`` give the ladder explicitly (``sigmas`` includes its last level).
    Karras / exponential ladders span [sigma_min, sigma_max] (default: the schedule's whole range).
    A timestep spacing needs a discrete schedule; ``integer_timesteps`` rounds its timesteps
    (DDPM/DDIM/PLMS), ``round_timesteps`` rounds the timesteps of a sigma ladder (diffusers'
    multistep schedulers with Karras sigmas).
    """
    if karras and exponential:
        raise ValueError("choose at most one of karras=True and exponential=True")
    if final_sigma not in FINAL_SIGMAS:
        raise ValueError(f"final_sigma must be one of {list(FINAL_SIGMAS)}, got {final_sigma!r}")
    if schedule is None:
        if sigma_min is None or sigma_max is None:
            raise ValueError("a ladder without a discrete schedule needs sigma_min and sigma_max")
        if timesteps is not None or not (karras or exponential or sigmas is not None):
            raise ValueError(
                f"timestep_spacing={timestep_spacing!r} / timesteps need a model trained on discrete "
                "timesteps; this model is sigma-conditioned (EDM / VE): use karras=True or "
                "exponential=True (or give sigmas=[...])"
            )
    if sigmas is not None:
        sig = [float(s) for s in torch.as_tensor(sigmas, dtype=torch.float64).flatten()]
        return Ladder([_level(s, schedule, round_timesteps) for s in sig])
    if schedule is not None and timesteps is None and not (karras or exponential):
        if integer_timesteps:
            timesteps = vp_timesteps(steps, schedule.num_timesteps, timestep_spacing, steps_offset)
    if timesteps is not None:
        levels = [_discrete_level(schedule, int(t)) for t in timesteps]
    elif schedule is not None and not (karras or exponential):
        ts = spaced_timesteps(
            timestep_spacing, steps, schedule.num_timesteps, steps_offset or 0, style
        )
        sig = schedule.t_to_sigma(torch.from_numpy(ts))
        levels = [_level(float(s), schedule, round_timesteps, float(t)) for s, t in zip(sig, ts)]
    else:
        # without a schedule sigma_min and sigma_max were checked above to be given
        lo = schedule.sigma_min if sigma_min is None else sigma_min
        hi = schedule.sigma_max if sigma_max is None else sigma_max
        sig = karras_sigmas(steps, lo, hi, rho) if karras else exponential_sigmas(steps, lo, hi)
        levels = [_level(float(s), schedule, round_timesteps) for s in sig]
    if final_sigma == "zero":
        last = Level(0.0, None, 1.0)
    elif schedule is not None:
        last = _discrete_level(schedule, 0)
    else:
        last = _level(float(sigma_min), None, False)
    return Ladder(levels + [last])


def _discrete_level(schedule: DiscreteSchedule, t: int) -> Level:
    """Level at an integer timestep: alpha_bar exactly as trained (0 allowed: zero terminal SNR)."""
    return Level(float(schedule.sigmas[t]), t, float(schedule.alphas_cumprod_exact[t]))


def _level(
    sigma: float, schedule: DiscreteSchedule | None, round_t: bool, t: float | None = None
) -> Level:
    if sigma == 0:
        return Level(0.0, None, 1.0)
    if schedule is not None and t is None:
        t_val = schedule.sigma_to_t(sigma)
        t = float(t_val.round() if round_t else t_val)
    return Level(sigma, t, 1.0 / (1.0 + sigma**2))
