"""Emphasis syntax: the parsed weights, and weighting that changes only the weighted tokens' rows
(z_i <- w_i * z_i) while every other row equals the unweighted prompt's encoding bit for bit."""

from __future__ import annotations

import pytest
import torch
from long_prompts import PHRASE, clip, openclip

from ldm.modules.encoders.prompt_weighting import parse_prompt
from ldm.modules.encoders.text_transformer import CLIPTextEncoder

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a (cat:1.3) on a mat", [("a ", 1.0), ("cat", 1.3), (" on a mat", 1.0)]),
        ("a (cat) b", [("a ", 1.0), ("cat", 1.1), (" b", 1.0)]),
        ("[cat]", [("cat", 1 / 1.1)]),
        ("((cat))", [("cat", 1.1 * 1.1)]),
        ("[[cat]]", [("cat", 1 / 1.1 / 1.1)]),
        ("((cat:1.5) dog)", [("cat", 1.5 * 1.1), (" dog", 1.1)]),
        ("[(cat:2)]", [("cat", 2 / 1.1)]),
        (r"\(cat\) \[dog\] a\\b", [(r"(cat) [dog] a\b", 1.0)]),
        ("a) b] c:2)", [("a) b] c:2)", 1.0)]),  # closing nothing: literal
        ("(open to the end", [("open to the end", 1.1)]),
        ("a photo of a cat: 1990", [("a photo of a cat: 1990", 1.0)]),
        ("(same:1.0) text", [("same text", 1.0)]),
    ],
)
def test_parsed_weights(text, expected):
    (segment,) = parse_prompt(text)
    assert [f for f, _ in segment] == [f for f, _ in expected]
    for (_, w), (_, ref) in zip(segment, expected, strict=True):
        assert w == pytest.approx(ref, rel=1e-12)


def test_break_starts_a_new_segment_and_only_as_a_word():
    assert parse_prompt("a cat BREAK (a dog:1.2)") == [[("a cat", 1.0)], [("a dog", 1.2)]]
    assert parse_prompt("BREAKFAST, Break") == [[("BREAKFAST, Break", 1.0)]]


def _rows_changed(weighted: torch.Tensor, plain: torch.Tensor) -> list[int]:
    return [i for i in range(plain.shape[1]) if not torch.equal(weighted[:, i], plain[:, i])]


def test_weight_scales_only_the_weighted_tokens_rows():
    emb = clip()
    with torch.no_grad():
        z = emb(
            ["a (cat:1.3) on a mat", "a cat on (a mat)", "a cat on [a mat]", "a ((cat)) on a mat"]
        )
        plain = emb(["a cat on a mat"]).expand(4, -1, -1)
    # rows: 0 BOS, 1 "a", 2 "cat", 3 "on", 4 "a", 5 "mat", 6 EOS, 7.. padding
    expected = {0: ({2}, 1.3), 1: ({4, 5}, 1.1), 2: ({4, 5}, 1 / 1.1), 3: ({2}, 1.1 * 1.1)}
    for b, (rows, w) in expected.items():
        assert set(_rows_changed(z[b : b + 1], plain[b : b + 1])) == rows
        for r in rows:
            assert torch.equal(z[b, r], plain[b, r] * torch.tensor(w, dtype=torch.float32))


def test_escaped_brackets_are_literal_and_emphasis_off_reads_them_as_text():
    emb = clip()
    plain = clip(emphasis=False)
    plain.load_state_dict(emb.state_dict())
    with torch.no_grad():
        escaped = emb([r"a \(cat\) on a mat"])
        literal = plain(["a (cat) on a mat"])
        weighted = emb(["a (cat) on a mat"])
    assert torch.equal(escaped, literal)  # ids of "(" "cat" ")", weight 1
    assert not torch.equal(weighted, literal)


def test_weight_in_the_second_chunk_lands_on_its_row():
    emb = clip()
    prompt = PHRASE * 5  # 85 tokens: the last 10 in chunk two
    ids = emb.tokenizer.encode(prompt)
    with torch.no_grad():
        plain = emb([prompt])
        weighted = emb([PHRASE * 4 + "a photograph of a red fox sitting in a snowy (forest:0.5) "
                        "at dawn, soft light, "])  # fmt: skip
    forest = 68 + ids[68:].index(emb.tokenizer.encode("forest")[0])  # 78 in the token list
    assert forest >= 75
    row = 77 + 1 + (forest - 75)  # second chunk: after its BOS
    assert _rows_changed(weighted, plain) == [row]
    assert torch.equal(weighted[0, row], plain[0, row] * 0.5)


def test_weighting_in_openclip_and_the_trainable_encoder_with_gradients():
    oc = openclip()
    with torch.no_grad():
        z, plain = oc(["a (cat:1.3) on a mat"]), oc(["a cat on a mat"])
    assert _rows_changed(z, plain) == [2]
    assert torch.equal(z[0, 2], plain[0, 2] * 1.3)
    enc = CLIPTextEncoder(width=32, layers=1, heads=4, max_length=16).train()
    z = enc(["a (cat:2) on a mat"])
    z[0, 2].sum().backward()
    weighted_grad = enc.transformer.get_input_embeddings().weight.grad.clone()
    enc.zero_grad()
    enc(["a cat on a mat"])[0, 2].sum().backward()
    plain_grad = enc.transformer.get_input_embeddings().weight.grad
    torch.testing.assert_close(weighted_grad, 2 * plain_grad, rtol=1e-6, atol=0)


def test_break_chunks_are_the_parts_encoded_alone():
    emb = clip()
    with torch.no_grad():
        z = emb(["a cat BREAK (a dog:1.2)"])
        cat, dog = emb(["a cat"]), emb(["a dog"])
    assert z.shape[1] == 154
    assert torch.equal(z[:, :77], cat)
    assert _rows_changed(z[:, 77:], dog) == [1, 2]
    assert torch.equal(z[:, 78:80], dog[:, 1:3] * 1.2)
