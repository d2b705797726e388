"""The first stage built from the official SD configs has exactly the reference keys and shapes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ldm.util import instantiate_from_config

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "first_stage_model."


def _reference(tsv: str) -> dict[str, str]:
    ref = {}
    for line in (ROOT / "data" / tsv).read_text().splitlines():
        key, _, shape = line.partition("\t")
        if key.startswith(PREFIX):
            ref[key] = shape
    return ref


@pytest.mark.parametrize(
    "config,tsv",
    [("v1-inference.yaml", "sd-v1-unet-vae.tsv"), ("v2-inference-v.yaml", "sd-v2-unet-vae.tsv")],
)
def test_first_stage_keys_and_shapes_match_sd(config: str, tsv: str) -> None:
    cfg = OmegaConf.load(ROOT / "configs" / "official" / config)
    with torch.device("meta"):
        model = instantiate_from_config(cfg.model.params.first_stage_config)
    ours = {PREFIX + k: "x".join(map(str, v.shape)) for k, v in model.state_dict().items()}
    ref = _reference(tsv)
    assert len(ref) == 248
    assert sorted(set(ref) - set(ours)) == []
    assert sorted(set(ours) - set(ref)) == []
    assert {k: ours[k] for k in ref if ours[k] != ref[k]} == {}


def test_vanilla_xformers_attn_type_has_same_keys() -> None:
    """SD 2.x configs may set attn_type: vanilla-xformers; the keys must not change."""
    cfg = OmegaConf.load(ROOT / "configs" / "official" / "v2-inference.yaml")
    ae = cfg.model.params.first_stage_config
    ae.params.ddconfig.attn_type = "vanilla-xformers"
    with torch.device("meta"):
        model = instantiate_from_config(ae)
    ours = {PREFIX + k for k in model.state_dict()}
    assert ours == set(_reference("sd-v2-unet-vae.tsv"))
