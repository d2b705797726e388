"""Caption processing (kohya sd-scripts' caption options): exact behaviour, rates, seeding."""

from __future__ import annotations

import itertools
import math
import pickle
import random

import pytest
from torch.utils.data import DataLoader

from ldm.data.captions import (
    CaptionedDataset,
    CaptionProcessor,
    caption_processor_from_config,
    item_rng,
)


def within_binomial(hits: int, n: int, p: float, sigmas: float = 5.0) -> bool:
    """``hits`` of ``n`` draws is within ``sigmas`` standard deviations of a Binomial(n, p)."""
    return abs(hits - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


def draws(processor: CaptionProcessor, caption: str, n: int, epoch: int = 0) -> list[str]:
    return [processor(caption, item_rng(0, epoch, i), epoch) for i in range(n)]


# --- keep tokens, shuffle ------------------------------------------------------------------------


def test_keep_tokens_stay_in_place_while_the_rest_is_permuted() -> None:
    p = CaptionProcessor(shuffle_tags=True, keep_tokens=1)
    seen = set()
    for seed in range(200):
        tags = p("sks dog,  red ,grass,sky", item_rng(seed, 0, 0)).split(", ")
        assert tags[0] == "sks dog"
        assert sorted(tags[1:]) == ["grass", "red", "sky"]
        seen.add(tuple(tags[1:]))
    assert seen == set(itertools.permutations(["red", "grass", "sky"]))  # all 6 appear


def test_keep_tokens_two_and_more_than_the_tags() -> None:
    p = CaptionProcessor(shuffle_tags=True, keep_tokens=2)
    for seed in range(50):
        assert p("a, b, c, d", item_rng(seed, 0, 0)).startswith("a, b, ")
    assert CaptionProcessor(shuffle_tags=True, keep_tokens=9)("a, b", random.Random(0)) == "a, b"


def test_tags_are_stripped_and_rejoined_empty_tags_dropped() -> None:
    p = CaptionProcessor(shuffle_tags=True, keep_tokens=4)
    assert p(" a ,b,, c ,d,e", random.Random(0)).split(", ")[:4] == ["a", "b", "c", "d"]
    semi = CaptionProcessor(separator=";", shuffle_tags=True, keep_tokens=3)
    assert semi("x;y, z;w", random.Random(0)) == "x, y, z, w"


def test_no_tag_option_leaves_the_caption_as_it_is() -> None:
    p = CaptionProcessor(prefix="sks ", keep_tokens=1)
    assert p("a dog ,on  grass", random.Random(0)) == "sks a dog ,on  grass"


def test_keep_tokens_separator() -> None:
    p = CaptionProcessor(keep_tokens_separator="|||", shuffle_tags=True, keep_tokens=5)
    fronts, middles = set(), set()
    for seed in range(100):
        tags = p("sks, dog ||| red, grass, sky ||| best, hq", item_rng(seed, 0, 0)).split(", ")
        fronts.add(tuple(tags[:2]))
        middles.add(tuple(tags[2:5]))
        assert tags[5:] == ["best", "hq"]  # after a second separator: kept at the end
    assert fronts == {("sks", "dog")}  # the count (5) is ignored when the separator is present
    assert len(middles) == 6
    # without shuffling the marker is still removed; absent marker -> keep_tokens count
    assert (
        CaptionProcessor(keep_tokens_separator="|||")("a ||| b, c", random.Random(0)) == "a, b, c"
    )
    assert CaptionProcessor(keep_tokens_separator="|||")("a, b", random.Random(0)) == "a, b"
    q = CaptionProcessor(keep_tokens_separator="|||", keep_tokens=1, shuffle_tags=True)
    assert all(q("a, b, c", item_rng(s, 0, 0)).startswith("a, ") for s in range(30))


# --- dropout -------------------------------------------------------------------------------------


def test_tag_dropout_rate_and_kept_tags_never_dropped() -> None:
    rate, n = 0.3, 4000
    p = CaptionProcessor(tag_dropout=rate, keep_tokens=1)
    flex = ["b", "c", "d", "e"]
    dropped = 0
    for out in draws(p, "a, b, c, d, e", n):
        tags = out.split(", ")
        assert tags[0] == "a"
        assert [t for t in flex if t in tags] == tags[1:]  # order kept without shuffle_tags
        dropped += len(flex) - (len(tags) - 1)
    assert within_binomial(dropped, n * len(flex), rate)


def test_tag_dropout_one_drops_every_free_tag() -> None:
    assert CaptionProcessor(tag_dropout=1.0, keep_tokens=1)("a, b, c", random.Random(0)) == "a"


def test_caption_dropout_rate() -> None:
    rate, n = 0.1, 20000
    p = CaptionProcessor(caption_dropout=rate, prefix="sks, ")
    outs = draws(p, "a, b", n)
    assert set(outs) == {"", "sks, a, b"}  # dropped: "" including the prefix
    assert within_binomial(outs.count(""), n, rate)


def test_caption_dropout_every_n_epochs() -> None:
    p = CaptionProcessor(caption_dropout_every_n_epochs=3, prefix="x ")
    empty = [e for e in range(9) if all(c == "" for c in draws(p, "a", 20, epoch=e))]
    assert empty == [2, 5, 8]  # the 3rd, 6th, 9th epoch (epochs count from 0)
    assert draws(p, "a", 5, epoch=0) == ["x a"] * 5


# --- prefix / suffix, wildcards, replacements ----------------------------------------------------


def test_prefix_and_suffix_wrap_the_processed_tags() -> None:
    p = CaptionProcessor(
        prefix="photo of sks, ", suffix=", high quality", shuffle_tags=True, tag_dropout=0.2
    )
    for out in draws(p, "a, b, c", 100):
        assert out.startswith("photo of sks, ") and out.endswith(", high quality")
        assert out.count("photo of sks") == 1  # never shuffled or dropped
    assert p("", random.Random(0)) == "photo of sks, high quality"  # no dangling separators
    assert CaptionProcessor(prefix="sks, ")("", random.Random(0)) == "sks"
    assert CaptionProcessor(suffix=", hq")("", random.Random(0)) == "hq"


def test_first_line_only_without_wildcards() -> None:
    assert CaptionProcessor(prefix="p ")("one\ntwo", random.Random(0)) == "p one"


def test_wildcards() -> None:
    p = CaptionProcessor(wildcards=True)
    outs = set(draws(p, "a {red|blue|green} dog {{literal}}", 300))
    assert outs == {f"a {c} dog {{literal}}" for c in ("red", "blue", "green")}
    assert set(draws(p, "one\ntwo\nthree", 200)) == {"one", "two", "three"}  # a random line
    assert CaptionProcessor()("a {red|blue}", random.Random(0)) == "a {red|blue}"  # off


def test_tag_replace() -> None:
    p = CaptionProcessor(tag_replace={"1girl": "a woman", "lowres": ""})
    assert p("1girl, lowres, smile, 1girls", random.Random(0)) == "a woman, smile, 1girls"


# --- determinism ---------------------------------------------------------------------------------


FULL = dict(
    prefix="sks, ",
    shuffle_tags=True,
    keep_tokens=1,
    tag_dropout=0.2,
    caption_dropout=0.1,
    wildcards=True,
)


def test_same_seed_epoch_index_same_caption_and_call_order_free() -> None:
    p = CaptionProcessor(**FULL)
    cap = "a, {b|c}, d, e, f, g"
    forward = [p(cap, item_rng(7, 2, i), 2) for i in range(50)]
    backward = [p(cap, item_rng(7, 2, i), 2) for i in reversed(range(50))][::-1]
    assert forward == backward
    assert len(set(forward)) > 10
    assert forward != [p(cap, item_rng(7, 3, i), 3) for i in range(50)]  # another epoch
    assert forward != [p(cap, item_rng(8, 2, i), 2) for i in range(50)]  # another seed


def test_item_rng_is_stable() -> None:
    assert item_rng(0, 0, 0).random() == item_rng(0, 0, 0).random()
    assert item_rng(0, 0, 1).random() != item_rng(0, 1, 0).random()
    with pytest.raises(TypeError):
        item_rng(0, 0, 1.5)  # type: ignore[arg-type]


# --- config and errors ---------------------------------------------------------------------------


def test_from_config() -> None:
    assert caption_processor_from_config(None) is None
    assert caption_processor_from_config({}) is None
    assert caption_processor_from_config({"keep_tokens": 2, "separator": ";"}) is None  # no-op
    p = caption_processor_from_config({**FULL, "keep_tokens_separator": None, "tag_replace": None})
    assert p == CaptionProcessor(**FULL)


@pytest.mark.parametrize(
    ("cfg", "words"),
    [
        ({"tag_dropout": 1.5}, ["tag_dropout", "[0, 1]", "1.5"]),
        ({"caption_dropout": -0.1}, ["caption_dropout", "[0, 1]"]),
        ({"caption_dropout": True}, ["caption_dropout"]),
        ({"keep_tokens": -1}, ["keep_tokens", ">= 0"]),
        ({"keep_tokens": 1.0}, ["keep_tokens", "int"]),
        ({"caption_dropout_every_n_epochs": "2"}, ["caption_dropout_every_n_epochs"]),
        ({"shuffle_tags": 1}, ["shuffle_tags", "true or false"]),
        ({"separator": ""}, ["separator", "non-empty"]),
        ({"keep_tokens_separator": ","}, ["keep_tokens_separator", "'|||'"]),
        ({"prefix": 3}, ["prefix", "string"]),
        ({"tag_replace": {"a": 1}}, ["tag_replace"]),
        ({"shuffle_caption": True}, ["shuffle_caption -> shuffle_tags", "known keys", "prefix"]),
        ({"bogus": 1}, ["'bogus'", "tag_dropout", "wildcards"]),
    ],
)
def test_bad_values_raise_naming_the_key(cfg: dict, words: list[str]) -> None:
    with pytest.raises(ValueError) as info:
        caption_processor_from_config(cfg)
    for word in words:
        assert word in str(info.value)


def test_not_a_mapping_or_not_a_string() -> None:
    with pytest.raises(ValueError, match="mapping"):
        caption_processor_from_config(["shuffle_tags"])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="string"):
        CaptionProcessor(prefix="x")(None, random.Random(0))  # type: ignore[arg-type]


