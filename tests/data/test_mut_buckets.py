"""Aspect-ratio buckets and the single-bucket batch sampler: exact, hand-computed cases.

The bucket lists follow kohya sd-scripts' NovelAI scheme: for each width w (a multiple of the
step, from min_side to max_side) the tallest height h = min(max_side, floor(area / w / step) *
step), kept when h >= min_side, both orientations, plus the square floor(sqrt(area) / step) * step.
Each expected list below was worked out by hand from that rule.
"""

from __future__ import annotations

import logging

import pytest
import torch
from omegaconf import OmegaConf

from ldm.data.bucket_sampler import BucketBatchSampler, EpochRelay, _split_until_divisible
from ldm.data.buckets import (
    BucketSpec,
    assign_bucket,
    describe_buckets,
    make_buckets,
    nearest_bucket,
)

# 512 px, step 64: widths 256..1024, area 262144 (SD v1 / NovelAI). Sorted by w / h.
SD512 = [
    (1024, 256),
    (960, 256),
    (896, 256),
    (832, 256),
    (768, 320),
    (704, 320),
    (640, 384),
    (576, 448),
    (512, 512),
    (448, 576),
    (384, 640),
    (320, 704),
    (320, 768),
    (256, 832),
    (256, 896),
    (256, 960),
    (256, 1024),
]


def test_make_buckets_512_exact_list_in_aspect_order() -> None:
    assert make_buckets(512, 64) == SD512
    assert make_buckets() == SD512  # the defaults: 512 px, step 64
    with pytest.raises(ValueError, match="smaller than the step"):
        make_buckets(step=513)  # the default resolution is 512


@pytest.mark.parametrize("resolution", [64, 100, 256, 333, 512, (192, 320), (768, 1024)])
@pytest.mark.parametrize("step", [8, 32, 64])
def test_no_two_buckets_share_an_aspect_ratio_and_sides_are_ints(
    resolution: object, step: int
) -> None:
    buckets = make_buckets(resolution, step)
    assert len({w / h for h, w in buckets}) == len(buckets)
    # pixel counts for the resize and crop: ints, not floats equal to them
    assert {type(v) for b in buckets for v in b} == {int}


def test_make_buckets_256_exact() -> None:
    # area 65536, sides 128..512: w=128 -> 512, 192 -> 320, 256 -> 256, 320 -> 192, 384 -> 128,
    # 448 -> 128, 512 -> 128
    assert make_buckets(256, 64) == [
        (512, 128),
        (448, 128),
        (384, 128),
        (320, 192),
        (256, 256),
        (192, 320),
        (128, 384),
        (128, 448),
        (128, 512),
    ]


def test_make_buckets_rectangular_resolution_adds_the_square() -> None:
    # (192, 320): area 61440, base int(sqrt) = 247, sides 64..448, square 192 (which no width
    # gives: w=192 -> h=320)
    assert make_buckets((192, 320), 64) == [
        (448, 64),
        (448, 128),
        (384, 128),
        (320, 192),
        (256, 192),
        (192, 192),
        (192, 256),
        (192, 320),
        (128, 384),
        (128, 448),
        (64, 448),
    ]
    assert make_buckets(["192", "320"], 64) == make_buckets((192, 320), 64)


def test_make_buckets_side_limits() -> None:
    # max_side 448 < the square 512: no square; every height is capped at 448
    assert make_buckets(512, 64, max_side=448) == [
        (448, 256),
        (448, 320),
        (448, 384),
        (448, 448),
        (384, 448),
        (320, 448),
        (256, 448),
    ]
    # min_side 320: widths 832..1024 would need h = 256 < 320 and are left out
    assert make_buckets(512, 64, min_side=320) == [
        (768, 320),
        (704, 320),
        (640, 384),
        (576, 448),
        (512, 512),
        (448, 576),
        (384, 640),
        (320, 704),
        (320, 768),
    ]
    assert make_buckets(512, 64, min_side=384, max_side=640) == [
        (640, 384),
        (576, 448),
        (512, 512),
        (448, 576),
        (384, 640),
    ]
    assert make_buckets(512, 64, min_side=512, max_side=512) == [(512, 512)]
    # min_side equal to a square that no width gives ((192, 320): w=192 -> h=320): kept
    assert make_buckets((192, 320), 64, min_side=192) == [
        (320, 192),
        (256, 192),
        (192, 192),
        (192, 256),
        (192, 320),
    ]
    # step 1, widths 4..8 only (w=9 would give h=7 >= 4 but is beyond max_side)
    assert make_buckets(8, 1, min_side=4, max_side=8) == [
        (8, 4),
        (8, 5),
        (8, 6),
        (8, 7),
        (8, 8),
        (7, 8),
        (6, 8),
        (5, 8),
        (4, 8),
    ]
    # min_side 1 is a valid side with step 1: area 4, sides 1..4
    assert make_buckets(2, 1, min_side=1) == [(4, 1), (3, 1), (2, 2), (1, 3), (1, 4)]
    # given as strings (a config): taken as ints
    assert make_buckets(512, 64, min_side="384", max_side="640") == make_buckets(512, 64, 384, 640)


