"""Captioned shapes: deterministic, held-out pairs excluded from training, CompVis items."""

import numpy as np
import pytest

from ldm.data import shapes as S
from ldm.data.shapes import CaptionedShapes, caption, parse_caption


def test_deterministic_from_seed_and_index():
    a, b = CaptionedShapes(length=50, seed=7), CaptionedShapes(length=1000, seed=7)
    for i in [49, 3, 0, 17]:  # order and data set length do not matter
        np.testing.assert_array_equal(a[i]["image"], b[i]["image"])
        assert a[i]["caption"] == b[i]["caption"]
    other = CaptionedShapes(length=50, seed=8)
    assert [a.caption(i) for i in range(50)] != [other.caption(i) for i in range(50)]
    val = CaptionedShapes(split="validation", length=50, seed=7)
    assert [a.caption(i) for i in range(50)] != [val.caption(i) for i in range(50)]


def test_heldout_pairs_only_in_heldout_split():
    train = CaptionedShapes(length=3000, seed=0)
    attrs = [train.attributes(i) for i in range(len(train))]
    pairs = {(a["colour"], a["shape"]) for a in attrs}
    assert pairs == set(S.training_pairs()) and not pairs & set(S.HELDOUT_PAIRS)
    assert {a["size"] for a in attrs} == set(S.SIZES)
    assert {a["position"] for a in attrs} == set(S.POSITIONS)
    assert {c for c, _ in S.HELDOUT_PAIRS} < set(S.COLOURS)  # held-out words are seen apart
    held = CaptionedShapes(split="heldout", length=300, seed=0)
    assert {(held.attributes(i)["colour"], held.attributes(i)["shape"]) for i in range(300)} == set(
        S.HELDOUT_PAIRS
    )
    prompts = S.evaluation_prompts(6)
    assert prompts == S.evaluation_prompts(6) and len(prompts["seen"]) == 6
    assert {
        tuple(parse_caption(p)[k] for k in ("colour", "shape")) for p in prompts["heldout"]
    } == set(S.HELDOUT_PAIRS)
    assert all(
        (parse_caption(p)["colour"], parse_caption(p)["shape"]) in S.HELDOUT_PAIRS
        for p in prompts["heldout"]
    )
    assert not any(
        (parse_caption(p)["colour"], parse_caption(p)["shape"]) in S.HELDOUT_PAIRS
        for p in prompts["seen"]
    )


def test_required_vocabulary():
    assert set(S.COLOURS) >= {
        "red",
        "green",
        "blue",
        "yellow",
        "cyan",
        "magenta",
        "white",
        "orange",
    }
    assert set(S.SHAPES) >= {"circle", "square", "triangle"}
    assert S.SIZES == ("small", "large") and len(S.POSITIONS) == 9


def test_item_format_and_keys():
    ds = CaptionedShapes(
        length=10, size=48, image_key="jpg", caption_key="txt", return_attributes=True
    )
    item = ds[3]
    img = item["jpg"]
    assert img.shape == (48, 48, 3) and img.dtype == np.float32
    assert img.min() == -1.0 and img.max() <= 1.0  # black background
    assert item["txt"] == caption(item) == ds.caption(3)
    assert item["txt"].startswith(f"a {item['size']} {item['colour']} {item['shape']} in the ")


def test_caption_round_trip_and_errors():
    attrs = {"size": "large", "colour": "red", "shape": "circle", "position": "top left"}
    assert caption(attrs) == "a large red circle in the top left"
    assert parse_caption("A small cyan square in the center.") == {
        "size": "small",
        "colour": "cyan",
        "shape": "square",
        "position": "center",
    }
    with pytest.raises(ValueError, match="unknown colour"):
        parse_caption("a small mauve square in the center")
    with pytest.raises(ValueError, match="not a shapes caption"):
        parse_caption("a photo of a cat")
    with pytest.raises(ValueError, match="split"):
        CaptionedShapes(split="training")


