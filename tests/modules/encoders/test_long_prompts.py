"""Long prompts: each window of 75 (or max_length - 2) tokens encoded on its own as
[BOS] + window + [EOS] + pad, the outputs side by side; short prompts unchanged bit for bit."""

from __future__ import annotations

import logging

import pytest
import torch
from long_prompts import EOS, LONG, PHRASE, SHORT, clip, openclip, sequence, windows
from tiny_text_encoders import TINY_CLIP

from ldm.modules.encoders.open_clip import FrozenOpenCLIPEmbedder2
from ldm.modules.encoders.text_transformer import CLIPTextEncoder
from ldm.util import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(("layer", "layer_idx"), [("last", None), ("hidden", -2)])
def test_clip_long_prompt_is_its_windows_encoded_separately(hf_tokenizer, layer, layer_idx):
    emb = clip(layer=layer, layer_idx=layer_idx)
    ids = hf_tokenizer(LONG, add_special_tokens=False)["input_ids"]  # transformers' own BPE
    assert 75 < len(ids) <= 150
    with torch.no_grad():
        z = emb([LONG])
        out = [emb.transformer(input_ids=sequence(w, 77, EOS), output_hidden_states=True)
               for w in windows(ids, 75)]  # fmt: skip
    parts = [o.last_hidden_state if layer == "last" else o.hidden_states[layer_idx] for o in out]
    assert z.shape == (1, 154, TINY_CLIP["hidden_size"])
    torch.testing.assert_close(z, torch.cat(parts, dim=1), rtol=0, atol=1e-6)


def test_clip_pooled_output_is_the_first_chunks():
    emb = clip(layer="hidden", layer_idx=-2, always_return_pooled=True)
    with torch.no_grad():
        _, pooled = emb([LONG])
        first = emb.transformer(input_ids=emb.tokenize([LONG])).pooler_output
    torch.testing.assert_close(pooled, first, rtol=0, atol=1e-6)


