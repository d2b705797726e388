"""SDXL on the composed engine: the official config builds with the reference keys, the
conditioning vector is what the paper and diffusers compute, refiner hand-off, fp32 first stage."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from tiny_sdxl import POOLED, build_tiny_sdxl

from ldm.util import instantiate_from_config

ROOT = Path(__file__).parents[2]
DATA = ROOT / "tests" / "data"


def reference_shapes() -> dict[str, tuple[int, ...]]:
    out = {}
    for line in (DATA / "sdxl-base.tsv").read_text().splitlines()[1:]:
        key, shape = line.split("\t")
        out[key] = tuple(int(x) for x in shape.split("x")) if shape else ()
    return out


def test_official_sdxl_base_config_builds_with_the_reference_keys() -> None:
    """sd_xl_base.yaml as published (sgm.* targets): exactly the keys and shapes of the file."""
    cfg = OmegaConf.load(ROOT / "configs" / "stable-diffusion" / "sdxl-base.yaml")
    with torch.device("meta"):
        model = instantiate_from_config(cfg.model)
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert own == reference_shapes()
    unet = sum(p.numel() for p in model.model.parameters())
    assert unet == 2_567_463_684  # the published U-Net size
    assert model.scale_factor == pytest.approx(0.13025)
    assert model.first_stage_fp32 and model.model.conditioning_key == "crossattn-adm"
    assert model.latent_shape() == (4, 128, 128)  # 1024 x 1024 by default


def test_refiner_config_layout() -> None:
    cfg = OmegaConf.load(ROOT / "configs" / "stable-diffusion" / "sdxl-refiner.yaml")
    with torch.device("meta"):
        model = instantiate_from_config(cfg.model)
    sd = model.state_dict()
    prefixes = {".".join(k.split(".")[:3]) for k in sd if k.startswith("conditioner.")}
    assert prefixes == {"conditioner.embedders.0"}
    assert sd["conditioner.embedders.0.model.text_projection"].shape == (1280, 1280)
    assert sd["model.diffusion_model.label_emb.0.0.weight"].shape == (1536, 2560)
    assert sd[
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"
    ].shape == (
        768,
        1280,
    )
    assert sd["model.diffusion_model.time_embed.0.weight"].shape == (1536, 384)
    # 4 transformer blocks per attention level
    assert "model.diffusion_model.input_blocks.4.1.transformer_blocks.3.norm1.weight" in sd


def fourier(value: float, dim: int = 256) -> torch.Tensor:
    """[cos(v w_i), sin(v w_i)], w_i = 10000^(-i / 128), written out by hand."""
    half = dim // 2
    w = [math.exp(-math.log(10000.0) * i / half) for i in range(half)]
    return torch.tensor([math.cos(value * x) for x in w] + [math.sin(value * x) for x in w])


def test_conditioning_vector_is_pooled_text_then_fourier_features_of_each_number() -> None:
    model = build_tiny_sdxl()
    inputs = {
        "txt": ["a red cube", "two blue balls"],
        "original_size_as_tuple": torch.tensor([[512.0, 768.0], [1024.0, 1024.0]]),
        "crop_coords_top_left": torch.tensor([[0.0, 64.0], [12.0, 0.0]]),
        "target_size_as_tuple": torch.tensor([[1024.0, 1024.0], [896.0, 1152.0]]),
    }
    cond = model.conditioner.encode(inputs)
    y = cond["c_adm"]
    assert y.shape == (2, POOLED + 6 * 256)
    clip, openclip = model.conditioner.embedders[0], model.conditioner.embedders[1]
    ctx_openclip, pooled = openclip(inputs["txt"])
    assert torch.allclose(y[:, :POOLED], pooled)
    for b in range(2):
        numbers = [
            *inputs["original_size_as_tuple"][b].tolist(),
            *inputs["crop_coords_top_left"][b].tolist(),
            *inputs["target_size_as_tuple"][b].tolist(),
        ]
        expected = torch.cat([fourier(v) for v in numbers])
        torch.testing.assert_close(
            y[b, POOLED:], expected, atol=2e-4, rtol=0
        )  # float32 angles up to 1152
    # cross-attention context: CLIP hidden states then OpenCLIP penultimate, along features
    ctx = cond["c_crossattn"][0]
    torch.testing.assert_close(ctx, torch.cat([clip(inputs["txt"]), ctx_openclip], dim=-1))


def test_openclip_penultimate_states_skip_ln_final_and_pool_at_the_end_token() -> None:
    model = build_tiny_sdxl()
    emb = model.conditioner.embedders[1]
    tokens = emb.tokenize(["a red cube"])
    m = emb.model
    x = m.token_embedding(tokens) + m.positional_embedding
    mask = m.attn_mask
    blocks = m.transformer.resblocks
    seq_first = not getattr(m.transformer, "batch_first", False)
    h = x.permute(1, 0, 2) if seq_first else x
    for blk in blocks[:-1]:
        h = blk(h, attn_mask=mask)
    penultimate = h
    last = blocks[-1](h, attn_mask=mask)
    if seq_first:
        penultimate, last = penultimate.permute(1, 0, 2), last.permute(1, 0, 2)
    eot = int(tokens[0].argmax())
    assert tokens[0, eot] == 49407  # <end_of_text>
    ctx, pooled = emb(tokens)
    torch.testing.assert_close(ctx, penultimate)
    torch.testing.assert_close(pooled[0], m.ln_final(last)[0, eot] @ m.text_projection)


def test_unconditional_text_is_zero_unless_a_negative_prompt_is_given() -> None:
    model = build_tiny_sdxl()
    inputs = {"txt": ["a red cube"] * 2}
    from ldm.engine.micro_conditioning import fill_micro_conditioning

    fill_micro_conditioning(model.conditioner.input_keys, inputs, 2, 32, 48, {})
    assert inputs["original_size_as_tuple"].tolist() == [[32.0, 48.0]] * 2
    assert inputs["crop_coords_top_left"].tolist() == [[0.0, 0.0]] * 2
    c = model.conditioner.encode(inputs)
    u = model.conditioner.uncond(inputs, 2)
    assert u["c_crossattn"][0].abs().max() == 0 and u["c_adm"][:, :POOLED].abs().max() == 0
    torch.testing.assert_close(u["c_adm"][:, POOLED:], c["c_adm"][:, POOLED:])  # sizes kept
    neg = model.conditioner.uncond(inputs, 2, negative_prompt="blurry")
    expected = model.conditioner.encode({**inputs, "txt": ["blurry"] * 2})
    torch.testing.assert_close(neg["c_crossattn"][0], expected["c_crossattn"][0])
    torch.testing.assert_close(neg["c_adm"], expected["c_adm"])


def test_caption_dropout_zeroes_the_text_embeddings_of_dropped_rows() -> None:
    model = build_tiny_sdxl()
    for e in model.conditioner.entries[:2]:
        e.ucg_rate = 0.5
    batch = {
        "txt": ["a red cube"] * 16,
        "original_size_as_tuple": torch.full((16, 2), 32),
        "crop_coords_top_left": torch.zeros(16, 2),
        "target_size_as_tuple": torch.full((16, 2), 32),
    }
    model.conditioner.drop(batch, torch.Generator().manual_seed(0))
    rows = [batch[f"__zero_embedding__.{i}"] for i in range(2)]
    assert 0 < int(rows[0].sum()) < 16 and not torch.equal(rows[0], rows[1])  # independent draws
    cond = model.conditioner.batch_condition(batch, None, None)
    ctx, y = cond["c_crossattn"][0], cond["c_adm"]
    for b in range(16):
        assert (ctx[b, :, :32].abs().sum() == 0) == bool(rows[0][b])
        assert (ctx[b, :, 32:].abs().sum() == 0) == bool(rows[1][b])
        assert (y[b, :POOLED].abs().sum() == 0) == bool(rows[1][b])
    assert batch["txt"] == ["a red cube"] * 16  # the captions themselves are untouched


@pytest.mark.parametrize("sampler", ["euler", "ddim", "dpmpp_2m"])
def test_refiner_hand_off_equals_running_both_parts_by_hand(sampler: str) -> None:
    base, refiner = build_tiny_sdxl(), build_tiny_sdxl(refiner=True, seed=3)
    kw = {"sampler": sampler, "steps": 10, "guidance_scale": 3.0, "height": 32, "width": 32}
    lat = base.generate("a red cube", seed=0, output="latent", denoising_end=0.8, **kw)
    out = refiner.generate(
        "a red cube", x_T=lat, seed=0, output="latent", denoising_start=0.8, **kw
    )

    # by hand: the 10-step ladder of the base; timesteps >= round(1000 - 0.8 * 1000) = 200 run on
    # the base, the rest on the refiner, the latent handed over as x_0 + sigma * eps
    from ldm.diffusion.discretization import make_ladder

    den = base.denoiser
    from ldm.samplers.driver import SOLVERS

    keys = ("timestep_spacing", "steps_offset", "style", "final_sigma")
    defaults = {k: v for k, v in (SOLVERS[sampler].defaults or {}).items() if k in keys}
    ladder = make_ladder(
        10,
        schedule=den.schedule,
        sigma_min=den.sigma_min,
        sigma_max=den.sigma_max,
        integer_timesteps=sampler == "ddim",
        **defaults,
    )
    k = sum(1 for lv in ladder.levels[:-1] if lv.t >= 200)
    assert 0 < k < 10
    sig = [lv.sigma for lv in ladder.levels]
    lat2 = base.generate("a red cube", seed=0, output="latent", sigmas=sig[: k + 1], **kw)
    if sampler == "ddim":  # VP coordinates at the hand-off level -> VE
        lat2 = lat2 / math.sqrt(ladder.levels[k].alpha_bar)
    torch.testing.assert_close(lat, lat2, rtol=1e-4, atol=1e-4)
    # the refiner's part: the same ladder from level k on, started at the handed-over latent
    # (noise_scaling "sigma" starts at x_T * sigma_k: x_T = lat / sigma_k puts lat itself there)
    out2 = refiner.generate("a red cube", x_T=lat / sig[k], seed=0, output="latent",
                            sigmas=sig[k:], noise_scaling="sigma", **kw)  # fmt: skip
    torch.testing.assert_close(out, out2, rtol=1e-4, atol=1e-4)


def test_first_stage_decodes_in_fp32_when_the_model_runs_in_bf16() -> None:
    model = build_tiny_sdxl()
    z = torch.randn(1, 4, 8, 8)
    ref = model.decode_first_stage(z)
    model.to(torch.bfloat16)
    out = model.decode_first_stage(z.to(torch.bfloat16))
    assert out.dtype == torch.float32
    assert next(model.first_stage_model.parameters()).dtype == torch.float32
    assert next(model.model.parameters()).dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=0)  # only the bf16 round trip of weights


def test_a_deep_copy_encodes_with_its_own_embedders() -> None:
    import copy

    model = build_tiny_sdxl()
    twin = copy.deepcopy(model)
    assert twin.conditioner.engine is twin
    with torch.no_grad():
        for p in twin.conditioner.embedders[0].parameters():
            p.add_(1.0)
    inputs = {"txt": ["a red cube"]}
    from ldm.engine.micro_conditioning import fill_micro_conditioning

    fill_micro_conditioning(model.conditioner.input_keys, inputs, 1, 32, 32, {})
    a = model.conditioner.encode(inputs)["c_crossattn"][0]
    b = twin.conditioner.encode(inputs)["c_crossattn"][0]
    assert not torch.equal(a[..., :32], b[..., :32]) and torch.equal(a[..., 32:], b[..., 32:])