@pytest.mark.parametrize("i", range(6))
def test_rendered_shape_matches_attributes(i):
    ds = CaptionedShapes(length=6, seed=2, size=32)
    a, img = ds.attributes(i), ds.image(i)
    lit = img.max(axis=-1) > 128
    ys, xs = np.nonzero(lit)
    # colour: the fully covered pixels have exactly the palette colour
    full = img[img.max(axis=-1) == 255]
    assert (full == np.asarray(S.COLOURS[a["colour"]], np.uint8)).all(axis=-1).mean() > 0.9
    # position: the bounding-box centre lies in the named grid cell
    row, col = divmod(S.POSITIONS.index(a["position"]), 3)
    assert int((ys.min() + ys.max() + 1) / 2 / 32 * 3) == row
    assert int((xs.min() + xs.max() + 1) / 2 / 32 * 3) == col
    # size: covered area relative to the shape's nominal area
    area = img.max(axis=-1).sum() / 255.0
    assert area == pytest.approx(S.AREA_PER_R2[a["shape"]] * a["r"] ** 2, rel=0.08)
    assert (a["size"] == "large") == (a["r"] / 32 > S.SIZE_THRESHOLD)


def test_anti_aliased_edges():
    img = S.render({"shape": "circle", "colour": "white", "size": "large", "position": "center"})
    values = np.unique(img[..., 0])
    assert len(values) > 5  # partial coverage on the rim, not a hard binary mask


def test_purple_is_drawable_but_never_in_training() -> None:
    """purple (hue 270) is drawn only when asked; the training split's item i is unchanged."""
    from ldm.data.shapes import PALETTE, training_pairs

    assert "purple" in PALETTE and all(c != "purple" for c, _ in training_pairs())
    purple = CaptionedShapes("train", length=16, colours=["purple"])
    plain = CaptionedShapes("train", length=16)
    assert {purple.attributes(i)["colour"] for i in range(16)} == {"purple"}
    image = purple.image(0).reshape(-1, 3)
    lit = image[image.max(axis=1) > 220]
    assert len(lit) and (lit == [96, 0, 224]).all()  # fully covered pixels: (96, 0, 224)
    # the same index draws the same geometry (same rng stream), only the colour list differs
    assert purple.attributes(3)["position"] == plain.attributes(3)["position"]
    with pytest.raises(ValueError, match="expected names from"):
        CaptionedShapes("train", colours=["mauve"])


def test_judge_reads_purple_and_colour_prompts() -> None:
    import numpy as np

    from ldm.data.judge import score
    from ldm.data.shapes import colour_prompts, parse_caption

    ds = CaptionedShapes("train", length=24, colours=["purple"])
    images = np.stack([ds.image(i) for i in range(24)])
    assert score(images, [ds.caption(i) for i in range(24)])["caption"] == 1.0
    prompts = colour_prompts(["purple"], 6)
    assert {parse_caption(p)["shape"] for p in prompts} == {"circle", "square", "triangle"}
    assert prompts == colour_prompts(["purple"], 6)  # fixed


def test_the_shipped_autoencoder_reconstructs_purple_as_purple() -> None:
    """A latent model can only draw what its first stage decodes: purple's reconstructions by
    checkpoints/shapes-kl-f4 must still be judged purple (the ceiling of every method)."""
    import torch
    from omegaconf import OmegaConf

    from ldm.data.judge import score
    from ldm.util import instantiate_from_config

    cfg = OmegaConf.load("configs/txt2img.yaml").model.params.first_stage_config
    ae = instantiate_from_config(cfg).eval()
    ds = CaptionedShapes("train", colours=["purple"], length=32, seed=5)
    x = torch.stack([torch.from_numpy(ds[i]["image"]).permute(2, 0, 1) for i in range(32)])
    with torch.no_grad():
        rec = ae.decode(ae.encode(x).mode()).clamp(-1, 1)
    assert score(rec, [ds.caption(i) for i in range(32)])["colour"] >= 0.95