def test_batch_pads_short_prompts_with_empty_window_chunks():
    emb = clip()
    with torch.no_grad():
        z = emb([SHORT, LONG, ""])
        alone = emb([SHORT])
        empty = emb.transformer(input_ids=sequence([], 77, EOS)).last_hidden_state
    assert z.shape[1] == 154
    torch.testing.assert_close(z[0, :77], alone[0], rtol=0, atol=1e-6)
    for row in (0, 2):  # the second chunk of a short prompt is the empty window's encoding
        torch.testing.assert_close(z[row, 77:], empty[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(z[2, :77], empty[0], rtol=0, atol=1e-6)


def test_short_prompts_are_bit_identical_to_the_truncating_path():
    emb, old = clip(), clip(max_chunks=1)
    old.load_state_dict(emb.state_dict())
    prompts = [SHORT, "", "two dogs, (literally) in brackets"]
    with torch.no_grad():
        z = emb(prompts[:2])
        ref = emb.transformer(input_ids=emb.tokenize(prompts[:2])).last_hidden_state
        assert torch.equal(z, ref)
        assert torch.equal(z, old(prompts[:2]))
        # emphasis off: brackets are plain text, exactly the truncating tokenizer's ids
        plain = clip(emphasis=False)
        plain.load_state_dict(emb.state_dict())
        ref = emb.transformer(input_ids=emb.tokenize(prompts)).last_hidden_state
        assert torch.equal(plain(prompts), ref)


def test_max_chunks_cuts_with_one_warning(caplog):
    emb = clip(max_chunks=2)
    very_long = PHRASE * 14  # 238 tokens: 4 windows
    with caplog.at_level(logging.WARNING), torch.no_grad():
        z = emb([very_long])
        emb([very_long])
    assert z.shape[1] == 154
    assert sum("max_chunks=2" in r.getMessage() for r in caplog.records) == 1
    ids = emb.tokenizer.encode(very_long)
    with torch.no_grad():
        second = emb.transformer(input_ids=sequence(ids[75:150], 77, EOS)).last_hidden_state
    torch.testing.assert_close(z[:, 77:], second, rtol=0, atol=1e-6)
    truncated = clip(max_chunks=1)
    truncated.load_state_dict(emb.state_dict())
    with torch.no_grad():
        assert torch.equal(truncated([very_long]), emb([very_long])[:, :77])
    with pytest.raises(ConfigError, match="max_chunks must be an integer >= 1"):
        clip(max_chunks=0)


@pytest.mark.parametrize("layer", ["penultimate", "last"])
def test_openclip_long_prompt_is_its_windows_encoded_separately(layer):
    import open_clip

    emb = openclip(layer=layer)
    ids = open_clip.tokenizer._tokenizer.encode(LONG)  # open_clip's own BPE, no start / end
    assert 75 < len(ids) <= 150
    with torch.no_grad():
        z = emb([LONG, SHORT])
        parts = [emb.encode_with_transformer(sequence(w, 77, 0)) for w in windows(ids, 75)]
        short = emb.encode_with_transformer(open_clip.tokenize([SHORT]))
        empty = emb.encode_with_transformer(open_clip.tokenize([""]))
    torch.testing.assert_close(z[:1], torch.cat(parts, dim=1), rtol=0, atol=1e-6)
    assert torch.equal(sequence([], 77, 0), open_clip.tokenize([""]))  # pads with 0
    torch.testing.assert_close(z[1:], torch.cat([short, empty], dim=1), rtol=0, atol=1e-6)


def test_openclip2_sdxl_chunks_and_first_chunk_pooled():
    import open_clip

    emb = openclip(FrozenOpenCLIPEmbedder2, layer="penultimate", legacy=False,
                   always_return_pooled=True)  # fmt: skip
    ids = open_clip.tokenizer._tokenizer.encode(LONG)
    seqs = [sequence(w, 77, 0) for w in windows(ids, 75)]
    with torch.no_grad():
        z, pooled = emb([LONG])
        parts = [emb.encode_states(s)["penultimate"] for s in seqs]
        first_pooled = emb.model.encode_text(seqs[0])  # open_clip's own text feature
        short_z, short_pooled = emb([SHORT])
        ref_z = emb.encode_states(open_clip.tokenize([SHORT]))["penultimate"]
    torch.testing.assert_close(z, torch.cat(parts, dim=1), rtol=0, atol=1e-6)
    torch.testing.assert_close(pooled, first_pooled, rtol=0, atol=1e-6)
    assert torch.equal(short_z, ref_z)
    assert short_pooled.shape == pooled.shape


def test_text_transformer_chunks_of_max_length_minus_two():
    enc = CLIPTextEncoder(width=32, layers=2, heads=4, max_length=16).eval()
    prompt = "a red fox in the snow, " * 6  # 42 tokens: three windows of 14
    ids = enc.tokenizer.encode(prompt)
    assert len(ids) == 42
    with torch.no_grad():
        z = enc([prompt])
        parts = [enc.transformer(input_ids=sequence(w, 16, EOS)).last_hidden_state
                 for w in windows(ids, 14)]  # fmt: skip
        short = enc(["a fox"])
        ref = enc.transformer(input_ids=enc.tokenize(["a fox"])).last_hidden_state
    assert z.shape == (1, 48, 32)
    torch.testing.assert_close(z, torch.cat(parts, dim=1), rtol=0, atol=1e-6)
    assert torch.equal(short, ref)


def test_gradients_flow_through_every_chunk_of_the_trainable_encoder():
    enc = CLIPTextEncoder(width=32, layers=2, heads=4, max_length=16).train()
    first, second = "red fox snow forest", "blue whale ocean waves"
    prompt = "a " * 14 + second  # window 1: fourteen "a"; window 2: the second phrase
    ids = enc.tokenizer.encode(prompt)
    assert ids[:14] == enc.tokenizer.encode("a " * 14)
    z = enc([prompt, first])  # two chunks each: the batch pads the second prompt
    assert z.shape == (2, 32, 32)
    z[0, 16:].square().sum().backward()  # the loss sees the second chunk of prompt 0 only
    grad = enc.transformer.get_input_embeddings().weight.grad
    second_ids = set(enc.tokenizer.encode(second))
    assert all(grad[i].abs().sum() > 0 for i in second_ids)
    a_id = ids[0]  # only in window 1, which chunk 2 does not see
    assert grad[a_id].abs().sum() == 0
    assert all(grad[i].abs().sum() == 0 for i in set(enc.tokenizer.encode(first)) - second_ids)
    assert all(p.grad is not None for p in enc.transformer.encoder.parameters())
