"""Classifier-free guidance wrapper: formula, batching, structured conditioning, guidance_rescale."""

from __future__ import annotations

import math

import pytest
import torch

from ldm.diffusion import alphas_cumprod_from_betas, make_beta_schedule
from ldm.samplers import cfg_model_fn, rescale_guidance, sample


class CondModel:
    """out = tanh(x) * w(c) + c-dependent shift; counts calls and batch sizes."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    def __call__(self, x: torch.Tensor, t: torch.Tensor, c) -> torch.Tensor:
        if isinstance(c, dict):
            c = c["c_crossattn"][0]
        self.batches.append(x.shape[0])
        w = c.mean(dim=(1, 2)).reshape(-1, 1, 1, 1)  # [B, 1, 1, 1]
        return torch.tanh(x) * w + 0.01 * t.reshape(-1, 1, 1, 1)


def test_cfg_formula_batched_and_unbatched():
    m = CondModel()
    x, t = torch.randn(3, 2, 4, 4), torch.full((3,), 500.0)
    cond, uncond = torch.rand(3, 7, 5) + 1, torch.zeros(3, 7, 5)
    expected = m(x, t, uncond) + 7.5 * (m(x, t, cond) - m(x, t, uncond))
    m.batches.clear()
    torch.testing.assert_close(cfg_model_fn(m, cond, uncond, 7.5)(x, t), expected)
    assert m.batches == [6]
    torch.testing.assert_close(cfg_model_fn(m, cond, uncond, 7.5, batched=False)(x, t), expected)
    assert m.batches == [6, 3, 3]
    m.batches.clear()
    torch.testing.assert_close(cfg_model_fn(m, cond, uncond, 1.0)(x, t), m(x, t, cond))
    assert m.batches == [3, 3]  # scale 1: the conditional branch only (plus our reference call)


def test_cfg_with_compvis_dict_conditioning_and_negative_prompt():
    m = CondModel()
    x, t = torch.randn(2, 2, 4, 4), torch.full((2,), 10.0)
    cond = {"c_crossattn": [torch.rand(2, 7, 5) + 1]}
    negative = {"c_crossattn": [torch.rand(2, 7, 5) - 2]}  # a negative prompt is just the uncond
    out = cfg_model_fn(m, cond, negative, 3.0)(x, t)
    u, c = m(x, t, negative), m(x, t, cond)
    torch.testing.assert_close(out, u + 3.0 * (c - u))
    with pytest.raises(ValueError, match="same keys"):
        cfg_model_fn(m, cond, {"c_concat": [x]}, 3.0)(x, t)


def test_guidance_rescale_matches_diffusers_and_paper_eq16():
    sd = pytest.importorskip("diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion")
    guided, text = torch.randn(2, 4, 8, 8) * 3, torch.randn(2, 4, 8, 8)
    for phi in (0.0, 0.7, 1.0):
        ours = rescale_guidance(guided, text, phi)
        torch.testing.assert_close(ours, sd.rescale_noise_cfg(guided, text, guidance_rescale=phi))
    full = rescale_guidance(guided, text, 1.0)
    torch.testing.assert_close(full.std(dim=(1, 2, 3)), text.std(dim=(1, 2, 3)))


def test_guided_sampling_end_to_end():
    ac = alphas_cumprod_from_betas(make_beta_schedule("linear", 1000, 0.00085, 0.012))
    m = CondModel()
    cond, uncond = torch.rand(2, 7, 5) + 1, torch.zeros(2, 7, 5)
    z = torch.randn(2, 2, 4, 4)
    g1 = sample(
        cfg_model_fn(m, cond, uncond, 1.0), z, sampler="dpmpp_2m", steps=6, alphas_cumprod=ac
    )
    plain = sample(lambda x, t: m(x, t, cond), z, sampler="dpmpp_2m", steps=6, alphas_cumprod=ac)
    torch.testing.assert_close(g1, plain)
    g5 = sample(
        cfg_model_fn(m, cond, uncond, 5.0, guidance_rescale=0.7),
        z,
        sampler="dpmpp_2m",
        steps=6,
        alphas_cumprod=ac,
    )
    assert torch.isfinite(g5).all() and (g5 - plain).abs().max() > 1e-2


def test_cat_cond_none_only_with_none() -> None:
    from ldm.samplers.guidance import cat_cond

    t = torch.ones(1, 2)
    assert cat_cond(None, None) is None
    for a, b in ((None, t), (t, None)):
        with pytest.raises(TypeError):
            cat_cond(a, b)


def test_guidance_rescale_by_hand() -> None:
    """Lin et al. 2023 eq. 15-16: x_rescaled = phi * x_cfg * std(x_c) / std(x_cfg) + (1 - phi) x_cfg,
    here with std(x_cfg) < 1 (std over all but the batch dimension, unbiased)."""
    guided = torch.tensor([[0.1, -0.2, 0.3, 0.0]])
    cond = torch.tensor([[0.05, 0.0, -0.05, 0.1]])
    std = lambda v: math.sqrt(sum((x - sum(v) / 4) ** 2 for x in v) / 3)  # noqa: E731
    ratio = std(cond[0].tolist()) / std(guided[0].tolist())
    expect = 0.7 * guided * ratio + 0.3 * guided
    torch.testing.assert_close(rescale_guidance(guided, cond, 0.7), expect)


def test_guiders_pass_scale_rescale_and_batching() -> None:
    from ldm.samplers.guiders import ClassifierFreeGuidance, NoGuidance, guider_for

    calls: list[int] = []

    def net(x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        calls.append(len(x))
        return x * c

    x = torch.tensor([[1.0, 2.0, 3.0, 5.0]])
    t = torch.zeros(1)
    c, u = torch.tensor([[2.0]]), torch.tensor([[0.5]])
    out_c, out_u = x * 2.0, x * 0.5
    cfg = out_u + 3.0 * (out_c - out_u)
    d = [1, 2, 3, 5]
    m = sum(d) / 4
    sd = math.sqrt(sum((v - m) ** 2 for v in d) / 3)
    ratio = (2.0 * sd) / (5.0 * sd)  # std(x_c) / std(x_cfg): x_c = 2 x, x_cfg = 5 x
    expect = 0.5 * cfg * ratio + 0.5 * cfg
    g = ClassifierFreeGuidance(3.0, rescale=0.5, batched=False)
    torch.testing.assert_close(g.model_fn(net, c, u)(x, t), expect)
    assert calls == [1, 1]  # two single passes, not one batched pass
    calls.clear()
    torch.testing.assert_close(ClassifierFreeGuidance(3.0).model_fn(net, c, u)(x, t), cfg)
    assert calls == [2]
    assert isinstance(guider_for(1.0), NoGuidance)
    for scale, rescale in ((2.0, 0.0), (1.0, 0.5), (3.0, 0.7)):
        g = guider_for(scale, rescale)
        assert isinstance(g, ClassifierFreeGuidance)
        assert (g.scale, g.rescale) == (scale, rescale)


def test_no_and_multi_guidance_pass_the_timestep() -> None:
    from ldm.samplers.guiders import MultiGuidance, NoGuidance

    def net(x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return x * c + t.view(-1, 1)

    x, t = torch.tensor([[1.0, 2.0]]), torch.tensor([0.25])
    c, u = torch.tensor([[2.0]]), torch.tensor([[0.5]])
    torch.testing.assert_close(NoGuidance().model_fn(net, c)(x, t), x * 2 + 0.25)
    out_u, out_c = x * 0.5 + 0.25, x * 2 + 0.25
    torch.testing.assert_close(
        MultiGuidance([3.0]).model_fn(net, c, u)(x, t), out_u + 3.0 * (out_c - out_u)
    )
