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


@pytest.mark.parametrize("split,n", [("train", 800), ("heldout", 400)])
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
