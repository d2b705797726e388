"""open_clip text blocks run batch-first without nn.MultiheadAttention (open_clip_blocks)."""

from __future__ import annotations

import pytest
import torch
from open_clip.transformer import QuickGELU, ResidualAttentionBlock
from torch import nn

import ldm.modules.encoders.open_clip_blocks as blocks_module
from ldm.modules.encoders.open_clip import FrozenOpenCLIPEmbedder, FrozenOpenCLIPEmbedder2
from ldm.modules.encoders.open_clip_blocks import block_forward, fast_block_applies, run_block
from tests.modules.encoders.test_open_clip import TINY

PROMPTS = ["a painting of a fox", "", "a red square on a blue field"]


def _block(**kwargs) -> ResidualAttentionBlock:
    torch.manual_seed(0)
    block = ResidualAttentionBlock(32, 4, batch_first=True, **kwargs).double().eval()
    with torch.no_grad():  # non-trivial norms, biases and LayerScale
        for p in block.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return block


def _masks(n: int) -> dict[str, torch.Tensor | None]:
    causal = torch.ones(n, n, dtype=torch.bool).triu(1)
    return {
        "none": None,
        "float causal": torch.zeros(n, n, dtype=torch.float64).masked_fill(causal, float("-inf")),
        "bool": causal,  # open_clip casts it to the activations' dtype: an additive 0 / 1
    }


@pytest.mark.parametrize("mask_kind", ["none", "float causal", "bool"])
@pytest.mark.parametrize(
    "kwargs", [{}, {"ls_init_value": 0.5}, {"act_layer": QuickGELU, "mlp_ratio": 2.0}]
)
def test_block_forward_equals_the_block(mask_kind, kwargs) -> None:
    block = _block(**kwargs)
    x = torch.randn(3, 7, 32, dtype=torch.float64)
    mask = _masks(7)[mask_kind]
    assert fast_block_applies(block, x)
    with torch.no_grad():
        torch.testing.assert_close(
            block_forward(block, x, mask), block(x, attn_mask=mask), rtol=0, atol=1e-12
        )


def test_the_causal_mask_is_applied() -> None:
    """Causal: a token's state does not depend on later tokens (and the mask changes the result)."""
    block = _block()
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    mask = _masks(5)["float causal"]
    later = x.clone()
    later[:, 3:] += 1.0
    with torch.no_grad():
        causal = block_forward(block, x, mask)
        torch.testing.assert_close(block_forward(block, later, mask)[:, :3], causal[:, :3])
        assert not torch.allclose(block_forward(block, x, None), causal)


def test_gradients_equal_the_blocks() -> None:
    block = _block(ls_init_value=0.3).train()  # dropout 0: training mode changes nothing
    mask = _masks(6)["float causal"]
    x = torch.randn(2, 6, 32, dtype=torch.float64)
    grads = []
    for fn in (lambda xx: block(xx, attn_mask=mask), lambda xx: block_forward(block, xx, mask)):
        block.zero_grad()
        xx = x.clone().requires_grad_()
        fn(xx).square().sum().backward()
        grads.append([xx.grad, *(p.grad.clone() for p in block.parameters())])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_falls_back_to_the_block_where_it_does_not_apply(monkeypatch) -> None:
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    block = _block()
    seen = []
    handle = block.attn.register_forward_hook(lambda m, i, o: seen.append("attn"))
    assert not fast_block_applies(block, x)  # a hook on the attention module must run
    run_block(block, x)
    assert seen == ["attn"]
    handle.remove()
    assert fast_block_applies(block, x)
    mlp_calls = []
    block.mlp.register_forward_hook(lambda m, i, o: mlp_calls.append(o.shape))
    assert fast_block_applies(block, x)  # the MLP is called as a module: its hooks run
    run_block(block, x)
    assert mlp_calls == [(2, 5, 32)]
    seq_first = ResidualAttentionBlock(32, 4, batch_first=False).double()
    assert not fast_block_applies(seq_first, x)
    kv_bias = _block()
    kv_bias.attn = nn.MultiheadAttention(32, 4, batch_first=True, add_bias_kv=True).double()
    assert not fast_block_applies(kv_bias, x)
    assert not fast_block_applies(nn.Linear(32, 32), x)
    monkeypatch.setenv("LDM_FAST_TEXT", "0")
    assert not fast_block_applies(block, x)


@pytest.mark.parametrize("layer", ["penultimate", "last"])
def test_embedders_take_the_path_and_match_open_clips_blocks(monkeypatch, layer) -> None:
    """SD 2.x's and SDXL's OpenCLIP embedders run every block through ``block_forward``; their
    outputs equal open_clip's own blocks (``LDM_FAST_TEXT=0``) to fp32 rounding."""
    calls = []
    real = blocks_module.block_forward

    def spy(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(blocks_module, "block_forward", spy)
    sd2 = FrozenOpenCLIPEmbedder(arch=TINY, layer=layer, allow_random_weights=True, max_chunks=1)
    torch.manual_seed(0)
    sdxl = FrozenOpenCLIPEmbedder2(
        arch=TINY,
        layer=layer,
        legacy=False,
        always_return_pooled=True,
        allow_random_weights=True,
        max_chunks=1,
    )
    with torch.no_grad():
        fast = sd2(PROMPTS), sdxl(PROMPTS)
    assert len(calls) == (2 if layer == "penultimate" else 3) + 3
    monkeypatch.setenv("LDM_FAST_TEXT", "0")
    with torch.no_grad():
        slow = sd2(PROMPTS), sdxl(PROMPTS)
    assert len(calls) == (2 if layer == "penultimate" else 3) + 3
    torch.testing.assert_close(fast[0], slow[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(fast[1], slow[1], strict=True):  # SDXL: context and pooled vector
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
