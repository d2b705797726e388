"""The per-step callback carries ``total``: the solver steps of the call (txt2img and img2img)."""

from __future__ import annotations

import pytest
import torch

from ldm.diffusion import alphas_cumprod_from_betas, make_beta_schedule
from ldm.samplers import sample

AC = alphas_cumprod_from_betas(make_beta_schedule("linear", 1000, 0.00085, 0.012))


def toy(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return 0.5 * torch.tanh(x)


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m", "euler_a", "heun"])
def test_every_step_reports_the_total(sampler: str) -> None:
    seen: list[dict] = []
    sample(
        toy, torch.randn(1, 3), sampler=sampler, steps=6, alphas_cumprod=AC, callback=seen.append
    )
    assert [(d["i"], d["total"]) for d in seen] == [(i, 6) for i in range(6)]


def test_img2img_total_is_the_steps_run() -> None:
    seen: list[dict] = []
    x0 = torch.zeros(1, 3)
    sample(
        toy, torch.randn(1, 3), sampler="ddim", steps=10, alphas_cumprod=AC,
        x0=x0, strength=0.5, callback=seen.append,
    )  # fmt: skip
    assert len(seen) == seen[0]["total"] == 5
