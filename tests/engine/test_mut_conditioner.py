"""Conditioner with fake embedders whose outputs are known: validation, reading inputs, dropout
with a zero_null embedder in the middle, embed / encode, the unconditional conditioning (null
inputs, negative prompts, zeros, repeated encodings), context alignment and repeat_cond."""

from __future__ import annotations

import pytest
import torch

from ldm.engine.conditioner import (
    ZERO_KEY,
    Conditioner,
    Embedder,
    drop_entries,
    repeat_cond,
    zero_like,
    zero_rows,
)

L, D = 2, 3  # rows of one context chunk, feature size of the fake text encoder


class FakeText:
    """Prompt p -> [chunks * L, D] filled with len(p) + 10 * (embedder offset) + 0.1 * column;
    a prompt's chunk count is 1 + its number of '|' (the batch takes the largest). Records the
    prompts of every call."""

    def __init__(self, offset: float = 0.0) -> None:
        self.offset = offset
        self.calls: list[list[str]] = []

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        self.calls.append(list(prompts))
        chunks = 1 + max(p.count("|") for p in prompts)
        cols = torch.arange(D, dtype=torch.float32) * 0.1
        return torch.stack(
            [(len(p) + self.offset + cols).expand(chunks * L, D) for p in prompts]
        ).contiguous()


def text_value(p: str, offset: float = 0.0, chunks: int = 1) -> torch.Tensor:
    """What FakeText gives for one prompt, written out: [chunks * L, D]."""
    return torch.tensor([[len(p) + offset + 0.1 * c for c in range(D)]] * (chunks * L))


class FakeLabel:
    """Class labels [B] -> [B, 2] = (label, 2 * label) as float; records its calls."""

    def __init__(self) -> None:
        self.calls: list[torch.Tensor] = []

    def __call__(self, labels: torch.Tensor) -> torch.Tensor:
        self.calls.append(labels.clone())
        x = labels.to(torch.float32)
        return torch.stack([x, 2 * x], dim=1)


def test_embedder_validation_keys_and_read() -> None:
    for rate in (0.0, 1.0):  # both bounds are allowed
        assert Embedder("a", encode=str, ucg_rate=rate).ucg_rate == rate
    with pytest.raises(ValueError, match="must be in"):
        Embedder("a", encode=str, ucg_rate=-0.01)
    for kind in ("crossattn", "vector", "concat", "auto"):
        assert Embedder("a", encode=str, kind=kind).kind == kind
    with pytest.raises(ValueError, match="kind must be one of"):
        Embedder("a", encode=str, kind="other")
    one = Embedder("txt", encode=str)
    both = Embedder(("mask", "masked"), encode=str, kind="concat")
    assert one.keys == ("txt",) and both.keys == ("mask", "masked")
    inputs = {"txt": ["a"], "mask": 1, "masked": 2, "other": 3}
    assert one.read(inputs) == ["a"]
    assert both.read(inputs) == {"mask": 1, "masked": 2}
    assert (one.ucg_rate, one.null, one.is_trainable, one.zero_null) == (0.0, None, False, False)


def test_zero_like_and_zero_rows() -> None:
    x = torch.arange(1.0, 13.0).view(3, 2, 2).double()
    z = zero_like(x)
    assert z.dtype == torch.float64 and torch.equal(z, torch.zeros(3, 2, 2, dtype=torch.float64))
    pair = zero_like((x, torch.ones(3, 4)))
    assert isinstance(pair, tuple) and [t.tolist() for t in pair] == [
        torch.zeros(3, 2, 2).tolist(),
        torch.zeros(3, 4).tolist(),
    ]
    assert isinstance(zero_like([x]), list)
    rows = torch.tensor([True, False, True])
    got = zero_rows(x, rows)
    assert got.dtype == torch.float64
    assert got.tolist() == [[[0, 0], [0, 0]], [[5, 6], [7, 8]], [[0, 0], [0, 0]]]
    seq, pooled = zero_rows((x, torch.tensor([[1.0], [2.0], [3.0]])), rows)
    assert torch.equal(seq, got) and pooled.tolist() == [[0.0], [2.0], [0.0]]
    as_list = zero_rows([torch.tensor([[1.0], [2.0], [3.0]])], rows)
    assert isinstance(as_list, list) and as_list[0].tolist() == [[0.0], [2.0], [0.0]]


