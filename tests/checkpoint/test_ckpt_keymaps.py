"""Our key maps vs diffusers' single-file converters on the full SD v1/v2 key sets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from tiny_models import DATA, sd_key_state_dict

from ldm.checkpoint.keymap_text import hf_to_openclip, openclip_to_hf
from ldm.checkpoint.keymap_unet import unet_to_diffusers, unet_to_ldm
from ldm.checkpoint.keymap_vae import vae_to_diffusers, vae_to_ldm

CONFIGS = Path(__file__).parents[2] / "configs" / "stable-diffusion"


def _strip(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


@pytest.mark.parametrize("version,config", [("v1", "v1-inference"), ("v2", "v2-inference-v")])
def test_unet_and_vae_maps_match_diffusers(version: str, config: str, single_file_utils) -> None:
    su = single_file_utils
    sd = sd_key_state_dict(version)
    cfg = yaml.safe_load((CONFIGS / f"{config}.yaml").read_text())
    ref_unet = su.convert_ldm_unet_checkpoint(sd, su.create_unet_diffusers_config_from_ldm(cfg, sd))
    ours_unet = unet_to_diffusers(_strip(sd, "model.diffusion_model."))
    assert set(ours_unet) == set(ref_unet) and len(ours_unet) == 686
    assert all(ours_unet[k].shape == ref_unet[k].shape for k in ref_unet)
    ref_vae = su.convert_ldm_vae_checkpoint(sd, su.create_vae_diffusers_config_from_ldm(cfg, sd))
    ours_vae = vae_to_diffusers(_strip(sd, "first_stage_model."))
    assert set(ours_vae) == set(ref_vae)
    assert all(ours_vae[k].shape == ref_vae[k].shape for k in ref_vae)
    # and back: every CompVis key with its shape
    back = unet_to_ldm(ours_unet)
    assert {k: v.shape for k, v in back.items()} == {
        k: v.shape for k, v in _strip(sd, "model.diffusion_model.").items()
    }
    back = vae_to_ldm(ours_vae)
    assert {k: v.shape for k, v in back.items()} == {
        k: v.shape for k, v in _strip(sd, "first_stage_model.").items()
    }


def test_openclip_map_matches_diffusers_and_round_trips(single_file_utils) -> None:
    su = single_file_utils
    transformers = pytest.importorskip("transformers")
    g = torch.Generator().manual_seed(0)
    # a 2-layer OpenCLIP text tower in the SD v2 layout, real key names, small width
    d, n = 64, 2
    sd = {
        "cond_stage_model.model.positional_embedding": torch.randn(77, d, generator=g),
        "cond_stage_model.model.text_projection": torch.randn(d, d, generator=g),
        "cond_stage_model.model.logit_scale": torch.tensor(4.6),
        "cond_stage_model.model.token_embedding.weight": torch.randn(100, d, generator=g),
        "cond_stage_model.model.ln_final.weight": torch.randn(d, generator=g),
        "cond_stage_model.model.ln_final.bias": torch.randn(d, generator=g),
    }
    ref_layer = [
        line.split("\t") for line in (DATA / "sd-v2-text-encoder.tsv").read_text().splitlines()
    ]
    names = [k.split("resblocks.0.")[1] for k, _ in ref_layer if "resblocks.0." in k]
    shapes = {
        "in_proj_weight": (3 * d, d),
        "in_proj_bias": (3 * d,),
        "c_fc.weight": (4 * d, d),
        "c_fc.bias": (4 * d,),
        "c_proj.weight": (d, 4 * d),
    }
    for i in range(n):
        for name in names:
            shape = next((s for suf, s in shapes.items() if name.endswith(suf)), None)
            shape = shape or ((d, d) if name.endswith("weight") and "out_proj" in name else (d,))
            sd[f"cond_stage_model.model.transformer.resblocks.{i}.{name}"] = torch.randn(
                shape, generator=g
            )
    cfg = transformers.CLIPTextConfig(
        hidden_size=d,
        intermediate_size=4 * d,
        num_hidden_layers=n,
        num_attention_heads=4,
        vocab_size=100,
    )
    ref = su.convert_open_clip_checkpoint(transformers.CLIPTextModel(cfg), sd)
    ours, extras = openclip_to_hf(sd)
    assert set(ours) == set(ref)
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k], rtol=0, atol=0)
    assert set(extras) == {
        "cond_stage_model.model.text_projection",
        "cond_stage_model.model.logit_scale",
    }
    back = hf_to_openclip(ours)
    back.update(extras)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


def test_old_diffusers_vae_attention_names_are_read() -> None:
    ours = vae_to_diffusers(_strip(sd_key_state_dict("v1"), "first_stage_model."))
    renames = {"to_q.": "query.", "to_k.": "key.", "to_v.": "value.", "to_out.0.": "proj_attn."}
    old = {}
    for k, v in ours.items():
        for new, legacy in renames.items():
            k = k.replace(f"attentions.0.{new}", f"attentions.0.{legacy}")
        old[k] = v
    assert any(".query." in k for k in old)
    assert vae_to_ldm(old).keys() == vae_to_ldm(ours).keys()
