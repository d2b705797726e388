"""FrozenCLIPEmbedder: SD v1 keys, parity with transformers' CLIPTextModel, offline loading, guard."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ldm.modules.encoders.clip import FrozenCLIPEmbedder
from ldm.util import ConfigError, instantiate_from_config

TINY = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
}
PROMPTS = ["a photo of a cat", "", "Don't panic!  émoji 🐱 " * 12]


def _tiny(**kwargs) -> FrozenCLIPEmbedder:
    return FrozenCLIPEmbedder(config=TINY, **kwargs)


def _manual_hidden_states(embedder: FrozenCLIPEmbedder, ids: torch.Tensor) -> list[torch.Tensor]:
    """CLIP's text transformer (Radford et al. 2021) written out from the weights: token +
    position embeddings, then pre-LN blocks x += attn(ln1 x) (causal), x += fc2(quick_gelu(fc1(
    ln2 x))). Returns the L + 1 states (embeddings, after each block) and, last, final_ln(x)."""
    sd = {k.removeprefix("text_model."): v for k, v in embedder.transformer.state_dict().items()}
    d, heads = TINY["hidden_size"], TINY["num_attention_heads"]

    def ln(x: torch.Tensor, name: str) -> torch.Tensor:
        return nn.functional.layer_norm(x, (d,), sd[f"{name}.weight"], sd[f"{name}.bias"], 1e-5)

    def lin(x: torch.Tensor, name: str) -> torch.Tensor:
        return x @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]

    n = ids.shape[1]
    x = (
        sd["embeddings.token_embedding.weight"][ids]
        + sd["embeddings.position_embedding.weight"][:n]
    )
    states = [x]
    causal = torch.full((n, n), float("-inf")).triu(1)
    for i in range(TINY["num_hidden_layers"]):
        p = f"encoder.layers.{i}"
        h = ln(x, f"{p}.layer_norm1")
        q, k, v = (
            lin(h, f"{p}.self_attn.{m}_proj").view(len(ids), n, heads, -1).transpose(1, 2)
            for m in "qkv"
        )  # [B, heads, n, d / heads]
        w = (q @ k.transpose(-1, -2) / (d // heads) ** 0.5 + causal).softmax(-1)
        x = x + lin((w @ v).transpose(1, 2).reshape(len(ids), n, d), f"{p}.self_attn.out_proj")
        h = lin(ln(x, f"{p}.layer_norm2"), f"{p}.mlp.fc1")
        x = x + lin(h * torch.sigmoid(1.702 * h), f"{p}.mlp.fc2")  # quick_gelu
        states.append(x)
    return [*states, ln(x, "final_layer_norm")]


def test_sd_v1_keys_and_shapes(tsv_keys):
    with torch.device("meta"):
        model = FrozenCLIPEmbedder()
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    ref = tsv_keys("sd-v1-text-encoder.tsv", "cond_stage_model.")
    extra = set(ours) - set(ref)
    assert extra <= {
        "transformer.text_model.embeddings.position_ids",
        "transformer.embeddings.position_ids",
    }
    assert {k: ours[k] for k in ref if k in ours} == ref and set(ref) <= set(ours)
    assert sum(p.numel() for p in model.parameters()) == 123_060_480


def test_v1_inference_config_section_builds_offline(tsv_keys):
    cfg = {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"}
    with torch.device("meta"):
        model = instantiate_from_config(cfg)
    assert isinstance(model, FrozenCLIPEmbedder) and not model.weights_loaded


@pytest.mark.parametrize(
    ("layer", "layer_idx"), [("last", None), ("pooled", None), ("hidden", -2), ("hidden", 1)]
)
def test_output_equals_the_transformer_written_out(hf_tokenizer, layer, layer_idx):
    # max_chunks=1: the reference truncates at 77 (the long prompt's chunks: test_long_prompts)
    embedder = _tiny(layer=layer, layer_idx=layer_idx, allow_random_weights=True, max_chunks=1)
    ids = hf_tokenizer(
        PROMPTS, truncation=True, max_length=77, padding="max_length", return_tensors="pt"
    )["input_ids"]
    with torch.no_grad():
        states = _manual_hidden_states(embedder, ids)
        z = embedder(PROMPTS)
    hidden, last = states[:-1], states[-1]
    first_eos = (ids == 49407).int().argmax(1)  # pooled = the final state at the first end token
    expected = {
        "last": last,  # SD v1: after the final layer norm
        "pooled": last[torch.arange(3), first_eos][:, None, :],
        "hidden": hidden[layer_idx] if layer_idx is not None else None,  # no final norm (SD 2)
    }[layer]
    assert z.shape == ((3, 1, 32) if layer == "pooled" else (3, 77, 32))
    torch.testing.assert_close(z, expected, rtol=1e-5, atol=1e-5)


def test_padding_with_end_token_changes_nothing_before_it():
    """Causal attention: states up to the end token do not depend on the padding."""
    embedder = _tiny(allow_random_weights=True)
    ids = embedder.tokenize(["a cat"])
    zero_padded = ids.clone()
    zero_padded[:, 4:] = 0
    with torch.no_grad():
        a, b = embedder(ids), embedder(zero_padded)
    torch.testing.assert_close(a[:, :4], b[:, :4], rtol=0, atol=1e-6)
    assert (a[:, 4:] - b[:, 4:]).abs().max() > 1e-3  # SD v1 uses all 77 states: the pad id matters


def test_refuses_random_weights_until_loaded(monkeypatch):
    monkeypatch.delenv("LDM_ALLOW_RANDOM_WEIGHTS", raising=False)
    embedder = _tiny()
    with pytest.raises(RuntimeError, match="allow_random_weights=True.*LDM_ALLOW_RANDOM_WEIGHTS=1"):
        embedder(["a cat"])
    monkeypatch.setenv("LDM_ALLOW_RANDOM_WEIGHTS", "1")
    assert embedder(["a cat"]).shape == (1, 77, 32)
    monkeypatch.delenv("LDM_ALLOW_RANDOM_WEIGHTS")
    source = _tiny()
    embedder.load_state_dict(source.state_dict())
    assert embedder.weights_loaded
    torch.testing.assert_close(embedder.transformer.state_dict(), source.transformer.state_dict())
    embedder(["a cat"])


def test_parent_load_with_text_model_level_marks_loaded(monkeypatch):
    """A full SD v1 checkpoint (``transformer.text_model.*`` + position_ids) loads through a parent."""
    monkeypatch.delenv("LDM_ALLOW_RANDOM_WEIGHTS", raising=False)
    parent = nn.Module()
    parent.cond_stage_model = _tiny()
    parent.other = nn.Linear(2, 2)
    source = _tiny()
    sd = {"other." + k: v for k, v in nn.Linear(2, 2).state_dict().items()}
    for k, v in source.transformer.state_dict().items():
        sd["cond_stage_model.transformer.text_model." + k] = v
    sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    result = parent.load_state_dict(sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert parent.cond_stage_model.weights_loaded
    torch.testing.assert_close(
        parent.cond_stage_model.transformer.state_dict(), source.transformer.state_dict()
    )


def test_partial_state_dict_does_not_mark_loaded():
    embedder = _tiny()
    sd = embedder.state_dict()
    sd.pop("transformer.final_layer_norm.weight")
    embedder.load_state_dict(sd, strict=False)
    assert not embedder.weights_loaded
    with pytest.raises(RuntimeError, match="never loaded"):
        embedder(["x"])


def test_local_weights_file_and_directory(tmp_path, hf_tokenizer):
    from safetensors.torch import save_file

    source = _tiny(allow_random_weights=True)
    sd = {
        "cond_stage_model.transformer." + k: v.contiguous()
        for k, v in source.transformer.state_dict().items()
    }
    save_file(sd, str(tmp_path / "te.safetensors"))
    from_file = _tiny(weights=str(tmp_path / "te.safetensors"))
    assert from_file.weights_loaded
    source.transformer.save_pretrained(tmp_path / "hf")
    from_dir = FrozenCLIPEmbedder(version=str(tmp_path / "hf"))
    assert from_dir.weights_loaded
    with torch.no_grad():
        ref = source(PROMPTS)
        torch.testing.assert_close(from_file(PROMPTS), ref)
        torch.testing.assert_close(from_dir(PROMPTS), ref)


def test_frozen_stays_eval_without_grads():
    embedder = _tiny()
    embedder.train()
    assert not embedder.training and not embedder.transformer.training
    assert not any(p.requires_grad for p in embedder.parameters())
    trainable = _tiny(freeze=False)
    trainable.train()
    assert trainable.training and all(p.requires_grad for p in trainable.parameters())
    trainable(["guard applies to frozen encoders only"])


def test_config_mistakes_are_readable():
    with pytest.raises(ConfigError, match="unknown version 'openai/clip-vit-huge'.*from_hub=True"):
        FrozenCLIPEmbedder(version="openai/clip-vit-huge")
    with pytest.raises(ConfigError, match="layer_idx"):
        _tiny(layer="hidden")
    with pytest.raises(ConfigError, match="layer='penultimate'"):
        _tiny(layer="penultimate")


def test_guard_survives_copy_and_inner_loading(monkeypatch, tmp_path):
    import copy

    monkeypatch.delenv("LDM_ALLOW_RANDOM_WEIGHTS", raising=False)
    embedder = _tiny()
    clone = copy.deepcopy(embedder)
    clone.transformer.load_state_dict(_tiny().transformer.state_dict())  # inner model directly
    assert clone.weights_loaded and not embedder.weights_loaded
    torch.save(clone, tmp_path / "m.pt")
    restored = torch.load(tmp_path / "m.pt", weights_only=False)
    assert restored.weights_loaded
    torch.testing.assert_close(restored(["a cat"]), clone(["a cat"]))
    fresh = copy.deepcopy(embedder)
    fresh.load_state_dict(clone.state_dict())  # the hook of a copy updates that copy only
    assert fresh.weights_loaded and not embedder.weights_loaded


def test_unavailable_weights_say_what_to_pass(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="Pass a local directory as version="):
        FrozenCLIPEmbedder(version="no-such-org/no-such-clip", from_hub=True)
    with pytest.raises(FileNotFoundError, match="neither a directory nor a file"):
        _tiny(weights=str(tmp_path / "missing.safetensors"))


def test_meta_build_then_assign_load_encodes():
    source = _tiny(allow_random_weights=True)
    with torch.device("meta"):
        fast = _tiny()
    fast.load_state_dict(source.state_dict(), assign=True)
    assert fast.weights_loaded
    with torch.no_grad():
        torch.testing.assert_close(fast(PROMPTS), source(PROMPTS))