def test_input_keys_text_key_and_default_assemble() -> None:
    text = Embedder("txt", encode=FakeText(), null="")
    label = Embedder("cls", encode=FakeLabel(), kind="vector", null=0)
    concat = Embedder(("mask", "cls"), encode=lambda d: d["mask"], kind="concat")
    cond = Conditioner([label, text, concat])
    assert cond.input_keys == ["cls", "txt", "mask"]  # first seen order, no duplicates
    assert cond.text_key() == "txt"
    assert Conditioner([label]).text_key() is None
    assert Conditioner([Embedder(("a", "b"), encode=str, null="")]).text_key() == "a"
    # no assemble: the first embedder's output is the conditioning
    got = Conditioner([label, text]).encode({"cls": torch.tensor([3]), "txt": ["ab"]})
    assert got.tolist() == [[3.0, 6.0]]


def test_drop_goes_on_after_a_zero_null_embedder() -> None:
    zero = Embedder("pooled", encode=lambda x: x, kind="vector", ucg_rate=0.5, zero_null=True)
    text = Embedder("txt", encode=FakeText(), ucg_rate=1.0, null="")
    cond = Conditioner([zero, text])
    batch = {"pooled": torch.ones(4, 2), "txt": ["a", "b", "c", "d"]}
    u = torch.rand(4, generator=torch.Generator().manual_seed(5))
    out = cond.drop(batch, generator=torch.Generator().manual_seed(5))
    assert out[ZERO_KEY + "0"].tolist() == (u < 0.5).tolist()
    assert out["txt"] == ["", "", "", ""]  # the embedder after the zero_null one is dropped too
    assert ZERO_KEY + "1" not in out


def test_drop_missing_key_raises_only_for_dropped_inputs() -> None:
    cond = Conditioner(
        [Embedder("txt", encode=str, ucg_rate=0.0, null=""), Embedder("cls", encode=str, null=0)]
    )
    assert cond.drop({"x": 1}) == {"x": 1}  # rate 0: nothing read, nothing required
    with pytest.raises(KeyError, match="'txt' \\(ucg_rate 0.5\\) is not in the batch"):
        Conditioner([Embedder("txt", encode=str, ucg_rate=0.5, null="")]).drop({"x": 1})


def test_embed_zeroes_the_dropped_rows_of_the_right_embedder_and_encode_assembles() -> None:
    text = Embedder("txt", encode=FakeText(), null="")
    label = Embedder("cls", encode=FakeLabel(), kind="vector", null=0)
    cond = Conditioner([text, label], assemble=lambda outs: {"ctx": outs[0], "vec": outs[1]})
    inputs = {
        "txt": ["a", "bcd"],
        "cls": torch.tensor([2, 5]),
        ZERO_KEY + "1": torch.tensor([False, True]),
    }
    outs = cond.embed(inputs)
    assert torch.equal(outs[0], torch.stack([text_value("a"), text_value("bcd")]))
    assert outs[1].tolist() == [[2.0, 4.0], [0.0, 0.0]]
    got = cond.encode(inputs)
    assert torch.equal(got["ctx"], outs[0]) and torch.equal(got["vec"], outs[1])
    with pytest.raises(KeyError, match="\\['cls'\\] are missing"):
        cond.embed({"txt": ["a"]})


def test_two_text_encoders_are_padded_to_the_longest_context() -> None:
    first, second = FakeText(), FakeText(offset=100.0)
    cond = Conditioner(
        [
            Embedder("txt", encode=first, null=""),
            Embedder("txt2", encode=second, null=""),
            Embedder("cls", encode=FakeLabel(), kind="vector", null=0),
        ],
        assemble=list,
    )
    outs = cond.embed({"txt": ["a|b"], "txt2": ["xy"], "cls": torch.tensor([1])})
    assert torch.equal(outs[0][0], text_value("a|b", chunks=2))
    # the second one got one empty-window chunk (its encoding of "") appended
    expect = torch.cat([text_value("xy", 100.0), text_value("", 100.0)])
    assert torch.equal(outs[1][0], expect)
    assert second.calls == [["xy"], [""]]
    assert outs[2].tolist() == [[1.0, 2.0]]
    # the empty context: each text embedder's "" concatenated on the feature axis
    ctx = cond.empty_context()
    assert torch.equal(ctx, torch.cat([text_value(""), text_value("", 100.0)], -1)[None])
    # one text embedder: nothing to align, the prompt "" is never encoded
    single = FakeText()
    one = Conditioner(
        [Embedder("txt", encode=single, null=""), Embedder("n", encode=single, kind="vector")],
        assemble=list,
    )
    one.embed({"txt": ["a|b"], "n": ["c"]})
    assert single.calls == [["a|b"], ["c"]]
    # a string null on a vector embedder does not make it a text embedder
    vec = Conditioner([Embedder("txt", encode=FakeText(), kind="vector", null="")])
    assert vec.empty_context() is None
    auto = Conditioner([Embedder("txt", encode=FakeText(), kind="auto", null="")])
    assert torch.equal(auto.empty_context(), text_value("")[None])


