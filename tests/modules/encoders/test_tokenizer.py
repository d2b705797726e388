"""Offline CLIP tokenizer: ids equal Hugging Face CLIPTokenizer (SD v1) and open_clip.tokenize (SD v2)."""

from __future__ import annotations

import random

import pytest
import torch

from ldm.modules.encoders.tokenizer import BOS_ID, EOS_ID, CLIPTokenizer, get_tokenizer

AWKWARD = [
    "a photograph of an astronaut riding a horse",
    "",
    "   ",
    "Don't STOP!!  me\nnow, it's  we'll  they've  I'm  you'd  she'll",
    "multiple     spaces\tand\ttabs\n\nand\r\nnewlines",
    "punctuation: (a), [b]; {c}! d? e... f--g_h ~i~ `j` |k| <l> @m #n $o %p ^q &r *s +t =u",
    "café naïve résumé Ångström São Paulo ß ÆØÅ",
    "emoji 🐱🐶 👍🏽 👨‍👩‍👧 ❤️ 🚀",
    "日本語のテキスト 中文 한국어 русский текст العربية עברית",
    "e\u0301 vs \u00e9 (combining vs precomposed)",
    "ﬁ ligature, Ｆｕｌｌｗｉｄｔｈ, ½ ² Ⅷ ٣",
    "ΟΔΟΣ ΣΑΣ İstanbul STRASSE",
    "&amp; &lt;3 &quot;html&quot; &#39;entities&#39;",
    "“curly” ‘quotes’ don’t — dash … ellipsis",
    "numbers 1234567890 3.14159 $100 50% 2x4",
    "A<|endoftext|>B <|STARTOFTEXT|> <start_of_text>",
    "control\x00chars\x07here\x7f zero\u200bwidth nbsp\u00a0 em\u2003space",
    "Mojibake: Ã©tÃ© dÃ©jÃ  vu",
    "word " * 100,
    "supercalifragilisticexpialidocious" * 12,
    "a " * 74 + "b",
    "a " * 75 + "b",
    "a " * 76 + "b",
]


def _hf_ids(hf_tokenizer, texts):
    return hf_tokenizer(
        texts, truncation=True, max_length=77, padding="max_length", return_tensors="pt"
    )["input_ids"]


def test_sd_v1_ids_equal_hugging_face(hf_tokenizer):
    ours = CLIPTokenizer("sd-v1")(AWKWARD)["input_ids"]
    ref = _hf_ids(hf_tokenizer, AWKWARD)
    assert ours.dtype == torch.long and ours.shape == (len(AWKWARD), 77)
    for i, text in enumerate(AWKWARD):
        assert ours[i].tolist() == ref[i].tolist(), f"prompt {text!r}"


def test_sd_v2_ids_equal_open_clip():
    import open_clip

    ours = CLIPTokenizer("sd-v2").tokenize(AWKWARD)
    ref = open_clip.tokenize(AWKWARD)
    for i, text in enumerate(AWKWARD):
        assert ours[i].tolist() == ref[i].tolist(), f"prompt {text!r}"


def test_random_strings_match_both_references(hf_tokenizer):
    """Seeded fuzz over letters, digits, symbols, whitespace, accents, emoji and CJK."""
    import open_clip

    pool = list("aAzZ09 '\"!?.,;:-_()[]<>|/\\&#@$%*+=~`\t\n") + [
        "'s",
        "'LL",
        "&amp;",
        "<|endoftext|>",
    ]
    pool += [
        chr(c) for c in (0xE9, 0x301, 0x130, 0x3A3, 0xDF, 0xFB01, 0xFF21, 0x3000, 0xA0, 0x200B)
    ]
    pool += [
        chr(c) for c in (0x1C, 0x85, 0x1F600, 0x1F3FD, 0x200D, 0x65E5, 0x440, 0x2019, 0xBD, 0x0)
    ]
    rng = random.Random(0)
    texts = ["".join(rng.choice(pool) for _ in range(rng.randint(0, 60))) for _ in range(300)]
    assert (
        CLIPTokenizer("sd-v1")(texts)["input_ids"].tolist() == _hf_ids(hf_tokenizer, texts).tolist()
    )
    assert CLIPTokenizer("sd-v2").tokenize(texts).tolist() == open_clip.tokenize(texts).tolist()


@pytest.mark.parametrize(("mode", "pad"), [("sd-v1", EOS_ID), ("sd-v2", 0)])
def test_specials_truncation_and_padding(mode, pad):
    tok = CLIPTokenizer(mode)
    empty = tok.tokenize("")[0].tolist()
    assert empty[:2] == [BOS_ID, EOS_ID] and set(empty[2:]) == {pad}
    long = tok.tokenize("cat " * 200)[0].tolist()
    assert long[0] == BOS_ID and long[-1] == EOS_ID and len(long) == 77
    assert long[1:76] == tok.encode("cat " * 75)  # first 75 content tokens kept
    batch = tok(["a cat", "cat " * 200])
    assert batch["attention_mask"].sum(1).tolist() == [4, 77]


def test_hf_style_call_and_decode():
    tok = get_tokenizer("sd-v1")
    out = tok(
        ["a red cube", "two dogs"],
        truncation=True,
        max_length=77,
        return_length=True,
        return_overflowing_tokens=False,
        padding="max_length",
        return_tensors="pt",
    )
    assert out["input_ids"].shape == (2, 77) and out["length"].tolist() == [77, 77]
    assert tok.decode(out["input_ids"][0]) == "a red cube"
    longest = tok(["a", "a b c"], padding="longest")["input_ids"]
    assert longest.shape == (2, 5) and longest[0].tolist() == [BOS_ID, 320, EOS_ID, EOS_ID, EOS_ID]
    with pytest.raises(ValueError, match="mode"):
        CLIPTokenizer("sd-v3")
