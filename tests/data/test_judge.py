"""Judge: reads generated shapes back at >= 99%, any input format, graceful on bad images."""

import logging

import numpy as np
import pytest
import torch
from scipy import ndimage

from ldm.data import shapes as S
from ldm.data.judge import ATTRIBUTES, judge, score
from ldm.data.shapes import CaptionedShapes

logger = logging.getLogger(__name__)


def _data(split, n, seed=0, size=32):
    ds = CaptionedShapes(split=split, length=n, seed=seed, size=size)
    return np.stack([ds[i]["image"] for i in range(n)]), [ds.caption(i) for i in range(n)]


@pytest.mark.parametrize("split,n", [("train", 400), ("heldout", 200)])
def test_judge_reads_dataset_images(split, n):
    images, captions = _data(split, n, seed=11)
    result = score(images, captions)
    logger.info("judge on %d %s images: %s", n, split, result)
    for key in (*ATTRIBUTES, "caption"):
        assert result[key] >= 0.99, (key, result)


@pytest.mark.slow
def test_judge_reads_5000_images_any_size():
    for size, n in [(32, 5000), (64, 500)]:
        images, captions = _data("train", n, seed=123, size=size)
        result = score(images, captions)
        logger.info("judge on %d images of %dpx: %s", n, size, result)
        assert min(result[k] for k in (*ATTRIBUTES, "caption")) >= 0.99, result


def test_input_formats_agree():
    images, captions = _data("validation", 12)
    ref = judge(images)
    uint8 = np.round((images + 1) * 127.5).astype(np.uint8)
    tensor = torch.from_numpy(images).permute(0, 3, 1, 2)  # B x C x H x W in [-1, 1]
    assert judge(uint8) == ref
    assert judge(tensor) == ref
    assert judge(tensor.to(torch.float16)) == ref
    assert judge(list(images)) == ref and judge(images[0]) == ref[:1]
    assert score(tensor, [S.parse_caption(c) for c in captions]) == score(images, captions)


@pytest.mark.parametrize("gain,blur,noise", [(1.0, 0.7, 0.05), (0.5, 0.5, 0.03)])
def test_degrades_gracefully_on_blurry_noisy_dim_images(gain, blur, noise):
    images, captions = _data("train", 200, seed=4)
    x = ndimage.gaussian_filter((images + 1) / 2 * gain, sigma=(0, blur, blur, 0))
    x = x + np.random.default_rng(0).normal(0, noise, x.shape)
    result = score(np.clip(x * 2 - 1, -1, 1), captions)
    assert min(result[k] for k in ATTRIBUTES) >= 0.97, result


def test_empty_and_noise_images_give_none_without_crashing():
    black = -np.ones((2, 32, 32, 3), np.float32)
    assert judge(black) == [dict.fromkeys(ATTRIBUTES, "none")] * 2
    noise = np.random.default_rng(0).uniform(-1, -0.8, (1, 32, 32, 3))
    assert judge(noise)[0]["shape"] == "none"
    result = score(black, ["a large red circle in the top left"] * 2)
    assert result["caption"] == 0.0 and result["colour"] == 0.0
    two = np.concatenate([_data("train", 2)[0][:1], black[:1]])
    assert judge(two)[1]["colour"] == "none"
    with pytest.raises(ValueError, match="2 images but 1"):
        score(black, ["a large red circle in the top left"])


def test_judge_is_not_fooled_by_wrong_captions():
    images, captions = _data("train", 40, seed=5)
    wrong = []
    for c in captions:
        a = S.parse_caption(c)
        a["colour"] = "white" if a["colour"] != "white" else "red"
        wrong.append(a)
    result = score(images, wrong)
    assert result["colour"] == 0.0 and result["caption"] == 0.0 and result["shape"] == 1.0


# --- the form criterion: best IoU with the generator's own drawings (judge.best_iou) ---


def _items(split, n, seed):
    return [S.sample_attributes(seed, split, i) for i in range(n)]


def test_dataset_images_pass_the_iou_threshold():
    """The data set's own images are drawings the search can find: >= 99% reach the threshold
    (measured: min 0.95, threshold 0.87), on both splits."""
    from ldm.data.judge import IOU_THRESHOLD, best_iou

    for split in ("train", "heldout"):
        items = _items(split, 60, seed=21)
        ious = [best_iou(to_unit(S.render(a)), a) for a in items]
        assert np.mean(np.asarray(ious) >= IOU_THRESHOLD) >= 0.99, (split, sorted(ious)[:3])
        assert min(ious) > 0.9, sorted(ious)[:3]


def to_unit(image):
    return image.astype(np.float64) / 255.0


@pytest.mark.parametrize("kind", ["doubled", "doubled_same_area", "concave_square", "wrong_shape"])
def test_constructed_failures_fail(kind):
    """Two touching copies, a square with concave sides (depth 0.25) and another shape drawn at
    the caption's place all stay below the threshold, and their whole caption is wrong."""
    from ldm.data.judge import IOU_THRESHOLD, best_iou
    from ldm.data.judge_calibration import failure_images

    items = [
        a
        for a in _items("train", 60, seed=22)
        if kind != "concave_square" or a["shape"] == "square"
    ]
    images, targets = [], []
    for a in items[:20]:
        for im in failure_images(a)[kind]:
            images.append(im)
            targets.append(a)
    ious = [best_iou(to_unit(im), t) for im, t in zip(images, targets)]
    assert max(ious) < IOU_THRESHOLD, (kind, max(ious))
    result = score(np.stack(images), targets)
    assert result["caption"] == 0.0 and result["shape"] == 0.0, result
    assert result["colour"] == 1.0, result  # the other readouts still work on these images
    if kind in ("concave_square", "wrong_shape"):
        assert result["position"] == 1.0, result


def test_a_rendered_caption_does_not_match_another_caption():
    """An image drawn for one caption scores its own caption whole and fails every caption that
    differs in shape, size or position (the IoU is taken at the other caption's geometry)."""
    from ldm.data.judge import IOU_THRESHOLD, best_iou

    a = S.sample_attributes(3, "train", 5)
    image = to_unit(S.render(a))
    assert best_iou(image, a) >= IOU_THRESHOLD
    assert score(S.render(a), [a])["caption"] == 1.0
    others = []
    for key, values in (("shape", S.SHAPES), ("size", S.SIZES), ("position", S.POSITIONS)):
        others += [{**a, key: v} for v in values if v != a[key]]
    for other in others:
        assert best_iou(image, other) < IOU_THRESHOLD, other
    result = score(np.stack([S.render(a)] * len(others)), [S.caption(o) for o in others])
    assert result["caption"] == 0.0, result


def test_a_second_shape_elsewhere_fails_the_form():
    """Every blob counts: the caption's shape plus a copy in another cell fails (the old judge
    read only the largest blob and passed it)."""
    from ldm.data.judge import IOU_THRESHOLD, best_iou

    a = S.sample_attributes(4, "train", 0)
    pos = (S.POSITIONS.index(a["position"]) + 4) % 9
    b = {**a, "position": S.POSITIONS[pos], "cx": S.GRID[pos % 3] * 32, "cy": S.GRID[pos // 3] * 32}
    two = np.maximum(S.render(a), S.render(b))
    assert best_iou(to_unit(two), a) < IOU_THRESHOLD
    assert score(two, [a])["caption"] == 0.0
