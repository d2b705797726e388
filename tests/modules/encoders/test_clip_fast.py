"""clip_fast: the packed CPU inference forward gives transformers' CLIPTextModel outputs, follows
weight edits, and steps aside wherever it cannot stand in for the module."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_text_encoders import TINY_CLIP
from torch import nn

from ldm.modules.encoders import clip_fast
from ldm.modules.encoders.clip import FrozenCLIPEmbedder
from ldm.modules.encoders.clip_fast import cache_bytes, clear_cache, clip_text_forward

TINY = TINY_CLIP
PROMPTS = ["a red square in the top left", "", "x " * 100]


def _embedder(**config) -> FrozenCLIPEmbedder:
    torch.manual_seed(0)
    return FrozenCLIPEmbedder(config={**TINY, **config}, allow_random_weights=True).eval()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max()).item()


def _module_outputs(model: nn.Module, ids: torch.Tensor):
    with clip_fast_off():
        out = model(input_ids=ids, output_hidden_states=True)
    return out.last_hidden_state, out.pooler_output, out.hidden_states


class clip_fast_off:  # noqa: N801 - a context manager used like a function
    def __enter__(self) -> None:
        self.mp = pytest.MonkeyPatch()
        self.mp.setenv("LDM_FAST_TEXT", "0")

    def __exit__(self, *exc) -> None:
        self.mp.undo()


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
@pytest.mark.parametrize("eos", [2, 49407])
def test_outputs_equal_the_module_in_float64(act: str, eos: int) -> None:
    """Exact arithmetic: every output (last state, pooled end token, all hidden states) equals
    transformers' own forward, for both activations and both end-token conventions."""
    e = _embedder(hidden_act=act, eos_token_id=eos)
    model = e.transformer.double()
    ids = e.tokenize(PROMPTS)
    with torch.no_grad():
        ref = _module_outputs(model, ids)
        got = clip_text_forward(model, ids, hidden=True)
    assert got is not None
    last, pooled, states = got
    assert _rel(last, ref[0]) < 1e-12
    assert _rel(pooled, ref[1]) < 1e-12
    assert len(states) == len(ref[2]) == TINY["num_hidden_layers"] + 1
    for a, b in zip(states, ref[2], strict=True):
        assert _rel(a, b) < 1e-12


def test_pooled_token_follows_the_end_token_convention() -> None:
    """eos_token_id 2 (the legacy hub configs) pools at the highest id; otherwise at the first
    end token: with a token id above the end token's in the prompt the two differ."""
    e = _embedder(eos_token_id=49407)
    ids = e.tokenize(["a cat"])
    ids[0, 1] = 49407  # an end token early: the first-eos rule pools here
    with torch.no_grad():
        ref = _module_outputs(e.transformer, ids)
        last, pooled, _ = clip_text_forward(e.transformer, ids)
    assert torch.allclose(pooled, ref[1], atol=1e-5)
    assert torch.allclose(pooled, last[:, 1], atol=1e-6)


@pytest.mark.parametrize("dtype, bound", [(torch.float32, 2e-6), (torch.bfloat16, 3e-2)])
def test_error_against_float64_is_no_worse_than_the_module(dtype, bound) -> None:
    e = _embedder()
    ids = e.tokenize(PROMPTS)
    exact = copy.deepcopy(e.transformer).double()
    model = e.transformer.to(dtype)
    with torch.no_grad():
        truth = exact(input_ids=ids).last_hidden_state
        ours = clip_text_forward(model, ids)[0]
        theirs = _module_outputs(model, ids)[0]
    assert ours.dtype == dtype
    assert _rel(ours, truth) < max(bound, 1.5 * _rel(theirs, truth))


def test_embedder_uses_the_fast_path_in_inference_only(monkeypatch) -> None:
    e = _embedder()
    calls = []
    monkeypatch.setattr(e.transformer, "forward", lambda *a, **k: calls.append(1) or None)
    with torch.no_grad():
        e(PROMPTS[:2])  # the module's forward is never called
    assert calls == []
    e.transformer.requires_grad_(True)
    with pytest.raises(AttributeError):  # grad mode + trainable weights: the module runs
        e(PROMPTS[:2])
    assert calls == [1]


def test_embedder_layers_match_the_module_paths() -> None:
    """last / pooled / hidden (with always_return_pooled) through the fast path equal the same
    embedder with it switched off."""
    for kwargs in ({}, {"layer": "pooled"}, {"layer": "hidden", "layer_idx": -2}):
        e = FrozenCLIPEmbedder(
            config=TINY, allow_random_weights=True, always_return_pooled=True, **kwargs
        )
        with torch.no_grad():
            z, pooled = e(PROMPTS)
            with clip_fast_off():
                z_ref, pooled_ref = e(PROMPTS)
        assert _rel(z, z_ref) < 1e-5 and _rel(pooled, pooled_ref) < 1e-5


def test_trainable_weights_get_gradients_through_the_module() -> None:
    e = _embedder()
    e.transformer.requires_grad_(True)
    ids = e.tokenize(PROMPTS[:1])
    assert clip_text_forward(e.transformer, ids) is None
    e(PROMPTS[:1]).square().sum().backward()
    grad = e.transformer.get_input_embeddings().weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_frozen_weights_in_grad_mode_use_the_fast_path() -> None:
    """Training with a frozen encoder: grad mode is on but nothing needs a gradient."""
    e = _embedder()
    ids = e.tokenize(PROMPTS)
    assert torch.is_grad_enabled()
    out = clip_text_forward(e.transformer, ids)
    assert out is not None and not out[0].requires_grad