def test_match_lengths_pads_the_shorter_context() -> None:
    cond = Conditioner([Embedder("txt", encode=FakeText(), null="")])
    c = cond.encode({"txt": ["ab|cd"]})
    u = cond.uncond({"txt": ["ab|cd"]}, 1)
    c2, u2 = cond.match_lengths(c, u)
    assert torch.equal(c2, c)
    assert torch.equal(u2[0], torch.cat([text_value(""), text_value("")]))


def _uncond_conditioner() -> tuple[Conditioner, FakeText, FakeLabel, list]:
    text, label = FakeText(), FakeLabel()
    concat_calls: list = []

    def mask_enc(x: torch.Tensor) -> torch.Tensor:
        concat_calls.append(x)
        return x * 10

    cond = Conditioner(
        [
            Embedder("txt", encode=text, null=""),
            Embedder("cls", encode=label, kind="vector", null=7),
            Embedder("score", encode=lambda s: s[:, None] * 1.0, kind="vector", null=2.5),
            Embedder("mask", encode=mask_enc, kind="concat"),
        ],
        assemble=list,
    )
    return cond, text, label, concat_calls


def test_uncond_null_inputs_encoded_once_and_repeated() -> None:
    cond, text, label, concat_calls = _uncond_conditioner()
    inputs = {
        "txt": ["a", "bb", "ccc"],
        "cls": torch.tensor([1, 2, 3]),
        "score": torch.tensor([6.0, 6.0, 6.0]),
        "mask": torch.tensor([[1.0], [2.0], [3.0]]),
    }
    outs = cond.uncond(inputs, 3)
    assert torch.equal(outs[0], text_value("")[None].expand(3, L, D))
    assert text.calls == [[""]]  # one encoding of the null prompt, repeated
    assert outs[1].tolist() == [[7.0, 14.0]] * 3
    assert len(label.calls) == 1 and label.calls[0].tolist() == [7]
    assert label.calls[0].dtype == torch.long
    assert outs[2].tolist() == [[2.5]] * 3  # float null: SDXL's negative aesthetic score
    assert outs[3].tolist() == [[10.0], [20.0], [30.0]]  # no null: the conditional output
    assert len(concat_calls) == 1
    # with the conditional outputs given, they are reused, not re-encoded
    given = [None, None, None, torch.tensor([[4.0], [5.0], [6.0]])]
    outs = cond.uncond(inputs, 3, outputs=given)
    assert outs[3] is given[3] and len(concat_calls) == 1
    # one sample: encoded as it is
    one = cond.uncond({k: v[:1] for k, v in inputs.items()}, 1)
    assert torch.equal(one[0], text_value("")[None]) and text.calls[-1] == [""]
    assert one[1].tolist() == [[7.0, 14.0]]


def test_uncond_negative_prompts() -> None:
    cond, text, _, _ = _uncond_conditioner()
    inputs = {
        "txt": ["a", "bb"],
        "cls": torch.tensor([1, 2]),
        "score": torch.tensor([6.0, 6.0]),
        "mask": torch.tensor([[1.0], [2.0]]),
    }
    outs = cond.uncond(inputs, 2, negative_prompt="ugly")
    assert torch.equal(outs[0], text_value("ugly")[None].expand(2, L, D))
    assert text.calls == [["ugly"]]
    assert outs[1].tolist() == [[7.0, 14.0]] * 2  # the label embedder keeps its null
    outs = cond.uncond(inputs, 2, negative_prompt=["x", "yyy"])
    assert text.calls[-1] == ["x", "yyy"]  # different prompts: encoded together
    assert torch.equal(outs[0], torch.stack([text_value("x"), text_value("yyy")]))
    outs = cond.uncond(inputs, 2, negative_prompt=("same", "same"))
    assert text.calls[-1] == ["same"]
    assert torch.equal(outs[0], text_value("same")[None].expand(2, L, D))
    with pytest.raises(ValueError, match="3 negative prompts for 2 samples"):
        cond.uncond(inputs, 2, negative_prompt=["a", "b", "c"])


