"""FrozenOpenCLIPEmbedder: SD v2 keys, penultimate/last layers against a hand-written transformer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.encoders.open_clip import FrozenOpenCLIPEmbedder
from ldm.util import instantiate_from_config

TINY = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 3},
}
PROMPTS = ["a painting of a fox", "", "über-long prompt, " * 20]


def _tiny(**kwargs) -> FrozenOpenCLIPEmbedder:
    return FrozenOpenCLIPEmbedder(arch=TINY, **kwargs)


def _manual_text_states(model: nn.Module, tokens: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """CLIP text transformer written out: pre-LN blocks, causal multi-head attention, GELU MLP."""
    x = model.token_embedding.weight[tokens] + model.positional_embedding  # [B, L, D]
    B, L, D = x.shape
    heads = TINY["text_cfg"]["heads"]
    causal = torch.ones(L, L, dtype=torch.bool).triu(1)
    for blk in list(model.transformer.resblocks)[:n_blocks]:
        h = F.layer_norm(x, (D,), blk.ln_1.weight, blk.ln_1.bias)
        q, k, v = (h @ blk.attn.in_proj_weight.T + blk.attn.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.reshape(B, L, heads, D // heads).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-1, -2)) / (D // heads) ** 0.5  # [B, heads, L, L]
        att = att.masked_fill(causal, float("-inf")).softmax(-1)
        o = (att @ v).transpose(1, 2).reshape(B, L, D)
        x = x + o @ blk.attn.out_proj.weight.T + blk.attn.out_proj.bias
        h = F.layer_norm(x, (D,), blk.ln_2.weight, blk.ln_2.bias)
        x = x + blk.mlp.c_proj(F.gelu(blk.mlp.c_fc(h)))
    return F.layer_norm(x, (D,), model.ln_final.weight, model.ln_final.bias)


def test_sd_v2_keys_and_shapes(tsv_keys):
    cfg = {
        "target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
        "params": {"freeze": True, "layer": "penultimate"},
    }  # the cond_stage_config of v2-inference.yaml
    with torch.device("meta"):
        model = instantiate_from_config(cfg)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == tsv_keys("sd-v2-text-encoder.tsv", "cond_stage_model.")
    assert sum(p.numel() for p in model.parameters()) == 354_032_641
    assert not hasattr(model.model, "visual")


@pytest.mark.parametrize(("layer", "n_blocks"), [("penultimate", 2), ("last", 3)])
def test_layers_equal_manual_computation(layer, n_blocks):
    import open_clip

    # max_chunks=1: open_clip.tokenize truncates at 77 (the long prompt's chunks: test_long_prompts)
    embedder = _tiny(layer=layer, allow_random_weights=True, max_chunks=1)
    tokens = open_clip.tokenize(PROMPTS)
    with torch.no_grad():
        z = embedder(PROMPTS)
        expected = _manual_text_states(embedder.model, tokens, n_blocks)
    assert z.shape == (3, 77, 32)
    torch.testing.assert_close(z, expected, rtol=1e-5, atol=1e-5)
    if layer == "last":  # open_clip's own pooled text feature is taken from these states
        with torch.no_grad():
            pooled = embedder.model.encode_text(tokens)
        eot = tokens.argmax(-1)
        torch.testing.assert_close(pooled, z[torch.arange(3), eot] @ embedder.model.text_projection)


def test_sequence_first_open_clip_gives_same_states():
    """Older open_clip runs its blocks sequence-first ([L, B, D]); the result must not change."""
    embedder = _tiny(layer="penultimate", allow_random_weights=True)
    with torch.no_grad():
        batch_first = embedder(PROMPTS)
        embedder.model.transformer.batch_first = False
        for blk in embedder.model.transformer.resblocks:
            blk.attn.batch_first = False
        seq_first = embedder(PROMPTS)
    torch.testing.assert_close(seq_first, batch_first, rtol=1e-5, atol=1e-5)


def test_guard_and_loading_through_parent(monkeypatch, tmp_path):
    monkeypatch.delenv("LDM_ALLOW_RANDOM_WEIGHTS", raising=False)
    embedder = _tiny(layer="penultimate", max_chunks=1)  # compared with the truncated ids below
    with pytest.raises(RuntimeError, match="refuses to encode"):
        embedder(["a fox"])
    parent = nn.Module()
    parent.cond_stage_model = embedder
    source = _tiny(layer="penultimate")
    sd = {"cond_stage_model.model." + k: v for k, v in source.model.state_dict().items()}
    for unused in ("logit_scale", "text_projection"):  # not needed for conditioning
        sd.pop("cond_stage_model.model." + unused)
    parent.load_state_dict(sd, strict=False)
    assert embedder.weights_loaded
    # an open_clip checkpoint file (with a visual tower) given as `version`, as open_clip accepts
    full = {"visual.proj": torch.zeros(1), **source.model.state_dict()}
    torch.save(full, tmp_path / "open_clip.pt")
    from_file = _tiny(layer="penultimate", version=str(tmp_path / "open_clip.pt"), max_chunks=1)
    assert from_file.weights_loaded
    with torch.no_grad():
        torch.testing.assert_close(
            embedder(PROMPTS), source.encode_with_transformer(source.tokenize(PROMPTS))
        )
        torch.testing.assert_close(from_file(PROMPTS), embedder(PROMPTS))


def test_gradient_checkpointing_same_gradients():
    embedder = _tiny(layer="penultimate", freeze=False)
    tokens = embedder.tokenize(PROMPTS)
    embedder(tokens).square().mean().backward()
    ref = {n: p.grad.clone() for n, p in embedder.named_parameters() if p.grad is not None}
    embedder.zero_grad()
    embedder.model.transformer.grad_checkpointing = True
    embedder(tokens).square().mean().backward()
    for n, p in embedder.named_parameters():
        if n in ref:
            torch.testing.assert_close(p.grad, ref[n], rtol=1e-5, atol=1e-7)


def test_meta_build_then_assign_load_encodes():
    """Fast loading path: build on meta, load_state_dict(assign=True); constant buffers rebuilt."""
    source = _tiny(layer="penultimate", allow_random_weights=True)
    with torch.device("meta"):
        fast = _tiny(layer="penultimate")
    fast.load_state_dict(source.state_dict(), assign=True)
    assert fast.weights_loaded and not fast.model.attn_mask.is_meta
    with torch.no_grad():
        torch.testing.assert_close(fast(PROMPTS), source(PROMPTS))
