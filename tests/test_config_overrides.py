"""Command-line overrides: values checked against the constructor's annotation, and a new
``target`` on the command line replacing the component's params (as a later file does)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Literal

import pytest
from omegaconf import OmegaConf

from ldm.config import merge_configs
from ldm.util import ConfigError

ROOT = Path(__file__).resolve().parent.parent
FOLDER = [ROOT / "configs" / "txt2img.yaml", ROOT / "configs" / "data" / "image-folder.yaml"]
TRAIN = "data.params.train"
ROOT_SET = f"{TRAIN}.params.root=/tmp/images"


class Toyset:
    """A stand-in data set with annotated parameters (target ``test_config_overrides.Toyset``)."""

    def __init__(
        self,
        mode: Literal["a", "b"] = "a",
        sizes: tuple[int, int] = (1, 2),
        path: str | os.PathLike = "x",
        opts: dict[str, int] | None = None,
        plain=3,  # no annotation: compared with the current value
    ) -> None:
        pass


def _annotated(tmp_path: Path) -> Path:
    cfg = tmp_path / "a.yaml"
    cfg.write_text(
        "data:\n  params:\n    train:\n      target: test_config_overrides.Toyset\n"
        "      params: {mode: a, sizes: [1, 2], path: x, opts: null, plain: 3}\n"
    )
    return cfg


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (f"{TRAIN}.params.buckets={{resolution: 32, step: 8}}", {"resolution": 32, "step": 8}),
        ("model.params.cache_latents={dir: /tmp/x}", {"dir": "/tmp/x"}),  # was true
        (f"{TRAIN}.params.flip=0.5", 0.5),  # flip: bool | float, was true
        (f"{TRAIN}.params.buckets=false", False),  # buckets: Any, was 'auto'
        (f"{TRAIN}.params.max_items=null", None),
    ],
)
def test_documented_alternative_forms_are_accepted(override: str, expected: Any) -> None:
    cfg, _ = merge_configs(FOLDER, [ROOT_SET, override])
    value = OmegaConf.select(cfg, override.partition("=")[0])
    assert (OmegaConf.to_container(value) if OmegaConf.is_config(value) else value) == expected


def test_value_outside_the_annotation_names_the_parameter() -> None:
    with pytest.raises(ConfigError) as err:
        merge_configs(FOLDER, [ROOT_SET, f"{TRAIN}.params.flip=[1]"])
    msg = str(err.value)
    assert f"'{TRAIN}.params.flip' expects a boolean or a number" in msg
    assert "ImageFolderDataset's parameter flip: bool | float" in msg
    assert "found a list [1]" in msg and f"Fix: {TRAIN}.params.flip=true or" in msg
    with pytest.raises(ConfigError, match=r"size' expects a whole number or null.*found a string"):
        merge_configs(FOLDER, [ROOT_SET, f"{TRAIN}.params.size=big"])
    # a parameter the config does not set yet is checked too
    with pytest.raises(ConfigError, match=r"'model.params.use_ema' expects a boolean"):
        merge_configs(FOLDER, [ROOT_SET, "model.params.use_ema=3"])


def test_literal_tuple_path_and_mapping_annotations(tmp_path: Path) -> None:
    cfg = _annotated(tmp_path)
    ok = [
        "params.mode=b",
        "params.sizes=[3, 4]",
        "params.path=/data",
        "params.opts={a: 1}",
        "params.plain=4",
    ]
    merged, _ = merge_configs([cfg], [f"{TRAIN}.{o}" for o in ok])
    assert merged.data.params.train.params.mode == "b"
    assert list(merged.data.params.train.params.sizes) == [3, 4]
    bad = {
        "params.mode=c": r"expects one of 'a', 'b'.*Fix: .*mode=a or .*mode=b",
        "params.sizes=[1, 2, 3]": r"expects a list \(Toyset's parameter sizes",
        "params.path=3": "expects a string",
        "params.opts={a: x}": "expects a mapping or null",
        # no annotation: today's comparison with the current value, and its message
        "params.plain=x": r"expects a number like the current value 3 \(set in .*a.yaml\)",
    }
    for override, match in bad.items():
        with pytest.raises(ConfigError, match=match):
            merge_configs([cfg], [f"{TRAIN}.{override}"])


def test_fits_annotation_rules() -> None:
    from ldm.config_ranges import describe_annotation, fits_annotation

    assert fits_annotation(Any, {"a": 1}) is True
    assert fits_annotation(bool | float, 0.5) is True
    assert fits_annotation(bool, 1) is False
    assert fits_annotation(int, True) is False
    assert fits_annotation(float, 2) is True
    assert fits_annotation(int | None, None) is True
    assert fits_annotation(OmegaConf, 1) is None  # a class: cannot tell from YAML
    assert describe_annotation(int | list[int] | None) == "a whole number or a list or null"


def test_command_line_target_replaces_the_params(caplog: pytest.LogCaptureFixture) -> None:
    base = [ROOT / "configs" / "txt2img.yaml"]
    with caplog.at_level(logging.INFO, logger="ldm.config"):
        cfg, sources = merge_configs(base, [f"{TRAIN}.target=test_config_overrides.Toyset"])
    assert dict(cfg.data.params.train) == {"target": "test_config_overrides.Toyset"}
    assert (
        f"{TRAIN}: target changes from ldm.data.shapes.CaptionedShapes to "
        "test_config_overrides.Toyset; its params are replaced, not merged"
    ) in caplog.text
    assert cfg.data.params.batch_size == 64 and cfg.model.base_learning_rate == 2e-5
    assert sources.of(f"{TRAIN}.params.split") == "command line"
    # params set on the same command line are kept, before or after the target
    for order in (1, -1):
        ovs = [f"{TRAIN}.params.mode=b", f"{TRAIN}.target=test_config_overrides.Toyset"]
        cfg, _ = merge_configs(base, ovs[::order])
        assert dict(cfg.data.params.train.params) == {"mode": "b"}
    # the same target keeps merging
    cfg, _ = merge_configs(
        base, [f"{TRAIN}.target=ldm.data.shapes.CaptionedShapes", f"{TRAIN}.params.length=3"]
    )
    assert dict(cfg.data.params.train.params) == {"split": "train", "length": 3}


def test_whole_component_override_replaces_the_block() -> None:
    cfg, _ = merge_configs(
        [ROOT / "configs" / "txt2img.yaml"],
        [f"{TRAIN}={{target: test_config_overrides.Toyset, params: {{mode: b}}}}"],
    )
    assert OmegaConf.to_container(cfg.data.params.train) == {
        "target": "test_config_overrides.Toyset",
        "params": {"mode": "b"},
    }