def test_uncond_zero_null_embedders() -> None:
    text = FakeText()
    pooled = Embedder("txt", encode=lambda p: text(p)[:, 0], kind="vector", null="", zero_null=True)
    size = Embedder(
        "size", encode=lambda s: s.reshape(-1, 1) * 1.0, kind="vector", null=3, zero_null=True
    )
    cond = Conditioner([pooled, size], assemble=list)
    inputs = {"txt": ["ab", "c"], "size": torch.tensor([[3.0], [4.0]])}
    outs = cond.uncond(inputs, 2)
    assert outs[0].tolist() == [[0.0] * D] * 2 and outs[1].tolist() == [[0.0], [0.0]]
    assert text.calls == [["ab", "c"]]  # zeros shaped as the conditional output
    given = [torch.ones(2, 5), torch.ones(2, 1)]
    outs = cond.uncond(inputs, 2, outputs=given)
    assert outs[0].tolist() == [[0.0] * 5] * 2 and len(text.calls) == 1
    # with a negative prompt: encoded instead of zeros, and the other one gets its null value
    outs = cond.uncond(inputs, 2, negative_prompt="neg")
    assert outs[0].tolist() == [text_value("neg")[0].tolist()] * 2
    assert outs[1].tolist() == [[3.0], [3.0]]


def test_uncond_aligns_two_text_encoders() -> None:
    first, second = FakeText(), FakeText(offset=100.0)
    cond = Conditioner(
        [Embedder("a", encode=first, null=""), Embedder("b", encode=second, null="")],
        assemble=list,
    )
    outs = cond.uncond({"a": ["x"], "b": ["y"]}, 1, negative_prompt="p|q")
    assert torch.equal(outs[0][0], text_value("p|q", chunks=2))
    assert torch.equal(outs[1][0], text_value("p|q", 100.0, chunks=2))
    with pytest.raises(KeyError, match="missing"):
        cond.uncond({"a": ["x"]}, 1)


def test_repeat_cond() -> None:
    x = torch.tensor([[1.0, 2.0]])
    assert repeat_cond(x, 3).tolist() == [[1.0, 2.0]] * 3
    two = torch.tensor([[1.0], [9.0]])
    assert repeat_cond(two, 2).tolist() == [[1.0], [1.0]]  # the first row, n times
    got = repeat_cond({"c_crossattn": [x], "c_concat": (x,), "y": 5}, 2)
    assert isinstance(got["c_concat"], tuple) and isinstance(got["c_crossattn"], list)
    assert got["c_crossattn"][0].tolist() == [[1.0, 2.0]] * 2
    assert got["c_concat"][0].tolist() == [[1.0, 2.0]] * 2
    assert got["y"] == 5


def test_drop_entries_keeps_the_entries_dtype() -> None:
    """A null given as a float (e.g. read from YAML) still gives integer class labels."""
    labels = torch.tensor([1, 2, 3])
    got = drop_entries(labels, 1.0, 7.0)
    assert got.dtype == torch.long and got.tolist() == [7, 7, 7]
    half = drop_entries(torch.ones(2, 1, dtype=torch.float16), 1.0, 0.5)
    assert half.dtype == torch.float16 and half.tolist() == [[0.5], [0.5]]


def test_uncond_goes_on_after_an_embedder_without_a_null() -> None:
    text = FakeText()
    cond = Conditioner(
        [
            Embedder("mask", encode=lambda m: m * 2, kind="concat"),
            Embedder("txt", encode=text, null=""),
        ],
        assemble=list,
    )
    outs = cond.uncond({"mask": torch.tensor([[1.0]]), "txt": ["abc"]}, 1)
    assert len(outs) == 2 and outs[0].tolist() == [[2.0]]
    assert torch.equal(outs[1], text_value("")[None]) and text.calls == [[""]]
