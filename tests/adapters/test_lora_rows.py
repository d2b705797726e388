"""OpenCLIP's packed `attn.in_proj_weight` (q | k | v rows): a LoRA on `k_proj` changes only the
middle third; q, k and v LoRAs combine on the one weight and split back into the three on save."""

from __future__ import annotations

import pytest
import torch
from lora_files import dyadic, expected_delta, shapes_of, write_kohya

from ldm.adapters.lora_apply import apply_loras
from ldm.adapters.lora_io import load_lora, save_lora
from ldm.adapters.lora_kohya import read_kohya
from ldm.checkpoint.safe_load import load_state_dict

pytestmark = pytest.mark.usefixtures("one_thread")

IN_PROJ = "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"
TE2 = "lora_te2_text_model_encoder_layers_0_self_attn_"
D = 48  # tiny OpenCLIP width: in_proj_weight is [3 * 48, 48]


@pytest.fixture(scope="module")
def model():
    from tiny_sdxl import build_tiny_sdxl

    return build_tiny_sdxl()


def _factors(projs: tuple[str, ...], seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {TE2 + p: (dyadic(4, D, gen=g), dyadic(D, 4, gen=g), 2.0) for p in projs}


def test_k_proj_changes_only_the_middle_third(model, tmp_path):
    factors = _factors(("k_proj",), seed=0)
    path = write_kohya(tmp_path / "k.safetensors", factors)
    lora = load_lora(path, shapes_of(model))
    assert lora.modules[IN_PROJ].rows == (D, 2 * D)
    before = model.state_dict()[IN_PROJ].clone()
    with apply_loras(model, [(lora, 1.0)]):
        after = model.state_dict()[IN_PROJ]
        assert torch.equal(after[:D], before[:D]) and torch.equal(after[2 * D :], before[2 * D :])
        want = before[D : 2 * D] + expected_delta(*factors[TE2 + "k_proj"])
        assert torch.equal(after[D : 2 * D], want)
    assert torch.equal(model.state_dict()[IN_PROJ], before)


def test_q_k_v_combine_on_one_weight_and_split_back_on_save(model, tmp_path):
    factors = _factors(("q_proj", "k_proj", "v_proj"), seed=1)
    shapes = shapes_of(model)
    lora = load_lora(write_kohya(tmp_path / "qkv.safetensors", factors), shapes)
    combined = lora.modules[IN_PROJ]
    assert combined.rows is None and combined.rank == 12 and combined.scale == 0.5
    want = torch.cat([expected_delta(*factors[TE2 + p]) for p in ("q_proj", "k_proj", "v_proj")])
    assert torch.equal(combined.delta(), want)
    for fmt in ("kohya", "diffusers"):
        out = save_lora(tmp_path / f"out_{fmt}.safetensors", lora.modules, shapes, format=fmt)
        back = load_lora(out, shapes)
        assert torch.equal(back.modules[IN_PROJ].delta(), want), fmt
    written = read_kohya(load_state_dict(tmp_path / "out_kohya.safetensors"), "out")
    assert set(written) == set(factors)
    for name, (down, up, alpha) in factors.items():
        assert torch.equal(written[name].down, down) and torch.equal(written[name].up, up)
        assert written[name].alpha == alpha


def test_combining_half_precision_parts_of_different_alphas_stays_exact():
    """up * scale of fp16 / bf16 parts is kept in float32: the combined delta is the sum of the
    parts' own deltas to float32 rounding, not to fp16's."""
    from ldm.adapters.lora_rows import combine_rows
    from ldm.adapters.lora_weights import LoraModule

    g = torch.Generator().manual_seed(3)
    parts = [
        LoraModule(
            torch.randn(4, D, generator=g).to(dt),
            torch.randn(D, 4, generator=g).to(dt),
            alpha,
            (i * D, (i + 1) * D),
        )  # fmt: skip
        for i, (dt, alpha) in enumerate(
            [(torch.float16, 1.0), (torch.bfloat16, 3.0), (torch.float32, 4.0)]
        )
    ]
    combined = combine_rows(parts, 3 * D)
    want = torch.cat([p.delta() for p in parts])
    assert combined.up.dtype == torch.float32
    torch.testing.assert_close(combined.delta(), want, atol=1e-6, rtol=1e-6)
    same = [LoraModule(p.down.half(), p.up.half(), 2.0, p.rows) for p in parts]
    assert combine_rows(same, 3 * D).up.dtype == torch.float16  # nothing computed: kept as is