def test_processor_pickles() -> None:
    p = CaptionProcessor(**FULL, tag_replace={"b": "B"})
    q = pickle.loads(pickle.dumps(p))
    assert q == p
    assert q("a, b, c", item_rng(1, 2, 3), 2) == p("a, b, c", item_rng(1, 2, 3), 2)


# --- the data set wrapper ------------------------------------------------------------------------


class Items:
    """A map-style data set of caption items, with attributes other wrappers read."""

    image_key = "image"
    deterministic = True

    def __init__(self, n: int) -> None:
        self.items = [{"caption": f"t{i}, a, b, c, d", "index": i} for i in range(n)]
        self.items.append({"index": n})  # no caption

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def captions_of(loader: DataLoader) -> list[str]:
    return [c for batch in loader for c in batch["caption"]]


def test_wrapper_items_and_attributes() -> None:
    base = Items(4)
    ds = CaptionedDataset(base, {"prefix": "sks, ", "shuffle_tags": True, "keep_tokens": 1}, seed=3)
    assert len(ds) == 5 and ds.image_key == "image" and ds.deterministic is True
    assert ds.random_captions
    item = ds[1]
    assert item["caption"].startswith("sks, t1, ") and item["index"] == 1
    assert base.items[1]["caption"] == "t1, a, b, c, d"  # the wrapped item is not modified
    assert ds[4]["caption"] == "sks"  # no caption: processed as ""
    assert ds[1] == item  # same epoch, same caption
    with pytest.raises(AttributeError):
        _ = ds.missing_attribute


