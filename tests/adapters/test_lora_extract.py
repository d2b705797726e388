"""extract_lora: tuned = base + an exact low-rank delta -> the extracted LoRA, merged into base,
gives tuned back (linear, 1x1 and 3x3 conv, CLIP and OpenCLIP packed q/k/v weights)."""

from __future__ import annotations

import re

import pytest
import torch
from lora_files import SDXL_TEXT_KEYS, SDXL_UNET_KEYS, low_rank

from ldm.adapters.lora_apply import merge_into_state_dict
from ldm.adapters.lora_extract import extract_lora
from ldm.adapters.lora_weights import LoraError, LoraFile

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


def test_two_different_models_are_refused_not_matched_by_shared_names(base):
    """An SD-layout model against the SDXL fixture: same-named, same-shaped keys exist, but the
    delta between two models is no fine-tune."""
    from tiny_models import build_tiny, tiny_ldm_config

    other = build_tiny(tiny_ldm_config()).state_dict()
    with pytest.raises(LoraError, match=r"^b\.safetensors is .*SD layout.* but t\.safetensors is "):
        extract_lora(other, base, rank=4, names=("b.safetensors", "t.safetensors"))


def test_target_weights_missing_or_reshaped_are_refused_with_a_count_and_an_example(base):
    ff = UNET_KEYS[2]  # a feed-forward linear: neither the family nor the layout tells it
    reshaped = dict(base)
    reshaped[ff] = torch.zeros(base[ff].shape[0], base[ff].shape[1] + 1)
    with pytest.raises(LoraError, match=r"1 LoRA target weights differ .*0 only in b, 0 only in t, 1 "
                       rf"with other shapes.*`{re.escape(ff)}` is \[\d+, \d+\] in b but"):  # fmt: skip
        extract_lora(base, reshaped, rank=4, names=("b", "t"))
    missing = {k: v for k, v in base.items() if k != TEXT_KEYS[0]}
    with pytest.raises(LoraError, match=r"1 only in b, 0 only in t.*is only in b"):
        extract_lora(base, missing, rank=4, names=("b", "t"))


def test_old_and_new_clip_key_levels_are_the_same_model(base):
    """A tuned file whose CLIP keys carry `text_model.` (newer transformers) against a base
    without it: the same model; the text encoder change is still found."""
    tuned = _tuned(base, TEXT_KEYS[:1], seed=3)
    prefix = "conditioner.embedders.0.transformer."
    nested = {
        (prefix + "text_model." + k[len(prefix) :] if k.startswith(prefix) else k): v
        for k, v in tuned.items()
    }
    lora = extract_lora(base, nested, rank=2, clamp_quantile=None)
    assert set(lora) == {TEXT_KEYS[0]}