def test_make_buckets_smallest_resolution_and_step_one() -> None:
    # base == step: min_side max(64, 0) = 64, max_side 128; w=128 -> h=0 is dropped
    assert make_buckets(64, 64) == [(64, 64)]
    # step 1, 8 px: area 64, sides 4..16
    tall = [(16, 4), (15, 4), (14, 4), (13, 4), (12, 5), (11, 5), (10, 6), (9, 7)]
    assert make_buckets(8, 1) == tall + [(8, 8)] + [(w, h) for h, w in reversed(tall)]
    # default min_side of a base that halves to a non-multiple: 400 -> 200 -> 192; max 800
    assert make_buckets(400, 64)[0] == (768, 192) and make_buckets(400, 64)[-1] == (192, 768)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"resolution": 512, "step": 0}, "positive number of pixels"),
        ({"resolution": 63, "step": 64}, "smaller than the step"),
        ({"resolution": 512, "min_side": 100}, "min_side=100"),
        ({"resolution": 512, "max_side": 1000}, "max_side=1000"),
        ({"resolution": 512, "min_side": 0}, "min_side=0"),
        ({"resolution": 512, "min_side": 640, "max_side": 576}, "min_side=640"),
        ({"resolution": 512, "min_side": 576, "max_side": 1024}, "no bucket of area <= 262144"),
    ],
)
def test_make_buckets_rejects_bad_settings(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_buckets(**kwargs)


def test_nearest_bucket_is_nearest_in_log_ratio_and_prefers_the_larger_on_ties() -> None:
    # a square image: ratio 2 is log2 = 0.69 away, ratio 1/4 is log4 = 1.39 away (but nearer
    # on a linear scale: |0.25 - 1| < |2 - 1|)
    assert nearest_bucket((100, 100), [(128, 32), (64, 128)]) == (64, 128)
    # ratios 2 and 1/2 are equally far from 1: the larger area wins, in either order
    assert nearest_bucket((100, 100), [(64, 128), (192, 96)]) == (192, 96)
    assert nearest_bucket((100, 100), [(192, 96), (64, 128)]) == (192, 96)
    assert nearest_bucket((100, 100), [(96, 192), (128, 64)]) == (96, 192)
    # w / h, not h / w
    assert nearest_bucket((300, 600), SD512) == (320, 704)  # 2 -> 2.2 (log .095) vs 2.4 (.182)
    assert nearest_bucket((600, 300), SD512) == (704, 320)


def test_assign_bucket_upscale_and_own_size() -> None:
    # exactly the bucket's size: the bucket
    assert assign_bucket((384, 640), SD512, 64) == (384, 640)
    # one pixel short in height (nearest bucket 384 x 640): its own size rounded down
    assert assign_bucket((383, 700), SD512, 64) == (320, 640)
    assert assign_bucket((700, 383), SD512, 64) == (640, 320)
    assert {type(v) for v in assign_bucket((700, 383), SD512, 64)} == {int}
    assert assign_bucket((383, 700), SD512, 64, upscale=True) == (384, 640)
    # tiny: never below one step
    assert assign_bucket((50, 30), SD512, 64) == (64, 64)
    assert assign_bucket((50, 30), SD512, 64, True) == (640, 384)
    # one side exactly the bucket's, the other a step or more over it: the bucket, not the
    # image's own size rounded down (384 x 704, 704 x 384)
    assert assign_bucket((384, 704), SD512, 64) == (384, 640)
    assert assign_bucket((704, 384), SD512, 64) == (640, 384)
    # height between the bucket's height and width (bucket 384 x 640): the bucket
    assert assign_bucket((500, 900), SD512, 64) == (384, 640)
    # larger than its bucket on both sides: the bucket
    assert assign_bucket((2000, 3000), SD512, 64) == (384, 640)


def test_bucket_spec_from_config() -> None:
    assert BucketSpec.from_config(None) is None
    assert BucketSpec.from_config(False) is None
    assert BucketSpec.from_config(True) == BucketSpec(512, 64, None, None, False)
    spec = BucketSpec.from_config(OmegaConf.create({"resolution": 256, "upscale": True}))
    assert spec == BucketSpec(resolution=256, step=64, upscale=True)
    assert BucketSpec.from_config([("step", 8)]) == BucketSpec(step=8)
    with pytest.raises(ValueError, match="expected true/false or a mapping"):
        BucketSpec.from_config(5)
    with pytest.raises(ValueError, match=r"unknown keys \['size'\]"):
        BucketSpec.from_config({"size": 5, "step": 8})


def test_bucket_spec_sizes_and_assign() -> None:
    spec = BucketSpec(resolution=512, step=64, min_side=384, max_side=640)
    assert spec.sizes() == [(640, 384), (576, 448), (512, 512), (448, 576), (384, 640)]
    # 1000 x 1500 -> 384 x 640; 300 x 450 is smaller than it: own size 256 x 448
    assert spec.assign([(1000, 1500), (300, 450)]) == [(384, 640), (256, 448)]
    up = BucketSpec(resolution=512, step=64, min_side=384, max_side=640, upscale=True)
    assert up.assign([(300, 450)]) == [(384, 640)]
    # the step of the spec is the rounding step: 300 x 450 with step 32 -> 288 x 448
    assert BucketSpec(resolution=512, step=32).assign([(300, 450)]) == [(288, 448)]
    assert BucketSpec(resolution=256).sizes() == make_buckets(256, 64)
    assert BucketSpec(resolution=512, max_side=448).sizes() == [
        (448, 256),
        (448, 320),
        (448, 384),
        (448, 448),
        (384, 448),
        (320, 448),
        (256, 448),
    ]


def test_describe_buckets() -> None:
    text = describe_buckets([(384, 640), (512, 512), (384, 640), (640, 384)])
    assert text == "3 buckets (h x w: images): 640x384: 1, 512x512: 1, 384x640: 2"


# --- batches


def test_split_until_divisible_exact() -> None:
    given = [[0, 1, 2, 3], [4], [5, 6, 7]]
    assert _split_until_divisible(given, 2) == [[0, 1], [2, 3], [4], [5, 6, 7]]
    assert given == [[0, 1, 2, 3], [4], [5, 6, 7]]  # the input is left alone
    # the first of equally large batches is halved; an odd batch keeps the larger half first
    assert _split_until_divisible([[0, 1, 2, 3, 4]], 4) == [[0], [1], [2], [3, 4]]
    assert _split_until_divisible([[0, 1], [2]], 3) == [[0], [1], [2]]
    assert _split_until_divisible([[0, 1], [2, 3]], 2) == [[0, 1], [2, 3]]
    assert _split_until_divisible([[0, 1], [2, 3]], 1) == [[0, 1], [2, 3]]


def test_split_until_divisible_repeats_single_items(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="ldm.data.bucket_sampler"):
        assert _split_until_divisible([[0], [1], [2]], 2) == [[0], [1], [2], [0]]
        out = _split_until_divisible([[0], [1], [2], [3], [4]], 4)
    assert out == [[0], [1], [2], [3], [4], [0], [1], [2]]
    assert "repeating 3 of them" in caplog.text


# items 0..5 in buckets: 'a' -> [1, 3, 4], 'b' -> [0, 2], 'c' -> [5]
ITEMS = ["b", "a", "b", "a", "a", "c"]


def test_unshuffled_batches_exact_per_rank() -> None:
    s = BucketBatchSampler(ITEMS, 2, shuffle=False)
    assert s.epoch_batches() == [[1, 3], [4], [0, 2], [5]] and list(s) == s.epoch_batches()
    assert len(s) == 4
    dropped = BucketBatchSampler(ITEMS, 2, shuffle=False, drop_last=True)
    assert list(dropped) == [[1, 3], [0, 2]] and len(dropped) == 2
    two = [BucketBatchSampler(ITEMS, 2, shuffle=False, rank=r, world_size=2) for r in (0, 1)]
    assert [list(s) for s in two] == [[[1, 3], [0, 2]], [[4], [5]]]
    assert [len(s) for s in two] == [2, 2]
    # 3 ranks: [1, 3] then [0, 2] are halved: 6 batches
    three = [BucketBatchSampler(ITEMS, 2, shuffle=False, rank=r, world_size=3) for r in (0, 1, 2)]
    assert [list(s) for s in three] == [[[1], [0]], [[3], [2]], [[4], [5]]]
    assert [len(s) for s in three] == [2, 2, 2]
    # whole buckets in one batch
    assert list(BucketBatchSampler(ITEMS, 3, shuffle=False)) == [[1, 3, 4], [0, 2], [5]]


def test_bucket_order_is_by_repr_not_by_input_order() -> None:
    # repr '(128, 64)' < '(64, 128)' although (64, 128) < (128, 64) and comes first here
    items = [(64, 128), (128, 64), (64, 128)]
    assert list(BucketBatchSampler(items, 4, shuffle=False)) == [[1], [0, 2]]


def _reference(buckets: list, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The documented order (world 1, no halving needed): one generator seeded seed + epoch;
    each bucket's items (buckets by repr) permuted, cut into batches; then the batches permuted."""
    gen = torch.Generator().manual_seed(seed + epoch)
    batches = []
    for key in sorted(set(buckets), key=repr):
        idx = [i for i, b in enumerate(buckets) if b == key]
        idx = [idx[k] for k in torch.randperm(len(idx), generator=gen).tolist()]
        batches += [idx[s : s + batch_size] for s in range(0, len(idx), batch_size)]
    return [batches[k] for k in torch.randperm(len(batches), generator=gen).tolist()]


def test_shuffled_order_is_a_function_of_seed_plus_epoch() -> None:
    items = [i % 3 for i in range(20)]
    s = BucketBatchSampler(items, 3, seed=5, epoch=2)
    assert list(s) == _reference(items, 3, 5, 2)
    assert list(s) != list(BucketBatchSampler(items, 3, seed=5, epoch=0))
    assert list(s) == list(BucketBatchSampler(items, 3, seed=6, epoch=1))
    assert list(s) == list(BucketBatchSampler(items, 3, seed=7))
    assert list(BucketBatchSampler(items, 3)) == _reference(items, 3, 0, 0)  # default seed 0
    s.set_epoch(3)
    assert list(s) == _reference(items, 3, 5, 3)
    for b in list(s):
        assert len({items[i] for i in b}) == 1


def test_ranks_take_every_world_th_batch_of_the_shared_order() -> None:
    items = [i % 3 for i in range(20)]  # 7 + 7 + 6 items: batches of 3: 3 + 3 + 2 = 8
    whole = BucketBatchSampler(items, 3, seed=1, rank=0, world_size=4).epoch_batches()
    assert len(whole) == 8
    per_rank = [list(BucketBatchSampler(items, 3, seed=1, rank=r, world_size=4)) for r in range(4)]
    assert per_rank == [whole[r::4] for r in range(4)]
    assert sorted(i for r in per_rank for b in r for i in b) == list(range(20))


def test_skip_once_epoch_hooks_and_relay() -> None:
    calls: list[int] = []
    s = BucketBatchSampler(ITEMS, 2, shuffle=False, epoch=2, skip=1, on_epoch=calls.append)
    assert calls == [2] and s.epoch == 2
    assert list(s) == [[4], [0, 2], [5]]
    assert list(s) == [[1, 3], [4], [0, 2], [5]]
    s.set_epoch(3)
    assert calls == [2, 3] and s.epoch == 3
    relay = s.sampler
    assert isinstance(relay, EpochRelay) and relay.batches is s
    relay.set_epoch(4)
    assert calls == [2, 3, 4] and s.epoch == 4
    assert list(relay) == [1, 3, 4, 0, 2, 5] and len(relay) == 6
    r1 = BucketBatchSampler(ITEMS, 2, shuffle=False, rank=1, world_size=2).sampler
    assert list(r1) == [4, 5] and len(r1) == 2
    # no hook: set_epoch still works
    plain = BucketBatchSampler(ITEMS, 2, shuffle=False)
    plain.set_epoch(7)
    assert plain.epoch == 7


def test_numbers_from_a_config_are_taken_as_ints() -> None:
    s = BucketBatchSampler(ITEMS, 2.0, shuffle=True, seed=3.0, epoch=1.0, skip=1.0)
    assert (s.batch_size, s.seed, s.epoch) == (2, 3, 1)
    assert list(s) == _reference(ITEMS, 2, 3, 1)[1:]
    s.set_epoch(2.0)
    assert s.epoch == 2 and isinstance(s.epoch, int)
    assert list(s) == _reference(ITEMS, 2, 3, 2)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"batch_size": 0}, "batch_size must be >= 1, got 0"),
        ({"batch_size": 1, "rank": 2, "world_size": 2}, r"rank 2 is not in \[0, world_size=2\)"),
        ({"batch_size": 1, "rank": -1}, "rank -1 is not in"),
    ],
)
def test_sampler_rejects_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BucketBatchSampler(ITEMS, **kwargs)
    BucketBatchSampler(ITEMS, 1, rank=1, world_size=2)  # the last rank and batch size 1 are fine
