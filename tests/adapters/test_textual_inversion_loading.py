"""load_embeddings: exactly the token's rows change, prompts encode as with the vectors inserted by
hand, SDXL gets clip_l / clip_g with pooling at the end token, remove() restores bit for bit."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from safetensors.torch import save_file
from tiny_sdxl import build_tiny_sdxl
from tiny_text_encoders import (
    Holder,
    reference_ids,
    reference_with_rows,
    table,
    tiny_clip,
    tiny_open_clip,
    txt2img_encoder,
)

from ldm.adapters.embeddings_file import write_embeddings
from ldm.adapters.embeddings_loader import load_embeddings
from ldm.modules.encoders.tokenizer import VOCAB_SIZE, get_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")
PLAIN = ["a photo of a cat", "", "purple-ish <purpl> text"]


def _vec(n: int, d: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) * 0.05


def _a1111(tmp_path, name: str, vec: torch.Tensor, suffix: str):
    path = tmp_path / f"{name}{suffix}"
    if suffix == ".pt":
        torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vec}, "name": name,
                    "step": 10}, path)  # fmt: skip
    else:
        save_file({"emb_params": vec}, str(path))
    return path


@pytest.fixture(scope="module")
def sdxl():
    return build_tiny_sdxl()


@pytest.mark.parametrize("make", [tiny_clip, tiny_open_clip, txt2img_encoder])
@pytest.mark.parametrize(("suffix", "n"), [(".pt", 1), (".safetensors", 3)])
def test_a1111_file_changes_only_its_token(tmp_path, make, suffix, n):
    torch.manual_seed(0)
    encoder = make().eval()
    engine = Holder(encoder)
    width = table(encoder).shape[1]
    vec = _vec(n, width)
    path = _a1111(tmp_path, "<purple>", vec, suffix)
    before_table, before_state = table(encoder), copy.deepcopy(engine.state_dict())
    with torch.no_grad():
        before_plain = encoder(PLAIN)
        before_token = encoder(["a <purple> cat"])
    ref = reference_with_rows(encoder, vec)
    ref_ids = reference_ids(encoder, "a", n, "cat")
    handle = load_embeddings(engine, path)
    assert handle.tokens == {"<purple>": {"text": list(range(VOCAB_SIZE, VOCAB_SIZE + n))}}
    grown = table(encoder)
    assert torch.equal(grown[:VOCAB_SIZE], before_table) and torch.equal(grown[VOCAB_SIZE:], vec)
    assert get_tokenizer(encoder.tokenizer.mode, encoder.max_length).vocab_size == VOCAB_SIZE
    with torch.no_grad():
        assert torch.equal(encoder(PLAIN), before_plain)
        with_token = encoder(["a <purple> cat"])
        by_hand = ref(ref_ids)  # the vectors written over ordinary rows, ids spelled by hand
    assert not torch.equal(with_token, before_token)
    assert torch.equal(with_token, by_hand)
    handle.remove()
    after = engine.state_dict()
    assert after.keys() == before_state.keys()
    assert all(torch.equal(after[k], before_state[k]) for k in after)
    assert encoder.tokenizer is get_tokenizer(encoder.tokenizer.mode, encoder.max_length)
    with torch.no_grad():
        assert torch.equal(encoder(["a <purple> cat"]), before_token)


def test_hf_pooled_output_stays_at_the_end_token(tmp_path):
    """transformers pools at argmax(ids) with eos_token_id=2; new ids must not move it."""
    encoder = tiny_clip(layer="hidden", layer_idx=-2, always_return_pooled=True)
    vec = _vec(2, 32)
    ref = reference_with_rows(encoder, vec)
    with load_embeddings(Holder(encoder), _a1111(tmp_path, "<p>", vec, ".pt")), torch.no_grad():
        context, pooled = encoder(["<p> on a table"])
        ref_context, ref_pooled = ref(reference_ids(encoder, "", 2, "on a table"))
    assert torch.equal(context, ref_context) and torch.equal(pooled, ref_pooled)
    assert encoder.transformer.eos_token_id == 2  # restored after the block


def test_sdxl_file_fills_both_encoders(sdxl, tmp_path):
    clip, bigg = sdxl.conditioner.embedders[0], sdxl.conditioner.embedders[1]
    parts = {"clip_l": _vec(2, 32), "clip_g": _vec(2, 48, 1)}
    save_file(parts, str(tmp_path / "<xl>.safetensors"))
    state = copy.deepcopy(sdxl.state_dict())
    refs = [reference_with_rows(clip, parts["clip_l"]), reference_with_rows(bigg, parts["clip_g"])]
    ids = [reference_ids(e, "a", 2, "in the snow") for e in (clip, bigg)]
    handle = load_embeddings(sdxl, tmp_path / "<xl>.safetensors")
    assert set(handle.tokens["<xl>"]) == {"clip_l", "clip_g"}
    with torch.no_grad():
        context_l = clip(["a <xl> in the snow"])
        context_g, pooled = bigg(["a <xl> in the snow"])
        ref_g, ref_pooled = refs[1](ids[1])
    assert torch.equal(context_l, refs[0](ids[0])) and torch.equal(context_g, ref_g)
    assert torch.equal(pooled, ref_pooled)  # pooled at the end token, not at the new ids
    handle.remove()
    after = sdxl.state_dict()
    assert all(torch.equal(after[k], state[k]) for k in state) and after.keys() == state.keys()


def test_sdxl_parts_of_different_lengths_are_refused(sdxl, tmp_path):
    """clip_l and clip_g contexts are joined position by position: 2 vs 3 vectors would shift
    every later token of one encoder against the other."""
    save_file({"clip_l": _vec(2, 32), "clip_g": _vec(3, 48, 1)}, str(tmp_path / "<m>.safetensors"))
    with pytest.raises(
        ValueError, match=r"different numbers of vectors \({'clip_l': 2, 'clip_g': 3}"
    ):
        load_embeddings(sdxl, tmp_path / "<m>.safetensors")
    assert "<m>" not in sdxl.conditioner.embedders[0].tokenizer.added_tokens


def test_single_encoder_file_on_sdxl(sdxl, tmp_path, caplog):
    """A single-encoder file goes to the one encoder of its width, or is refused."""
    path = _a1111(tmp_path, "<g>", _vec(1, 48), ".safetensors")
    with caplog.at_level(logging.WARNING), load_embeddings(sdxl, path) as handle:
        assert set(handle.tokens["<g>"]) == {"clip_g"}
        assert "<g>" not in sdxl.conditioner.embedders[0].tokenizer.added_tokens
    assert "clip_l read the token as plain text" in caplog.text
    bad = _a1111(tmp_path, "<v1>", _vec(1, 768), ".safetensors")
    with pytest.raises(ValueError) as err:
        load_embeddings(sdxl, bad)
    text = str(err.value)
    assert "<v1>" in text and "SD v1 (CLIP ViT-L, 768)" in text and "fits none" in text
    assert "clip_l: CLIP text encoder, width 32" in text and "clip_g: OpenCLIP" in text


def test_dimension_mismatch_names_the_families(tmp_path):
    """Refusals say what the file was made for and what the model has; the model is unchanged."""
    with torch.device("meta"):
        from ldm.modules.encoders.clip import FrozenCLIPEmbedder

        sd_v1 = Holder(FrozenCLIPEmbedder())  # 768 wide, as SD v1
    v2 = _a1111(tmp_path, "v2-style", torch.zeros(1, 1024), ".safetensors")
    save_file({"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280)},
              str(tmp_path / "xl.safetensors"))  # fmt: skip
    with pytest.raises(ValueError, match=r"SD v2 \(OpenCLIP ViT-H, 1024\).*text: CLIP text "
                       r"encoder, width 768 \(CLIP ViT-L: SD v1, SDXL clip_l\)"):  # fmt: skip
        load_embeddings(sd_v1, [v2])
    with pytest.raises(ValueError, match=r"SDXL \(clip_l 768 \+ clip_g 1280\)"):
        load_embeddings(sd_v1, tmp_path / "xl.safetensors")
    assert sd_v1.cond_stage_model.tokenizer.added_tokens == {}


def test_replace_and_remove_in_any_order(tmp_path, caplog):
    encoder = tiny_clip()
    engine, before = Holder(encoder), table(encoder)
    first = load_embeddings(engine, [_a1111(tmp_path, "<a>", _vec(2, 32), ".pt"),
                                     _a1111(tmp_path, "<b>", _vec(1, 32, 1), ".pt")])  # fmt: skip
    new_a = _vec(3, 32, 2)
    write_embeddings(tmp_path / "learned_embeds.bin", {"<a>": {"*": new_a}}, format="diffusers")
    with caplog.at_level(logging.WARNING):
        second = load_embeddings(engine, tmp_path, tokens=None)
    assert "'<a>' was already loaded; replacing it" in caplog.text
    assert encoder.tokenizer.added_tokens == {"<b>": [49408], "<a>": [49409, 49410, 49411]}
    assert torch.equal(table(encoder)[49409:], new_a)
    first.remove()  # takes <b> only: <a> belongs to the second load now
    assert encoder.tokenizer.added_tokens == {"<a>": [49408, 49409, 49410]}
    assert torch.equal(table(encoder)[VOCAB_SIZE:], new_a)
    second.remove()
    assert torch.equal(table(encoder), before) and encoder.tokenizer is get_tokenizer("sd-v1", 77)