def test_wrapper_epochs_and_workers_match() -> None:
    cfg = {"shuffle_tags": True, "keep_tokens": 1, "tag_dropout": 0.2}

    def run(workers: int) -> list[list[str]]:
        ds = CaptionedDataset(Items(16), cfg, seed=5)
        loader = DataLoader(ds, batch_size=4, num_workers=workers, persistent_workers=workers > 0)
        out = []
        for epoch in range(2):
            ds.set_epoch(epoch)  # reaches persistent workers through shared memory
            out.append(captions_of(loader))
        return out

    serial, parallel = run(0), run(2)
    assert serial == parallel
    assert serial[0] != serial[1]  # a new draw each epoch
    expected = [CaptionedDataset(Items(16), cfg, seed=5)[i]["caption"] for i in range(17)]
    assert serial[0] == expected


def test_wrapper_pickles_and_forwards_set_epoch() -> None:
    class WithEpoch(Items):
        epoch = -1

        def set_epoch(self, epoch: int) -> None:
            self.epoch = epoch

    ds = CaptionedDataset(WithEpoch(3), CaptionProcessor(shuffle_tags=True), seed=1)
    ds.set_epoch(4)
    assert ds.epoch == 4 and ds.dataset.epoch == 4
    flat = CaptionedDataset(Items(3), {"shuffle_tags": True}, seed=1)
    flat.set_epoch(4)
    copy = pickle.loads(pickle.dumps(flat))
    assert copy.epoch == 4 and copy.image_key == "image"
    assert [copy[i] for i in range(4)] == [flat[i] for i in range(4)]


def test_wrapper_rejects_a_non_string_caption() -> None:
    ds = CaptionedDataset([{"caption": 3}], {"prefix": "x"})
    with pytest.raises(TypeError, match="'caption'"):
        ds[0]
