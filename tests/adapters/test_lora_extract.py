"""extract_lora: tuned = base + an exact low-rank delta -> the extracted LoRA, merged into base,
gives tuned back (linear, 1x1 and 3x3 conv, CLIP and OpenCLIP packed q/k/v weights)."""

from __future__ import annotations

import pytest
import torch
from lora_files import SDXL_TEXT_KEYS, SDXL_UNET_KEYS, low_rank

from ldm.adapters.lora_apply import merge_into_state_dict
from ldm.adapters.lora_extract import extract_lora
from ldm.adapters.lora_weights import LoraFile

pytestmark = pytest.mark.usefixtures("one_thread")

UNET_KEYS, TEXT_KEYS = SDXL_UNET_KEYS, SDXL_TEXT_KEYS


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
