"""apply_loras: a hand-written kohya file adds exactly its delta, scales add up, exit restores."""

from __future__ import annotations

import pytest
import torch
from lora_files import dyadic, expected_delta, write_kohya

from ldm.adapters.lora_apply import apply_loras

pytestmark = pytest.mark.usefixtures("one_thread")

U = "model.diffusion_model."
# SD v1 layout (kohya: diffusers module paths) -> our key, (down shape, up shape)
SD_MODULES = {
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (
        U + "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
        (4, 32),
        (32, 4),
    ),
    "lora_unet_down_blocks_0_attentions_0_proj_in": (
        U + "input_blocks.1.1.proj_in.weight",
        (4, 32, 1, 1),
        (32, 4, 1, 1),
    ),
    "lora_unet_up_blocks_1_resnets_0_conv1": (
        U + "output_blocks.2.0.in_layers.2.weight",
        (2, 96, 3, 3),
        (32, 2, 1, 1),
    ),
    "lora_te_text_model_encoder_layers_0_mlp_fc1": (
        "cond_stage_model.transformer.encoder.layers.0.mlp.fc1.weight",
        (4, 32),
        (64, 4),
    ),
}
# SDXL layout (kohya: original sgm module paths, te1 = CLIP, te2 = OpenCLIP)
SDXL_MODULES = {
    "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k": (
        U + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
        (4, 80),
        (32, 4),
    ),
    "lora_unet_input_blocks_1_0_in_layers_2": (
        U + "input_blocks.1.0.in_layers.2.weight",
        (2, 32, 3, 3),
        (32, 2, 1, 1),
    ),
    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (
        "conditioner.embedders.0.transformer.encoder.layers.0.self_attn.q_proj.weight",
        (4, 32),
        (32, 4),
    ),
    "lora_te2_text_model_encoder_layers_1_mlp_fc2": (
        "conditioner.embedders.1.model.transformer.resblocks.1.mlp.c_proj.weight",
        (4, 192),
        (48, 4),
    ),
}


def _factors(table: dict, seed: int, alpha: float = 8.0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {n: (dyadic(*d, gen=g), dyadic(*u, gen=g), alpha) for n, (_, d, u) in table.items()}


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(model: torch.nn.Module, snap: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())


@pytest.fixture(scope="module")
def sd_model():
    from tiny_models import build_tiny, tiny_ldm_config

    return build_tiny(tiny_ldm_config())


@pytest.fixture(scope="module")
def sdxl_model():
    from tiny_sdxl import build_tiny_sdxl

    return build_tiny_sdxl()


@pytest.mark.parametrize("which", ["sd", "sdxl"])
def test_kohya_file_adds_its_delta_and_exit_restores(which, sd_model, sdxl_model, tmp_path):
    model, table = (sd_model, SD_MODULES) if which == "sd" else (sdxl_model, SDXL_MODULES)
    factors = _factors(table, seed=1)
    path = write_kohya(tmp_path / "a.safetensors", factors)
    before = _snapshot(model)
    with apply_loras(model, [(path, 1.0)]) as merged:
        after = model.state_dict()
        assert sorted(merged.touched) == sorted(key for key, _, _ in table.values())
        for name, (key, _, _) in table.items():
            want = before[key] + expected_delta(*factors[name])
            assert torch.equal(after[key], want), name  # dyadic factors: exact
        untouched = [k for k in before if k not in merged.touched]
        assert all(torch.equal(after[k], before[k]) for k in untouched)
    assert _same(model, before)  # bit for bit


def test_scale_zero_is_no_lora_and_scales_add_up(sd_model, tmp_path):
    f1, f2 = _factors(SD_MODULES, seed=2), _factors(SD_MODULES, seed=3, alpha=2.0)
    p1 = write_kohya(tmp_path / "one.safetensors", f1)
    p2 = write_kohya(tmp_path / "two.safetensors", f2)
    before = _snapshot(sd_model)
    with apply_loras(sd_model, [(p1, 0.0)]):
        assert _same(sd_model, before)
    merged = apply_loras(sd_model, [(p1, 0.5), (p2, -1.5)])
    for name, (key, _, _) in SD_MODULES.items():
        want = before[key] + (0.5 * expected_delta(*f1[name]) - 1.5 * expected_delta(*f2[name]))
        assert torch.equal(sd_model.state_dict()[key], want), name
    merged.unmerge()
    assert _same(sd_model, before)


def test_merged_lora_changes_the_unet_output(sdxl_model, tmp_path):
    path = write_kohya(tmp_path / "a.safetensors", _factors(SDXL_MODULES, seed=4))
    unet = sdxl_model.model.diffusion_model
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500])
    adm = unet.label_emb[0][0].in_features
    ctx, y = torch.randn(1, 7, 80, generator=g), torch.randn(1, adm, generator=g)
    with torch.no_grad():
        base = unet(x, t, context=ctx, y=y)
        with apply_loras(sdxl_model, [(path, 1.0)]):
            lora = unet(x, t, context=ctx, y=y)
        again = unet(x, t, context=ctx, y=y)
    assert (lora - base).abs().max() > 1e-3
    assert torch.equal(again, base)


def test_bfloat16_weights_merge_in_their_dtype_and_restore_exactly(sdxl_model, tmp_path):
    import copy

    model = copy.deepcopy(sdxl_model).to(torch.bfloat16)
    factors = _factors(SDXL_MODULES, seed=5)
    path = write_kohya(tmp_path / "a.safetensors", factors)
    before = _snapshot(model)
    with apply_loras(model, [(path, 0.3)]):
        for name, (key, _, _) in SDXL_MODULES.items():
            got = model.state_dict()[key]
            assert got.dtype == torch.bfloat16
            want = before[key] + (0.3 * expected_delta(*factors[name])).to(torch.bfloat16)
            assert torch.equal(got, want), name
    assert _same(model, before)