def test_cases_it_steps_aside_for(monkeypatch) -> None:
    e = _embedder()
    model, ids = e.transformer, e.tokenize(PROMPTS)
    with torch.no_grad():
        assert clip_text_forward(model, ids) is not None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert clip_text_forward(model, ids) is None
        handle = model.encoder.layers[1].mlp.fc1.register_forward_hook(lambda m, i, o: o * 2)
        assert clip_text_forward(model, ids) is None  # a user hook must run
        handle.remove()
        assert clip_text_forward(model, ids) is not None
        lora_like = copy.deepcopy(model)

        class Wrapped(nn.Linear):  # a PEFT-style replacement layer
            pass

        old = lora_like.encoder.layers[0].self_attn.q_proj
        new = Wrapped(old.in_features, old.out_features)
        lora_like.encoder.layers[0].self_attn.q_proj = new
        assert clip_text_forward(lora_like, ids) is None
        monkeypatch.setenv("LDM_FAST_TEXT", "0")
        assert clip_text_forward(model, ids) is None
        monkeypatch.setenv("LDM_FAST_TEXT", "sometimes")
        with pytest.raises(ValueError, match="LDM_FAST_TEXT='sometimes' is not a switch"):
            clip_text_forward(model, ids)


def test_output_capturing_hooks_of_transformers_do_not_block_it() -> None:
    """transformers 5 leaves inert output-capturing hooks on the layers after an
    output_hidden_states call; the fast path still applies and the outputs still match."""
    e = _embedder()
    ids = e.tokenize(PROMPTS)
    with torch.no_grad():
        ref = _module_outputs(e.transformer, ids)
        got = clip_text_forward(e.transformer, ids, hidden=True)
    assert got is not None
    assert _rel(got[2][2], ref[2][2]) < 1e-5


def test_cache_follows_weight_edits() -> None:
    """In-place edits (version counter), edits through .data (probe), load_state_dict and a new
    Parameter all rebuild the fused / packed weights."""
    clear_cache()
    e = _embedder()
    model, ids = e.transformer, e.tokenize(PROMPTS)

    def check() -> None:
        with torch.no_grad():
            ours = clip_text_forward(model, ids)[0]
            ref = _module_outputs(model, ids)[0]
        assert _rel(ours, ref) < 1e-5

    check()
    assert cache_bytes() > 0
    layer = model.encoder.layers[1]
    with torch.no_grad():
        layer.mlp.fc1.weight.mul_(1.5)
    check()
    layer.self_attn.k_proj.weight.data.mul_(-1.0)  # no version bump: the probe sees it
    check()
    layer.self_attn.v_proj.bias.data.add_(0.5)  # a bias through .data ...
    state = {k: v * 0.5 for k, v in model.state_dict().items()}
    model.load_state_dict(state)  # ... and then a load: versions move
    check()
    layer.mlp.fc2.weight = nn.Parameter(torch.randn_like(layer.mlp.fc2.weight))
    check()
    new_norm = nn.LayerNorm(TINY["hidden_size"])  # a replaced LayerNorm module is read live
    with torch.no_grad():
        new_norm.weight.uniform_(0.5, 2.0)
    layer.layer_norm2 = new_norm
    check()


def test_cache_is_freed_with_the_module_and_not_copied() -> None:
    clear_cache()
    e = _embedder()
    ids = e.tokenize(PROMPTS)
    with torch.no_grad():
        clip_text_forward(e.transformer, ids)
    held = cache_bytes()
    assert held > 0
    twin = copy.deepcopy(e)
    assert cache_bytes() == held  # the copy carries no entry
    del e
    import gc

    gc.collect()
    assert cache_bytes() == 0
    del twin


def test_inference_mode_weights_fall_back_to_the_module() -> None:
    with torch.inference_mode():
        e = _embedder()
        ids = e.tokenize(PROMPTS)
        assert clip_text_forward(e.transformer, ids) is None  # versions unreadable: no cache
        z = e(PROMPTS)
    assert z.shape == (3, 154, TINY["hidden_size"])  # the long prompt takes two chunks


def test_a_real_size_layer_packs_its_weights() -> None:
    """At CLIP ViT-L/14 width the fp32 linear layers are MKL-packed (where the build has MKL) and
    the bf16 ones oneDNN-packed; outputs still match the module."""
    cfg = {
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 1,
        "num_attention_heads": 12,
    }
    e = _embedder(**cfg)
    ids = e.tokenize(PROMPTS[:2])
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
        clear_cache()
        model = e.transformer.to(dtype)
        with torch.no_grad():
            ours = clip_text_forward(model, ids)[0]
            ref = _module_outputs(model, ids)[0]
        assert _rel(ours, ref) < tol
        (layer,) = clip_fast._CACHE._entries[model][3]
        kinds = {layer.fc1.kind, layer.fc2.kind, layer.qkv.kind}
        if dtype == torch.float32 and torch.backends.mkl.is_available():
            assert kinds == {"mkl"}
        if dtype == torch.bfloat16 and torch.backends.mkldnn.is_available():
            assert kinds <= {"mkldnn", "plain"}
