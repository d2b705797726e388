"""Classifier-free guidance with a long prompt and a short negative prompt: the shorter context is
padded with empty-window chunks (the encoding of "") so cond and uncond batch together; SDXL's two
text encoders agree on the chunk count (or are padded to agree)."""

from __future__ import annotations

import pytest
import torch
from long_prompts import LONG
from tiny_models import build_tiny, tiny_ldm_config
from tiny_sdxl import CLIP_WIDTH, build_tiny_sdxl

from ldm.samplers.guidance import cat_cond

pytestmark = pytest.mark.usefixtures("one_thread")

SAMPLING = {"sampler": "ddim", "steps": 2, "guidance_scale": 3.0, "seed": 0, "output": "latent"}


def record_contexts(model) -> list[torch.Tensor]:
    """Replace ``model.apply_model`` by a wrapper that records the cross-attention contexts."""
    seen, apply = [], model.apply_model

    def recording(x, t, cond, *args, **kwargs):
        ctx = cond["c_crossattn"][0] if isinstance(cond, dict) else cond
        seen.append(ctx.detach().clone())
        return apply(x, t, cond, *args, **kwargs)

    model.apply_model = recording
    return seen


def sdxl_inputs(prompt: str) -> dict:
    sizes = torch.tensor([[32.0, 32.0]])
    return {"txt": [prompt], "original_size_as_tuple": sizes,
            "crop_coords_top_left": torch.zeros(1, 2), "target_size_as_tuple": sizes}  # fmt: skip


def test_sd_v1_long_prompt_with_short_negative_prompt():
    model = build_tiny(tiny_ldm_config())
    conditioner, text = model.conditioner, model.cond_stage_model
    inputs = {"txt": [LONG]}
    with torch.no_grad():
        cond = conditioner.encode(inputs)
        uncond = conditioner.uncond(inputs, 1, "short")
        assert (cond.shape[1], uncond.shape[1]) == (154, 77)
        padded_cond, padded_uncond = conditioner.match_lengths(cond, uncond)
        empty, short = text([""]), text(["short"])
    assert padded_cond is cond and padded_uncond.shape[1] == 154
    assert torch.equal(padded_uncond[:, :77], short)
    assert torch.equal(padded_uncond[:, 77:], empty)
    with pytest.raises(ValueError, match="differ in length.*match_lengths"):
        cat_cond(uncond, cond)

    seen = record_contexts(model)
    latent = model.generate(LONG, negative_prompt="short", **SAMPLING)
    assert torch.isfinite(latent).all() and len(seen) == 2
    for ctx in seen:  # one batched pass per step: [uncond, cond]
        assert ctx.shape == (2, 154, 32)
        torch.testing.assert_close(ctx[:1], padded_uncond, rtol=0, atol=0)
        torch.testing.assert_close(ctx[1:], cond, rtol=0, atol=0)
    # a long negative prompt and a short prompt: the prompt is padded instead
    seen.clear()
    model.generate("short", negative_prompt=LONG, **SAMPLING)
    assert torch.equal(seen[0][1:, 77:], empty)
    # ready conditionings of different lengths (as the image logger passes them)
    seen.clear()
    model.generate(cond=cond, uncond=uncond, **SAMPLING)
    assert torch.equal(seen[0][:1], padded_uncond)


def test_sdxl_two_encoders_long_prompt_with_short_negative_prompt():
    model = build_tiny_sdxl()
    conditioner = model.conditioner
    clip, bigg = conditioner.embedders[0], conditioner.embedders[1]
    inputs = sdxl_inputs(LONG)
    with torch.no_grad():
        cond = conditioner.encode(inputs)
        uncond = conditioner.uncond(inputs, 1, "short")
        ctx = cond["c_crossattn"][0]
        assert ctx.shape[1] == 154 and uncond["c_crossattn"][0].shape[1] == 77
        # both encoders chunk the prompt alike; their outputs side by side on the feature axis
        assert torch.equal(ctx[..., :CLIP_WIDTH], clip([LONG]))
        assert torch.equal(ctx[..., CLIP_WIDTH:], bigg([LONG])[0])
        _, padded = conditioner.match_lengths(cond, uncond)
        empty = torch.cat([clip([""]), bigg([""])[0]], dim=-1)
    u = padded["c_crossattn"][0]
    assert u.shape == ctx.shape
    assert torch.equal(u[:, :77], uncond["c_crossattn"][0])
    assert torch.equal(u[:, 77:], empty)
    assert torch.equal(padded["c_adm"], uncond["c_adm"])  # the vector part is untouched

    seen = record_contexts(model)
    latent = model.generate(LONG, negative_prompt="short", height=32, width=32, **SAMPLING)
    assert torch.isfinite(latent).all()
    assert seen[0].shape == (2, 154, ctx.shape[-1])
    torch.testing.assert_close(seen[0][:1], u, rtol=0, atol=0)


def test_sdxl_encoders_with_different_chunk_counts_are_padded_to_agree():
    model = build_tiny_sdxl()
    conditioner = model.conditioner
    clip, bigg = conditioner.embedders[0], conditioner.embedders[1]
    clip.max_chunks = 1  # CLIP-L truncates at 77, OpenCLIP keeps two chunks
    with torch.no_grad():
        ctx = conditioner.encode(sdxl_inputs(LONG))["c_crossattn"][0]
        assert ctx.shape[1] == 154
        assert torch.equal(ctx[:, :77, :CLIP_WIDTH], clip([LONG]))
        assert torch.equal(ctx[:, 77:, :CLIP_WIDTH], clip([""]))
        assert torch.equal(ctx[..., CLIP_WIDTH:], bigg([LONG])[0])
