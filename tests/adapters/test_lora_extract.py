"""extract_lora: tuned = base + an exact low-rank delta -> the extracted LoRA, merged into base,
gives tuned back (linear, 1x1 and 3x3 conv, CLIP and OpenCLIP packed q/k/v weights)."""

from __future__ import annotations

import pytest
import torch

from ldm.adapters.lora_apply import merge_into_state_dict
from ldm.adapters.lora_extract import extract_lora
from ldm.adapters.lora_weights import LoraFile

pytestmark = pytest.mark.usefixtures("one_thread")

U = "model.diffusion_model."
UNET_KEYS = [
    U + "input_blocks.3.1.transformer_blocks.1.attn2.to_k.weight",
    U + "input_blocks.1.1.proj_in.weight",
    U + "middle_block.1.transformer_blocks.0.ff.net.0.proj.weight",
    U + "input_blocks.3.0.in_layers.2.weight",  # 3x3 conv
    U + "input_blocks.3.0.skip_connection.weight",  # 1x1 conv
]
TEXT_KEYS = [
    "conditioner.embedders.0.transformer.encoder.layers.1.self_attn.v_proj.weight",
    "conditioner.embedders.1.model.transformer.resblocks.2.attn.in_proj_weight",
    "conditioner.embedders.1.model.transformer.resblocks.0.mlp.c_fc.weight",
]


def low_rank(shape: torch.Size, r: int, gen: torch.Generator, size: float = 0.1) -> torch.Tensor:
    """An exact rank-r change of a weight (a conv kernel: rank r as [out, in*kh*kw])."""
    up = torch.randn(shape[0], r, generator=gen) * size
    down = torch.randn(r, int(torch.Size(shape[1:]).numel()), generator=gen) * size
    return (up @ down).reshape(shape)


@pytest.fixture(scope="module")
def base() -> dict[str, torch.Tensor]:
    from tiny_sdxl import build_tiny_sdxl

    return {k: v.clone() for k, v in build_tiny_sdxl().state_dict().items()}


def _tuned(base: dict[str, torch.Tensor], keys: list[str], seed: int, size: float = 0.1) -> dict:
    g = torch.Generator().manual_seed(seed)
    tuned = dict(base)
    for k in keys:
        tuned[k] = base[k] + low_rank(base[k].shape, 2, g, size)
    return tuned


def test_extracted_lora_reproduces_the_tuned_weights(base):
    tuned = _tuned(base, UNET_KEYS + TEXT_KEYS, seed=0)
    lora = extract_lora(base, tuned, rank=4, conv_rank=4, clamp_quantile=None)
    assert set(lora) == set(UNET_KEYS + TEXT_KEYS)  # unchanged weights give no module
    packed = lora[TEXT_KEYS[1]]
    assert packed.rows is None and packed.rank == 3 * 4  # q, k, v thirds at rank 4 each
    merged = merge_into_state_dict(base, [(LoraFile(lora), 1.0)])
    for k in base:
        torch.testing.assert_close(merged[k], tuned[k], rtol=0, atol=2e-6, msg=k)


def test_rank_truncation_and_unchanged_text_encoders(base):
    tuned = _tuned(base, UNET_KEYS, seed=1)
    tuned = _tuned(tuned, TEXT_KEYS[:1], seed=2, size=0.02)  # max |diff| well under 0.01
    lora = extract_lora(base, tuned, rank=1, conv_rank=None, clamp_quantile=None, min_diff=0.01)
    # ResBlock weights are targets only with a conv rank (sd-scripts), text encoder 0 is "unchanged"
    assert set(lora) == {k for k in UNET_KEYS if ".3.0." not in k}
    assert all(m.rank == 1 and m.scale == 1.0 for m in lora.values())
    # the best rank-1 approximation: the error is the second singular value
    k = UNET_KEYS[0]
    d = (tuned[k] - base[k]).float()
    err = torch.linalg.matrix_norm(d - lora[k].delta(), ord=2)
    torch.testing.assert_close(err, torch.linalg.svdvals(d)[1], rtol=1e-4, atol=1e-6)
