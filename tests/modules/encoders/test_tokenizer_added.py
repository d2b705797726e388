"""CLIPTokenizer.add_tokens: new ids, whole-unit matching, expansion, removal, no leaks."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from ldm.modules.encoders.tokenizer import (
    BOS_ID,
    EOS_ID,
    VOCAB_SIZE,
    CLIPTokenizer,
    end_token_positions,
    get_tokenizer,
)

PROMPTS = [
    "",
    "a photo of a cat",
    "A <PURPLE> cat, my-style!",
    "my-styles and mymy-style, <purple>s x<purple>y",
    "Don't panic!  émoji 🐱 <|endoftext|> " * 6,
]


@pytest.mark.parametrize("mode", ["sd-v1", "sd-v2"])
def test_new_ids_expand_in_place(mode):
    base = get_tokenizer(mode)
    tok = base.copy()
    ids = tok.add_tokens({"<purple>": 3, "my-style": 1})
    assert ids == {"<purple>": [49408, 49409, 49410], "my-style": [49411]}
    assert tok.vocab_size == VOCAB_SIZE + 4 and base.vocab_size == VOCAB_SIZE
    a, cat = base.encode("a"), base.encode("cat")
    assert tok.encode("a <purple> cat") == a + [49408, 49409, 49410] + cat
    assert tok.encode("a <Purple>cat") == a + [49408, 49409, 49410] + cat  # case as CLIP lowers
    # whole words only: inside a longer word the text is BPE-encoded as before
    assert tok.encode("my-styles mymy-style") == base.encode("my-styles mymy-style")
    assert tok.encode("my-style, x") == [49411] + base.encode(", x")
    row = tok.tokenize("a <purple> cat")[0].tolist()
    pad = tok.pad_token_id
    assert row[:7] == [BOS_ID, *a, 49408, 49409, 49410, *cat, EOS_ID] and set(row[7:]) == {pad}


def test_truncation_keeps_end_token_and_padding():
    tok = get_tokenizer("sd-v1").copy()
    tok.add_tokens({"<long>": 8})
    row = tok.tokenize("cat " * 70 + "<long>")[0].tolist()
    assert len(row) == 77 and row[0] == BOS_ID and row[-1] == EOS_ID
    assert row[71:76] == [49408, 49409, 49410, 49411, 49412]  # cut like any other ids
    batch = tok(["<long>", "a"], padding="longest")
    assert batch["input_ids"].shape == (2, 10) and batch["attention_mask"].sum(1).tolist() == [
        10,
        3,
    ]


def test_matches_hugging_face_added_tokens(hf_tokenizer):
    """Tokens with non-word edges split as transformers' CLIPTokenizer.add_tokens splits them."""
    hf = copy.deepcopy(hf_tokenizer)
    hf.add_tokens(["<purple>", "<purple>_1", "<cat-toy>"])
    ours = get_tokenizer("sd-v1").copy()
    ours.add_tokens({"<purple>": 2, "<cat-toy>": 1})
    hf_texts = ["a <purple> <purple>_1 photo", "x<cat-toy>y, <Cat-Toy>", "plain text"]
    our_texts = ["a <purple> photo", "x<cat-toy>y, <Cat-Toy>", "plain text"]
    hf_ids = hf(hf_texts, padding="max_length", max_length=77, truncation=True)["input_ids"]
    assert ours(our_texts)["input_ids"].tolist() == hf_ids  # same ids: 49408-9, then 49410


@pytest.mark.parametrize("mode", ["sd-v1", "sd-v2"])
def test_remove_restores_exactly(mode):
    fresh = CLIPTokenizer(mode)
    tok = get_tokenizer(mode).copy()
    tok.add_tokens({"<a>": 2, "<b>": 3, "my-style": 1})
    assert tok.remove_tokens("<a>") == {"<a>": [49408, 49409]}
    assert tok.added_tokens == {"<b>": [49408, 49409, 49410], "my-style": [49411]}  # moved down
    assert tok.encode("<b> my-style") == [49408, 49409, 49410, 49411]
    tok.remove_tokens()
    assert tok.added_tokens == {} and tok.vocab_size == VOCAB_SIZE
    assert tok(PROMPTS)["input_ids"].tolist() == fresh(PROMPTS)["input_ids"].tolist()
    with pytest.raises(ValueError, match="never added"):
        tok.remove_tokens("<zzz>")


def test_no_leak_between_instances_and_refusals():
    shared = get_tokenizer("sd-v1")
    with pytest.raises(ValueError, match="shared.*copy"):
        shared.add_tokens("<x>")
    one, two = shared.copy(), shared.copy()
    one.add_tokens("<x>")
    assert two.encode("<x>") == shared.encode("<x>") != one.encode("<x>")
    with pytest.raises(ValueError, match="already added"):
        one.add_tokens("<X>")  # same token after cleaning
    with pytest.raises(ValueError, match="vectors"):
        one.add_tokens({"<y>": 0})
    with pytest.raises(ValueError, match="empty"):
        one.add_tokens("  ")


def test_pickle_and_deepcopy_keep_tokens_apart():
    tok = get_tokenizer("sd-v2").copy()
    tok.add_tokens({"<p>": 2})
    again = pickle.loads(pickle.dumps(tok))
    assert again.encode("a <p>") == tok.encode("a <p>") and again.vocab_size == tok.vocab_size
    twin = copy.deepcopy(tok)
    twin.add_tokens("<q>")
    assert "<q>" not in tok.added_tokens
    assert copy.deepcopy(get_tokenizer("sd-v2")) is get_tokenizer("sd-v2")  # shared stays shared


def test_decode_names_new_tokens():
    tok = get_tokenizer("sd-v1").copy()
    tok.add_tokens({"<p>": 2})
    assert tok.decode(tok.tokenize("a <p> cat")[0]) == "a <p> <p>_1 cat"


def test_end_token_positions_skip_new_ids():
    tokens = torch.tensor([[BOS_ID, 320, 49408, 49409, EOS_ID, 0], [BOS_ID, EOS_ID, 0, 0, 0, 0]])
    assert end_token_positions(tokens).tolist() == [4, 1]
    assert tokens.argmax(-1).tolist() == [3, 1]  # what plain argmax pooling would pick
