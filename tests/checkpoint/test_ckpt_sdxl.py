"""SDXL: detection from keys/shapes, the full-size key maps, and a reduced random SDXL-like model's
checkpoint -> diffusers folder -> checkpoint round trip (bit-exact) and numerical parity."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from tiny_models import TINY_DDCONFIG, tsv_state_dict

from ldm.checkpoint import diffusers_config_sdxl as xcfg
from ldm.checkpoint.convert import diffusers_to_checkpoint, from_diffusers, to_diffusers
from ldm.checkpoint.convert_sdxl import split_sdxl
from ldm.checkpoint.detect import (
    DetectionError,
    detect_sd,
    diffusers_family,
    load_builtin_config,
)
from ldm.checkpoint.keymap_unet import unet_to_ldm
from ldm.checkpoint.loader import match_clip_layout
from ldm.checkpoint.safe_load import LoadedCheckpoint, read_checkpoint
from ldm.checkpoint.sdxl_layout import network_params

CLIP0 = "conditioner.embedders.0.transformer."
BIGG1 = "conditioner.embedders.1.model."


def _shapes(sd: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """Key -> shape; transformers 5's CLIPTextModel drops the hub files' `text_model.` level."""
    return {k.removeprefix("text_model."): tuple(v.shape) for k, v in sd.items()}


@pytest.fixture(scope="module")
def base_sd() -> dict[str, torch.Tensor]:
    return tsv_state_dict("sdxl-base.tsv")


def _refiner_sd(base: dict[str, torch.Tensor], diffusers) -> dict[str, torch.Tensor]:
    """Refiner 1.0 keys/shapes: U-Net from diffusers' model of our unet config, bigG as embedder 0."""
    cfg = load_builtin_config("sdxl-refiner")
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel.from_config(xcfg.unet_config(cfg, 256))
    sd = {"model.diffusion_model." + k: v for k, v in unet_to_ldm(unet.state_dict()).items()}
    sd.update({k: v for k, v in base.items() if k.startswith("first_stage_model.")})
    sd.update(
        {
            "conditioner.embedders.0.model." + k[len(BIGG1) :]: v
            for k, v in base.items()
            if k.startswith(BIGG1)
        }
    )
    return sd


def test_detect_sdxl_base(base_sd) -> None:
    det = detect_sd(base_sd)
    assert det.name == "sdxl-base" and det.parameterization == "eps"
    assert det.config == load_builtin_config("sdxl-base")
    nested = {
        (CLIP0 + "text_model." + k[len(CLIP0) :] if k.startswith(CLIP0) else k): v
        for k, v in base_sd.items()
    }
    nested[CLIP0 + "text_model.embeddings.position_ids"] = torch.empty(1, 77, device="meta")
    assert detect_sd(nested).name == "sdxl-base"


def test_detect_sdxl_refiner(base_sd, diffusers) -> None:
    det = detect_sd(_refiner_sd(base_sd, diffusers))
    assert det.name == "sdxl-refiner"
    assert network_params(det.config)["adm_in_channels"] == 2560


def test_detect_sdxl_like_but_different(base_sd) -> None:
    sd = dict(base_sd)
    sd["model.diffusion_model.label_emb.0.0.weight"] = torch.empty(1280, 2000, device="meta")
    with pytest.raises(DetectionError, match=r"(?s)adm\) 2000.*Pass config="):
        detect_sd(sd)
    no_clip = {k: v for k, v in base_sd.items() if not k.startswith(CLIP0)}
    with pytest.raises(DetectionError, match="1.model"):
        detect_sd(no_clip)


def test_full_size_key_maps_match_diffusers_models(base_sd, diffusers) -> None:
    cfg = load_builtin_config("sdxl-base")
    comps, extras, meta = split_sdxl(base_sd, cfg)
    assert set(extras) == {BIGG1 + "logit_scale"}
    n_mapped = sum(len(c) for c in comps.values())
    # every other key maps; bigG's fused in_proj weight/bias split into q/k/v (+4 keys per layer)
    assert n_mapped == len(base_sd) - len(extras) + 4 * 32
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel.from_config(xcfg.unet_config(cfg, 256))
        vae = diffusers.AutoencoderKL.from_config(xcfg.vae_config(cfg, 0.13025))
        te = transformers.CLIPTextModel(
            transformers.CLIPTextConfig(**xcfg.clip_config(comps["text_encoder"], {}))
        )
        te2 = transformers.CLIPTextModelWithProjection(
            transformers.CLIPTextConfig(**xcfg.openclip_config(comps["text_encoder_2"], {}))
        )
    for name, model in (
        ("unet", unet),
        ("vae", vae),
        ("text_encoder", te),
        ("text_encoder_2", te2),
    ):
        assert _shapes(comps[name]) == _shapes(model.state_dict()), name
    assert te2.config.num_hidden_layers == 32 and te2.config.num_attention_heads == 20
    assert te2.config.projection_dim == 1280 and te2.config.hidden_act == "gelu"
    assert unet.config.attention_head_dim == [5, 10, 20]


def test_diffusers_family(tmp_path: Path) -> None:
    for cls, text, want in (
        ("StableDiffusionXLPipeline", ["transformers", "CLIPTextModel"], "sdxl-base"),
        ("StableDiffusionXLImg2ImgPipeline", [None, None], "sdxl-refiner"),
        ("StableDiffusionPipeline", ["transformers", "CLIPTextModel"], "sd"),
    ):
        (tmp_path / "model_index.json").write_text(
            json.dumps({"_class_name": cls, "text_encoder": text})
        )
        assert diffusers_family(tmp_path) == want


def test_match_clip_layout_sdxl_prefix() -> None:
    sd = {CLIP0 + "embeddings.token_embedding.weight": torch.zeros(1)}
    model = {CLIP0 + "text_model.embeddings.token_embedding.weight", BIGG1 + "ln_final.weight"}
    assert set(match_clip_layout(sd, model)) == {
        CLIP0 + "text_model.embeddings.token_embedding.weight"
    }


# ---------------------------------------------------------------- reduced random SDXL-like model
CLIP_CFG = {
    "hidden_size": 32,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "intermediate_size": 64,
}
BIGG_ARCH = {
    "embed_dim": 48,
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 3},
    "vision_cfg": {"image_size": 14, "patch_size": 14, "layers": 1, "width": 64},
}
ADM = 48 + 6 * 256
UNET = dict(
    image_size=None,
    in_channels=4,
    out_channels=4,
    model_channels=32,
    attention_resolutions=[2, 4],
    num_res_blocks=1,
    channel_mult=[1, 2, 2],
    num_head_channels=8,
    use_spatial_transformer=True,
    use_linear_in_transformer=True,
    transformer_depth=[1, 1, 2],
    context_dim=32 + 64,
    legacy=False,
    num_classes="sequential",
    adm_in_channels=ADM,
)


def _reduced_config() -> dict:
    cfg = load_builtin_config("sdxl-base")
    params = cfg["model"]["params"]
    net = params["network_config"]["params"]
    net.update(
        {
            k: v
            for k, v in UNET.items()
            if k not in ("image_size", "use_spatial_transformer", "legacy")
        }
    )
    params["first_stage_config"]["params"]["ddconfig"] = dict(TINY_DDCONFIG)
    embs = params["conditioner_config"]["params"]["emb_models"]
    embs[0]["params"].update(config=CLIP_CFG, layer_idx=2)
    embs[1]["params"]["arch"] = BIGG_ARCH
    return cfg


@pytest.fixture(scope="module")
def reduced():
    from ldm.models.autoencoder import AutoencoderKL
    from ldm.modules.encoders.clip import FrozenCLIPEmbedder
    from ldm.modules.encoders.open_clip import build_text_only_clip
    from ldm.modules.unet import UNetModel

    torch.manual_seed(0)
    unet = UNetModel(**UNET).eval()
    vae = AutoencoderKL(
        ddconfig=TINY_DDCONFIG, lossconfig={"target": "torch.nn.Identity"}, embed_dim=4
    )
    clip = FrozenCLIPEmbedder(
        config=CLIP_CFG, layer="hidden", layer_idx=-2, allow_random_weights=True
    )
    bigg = build_text_only_clip(BIGG_ARCH).eval()
    with torch.no_grad():  # zero-initialised layers would hide mapping mistakes
        for p in list(unet.parameters()) + list(bigg.parameters()):
            p.add_(torch.randn_like(p) * 0.02)
    sd = {"model.diffusion_model." + k: v for k, v in unet.state_dict().items()}
    sd.update({"first_stage_model." + k: v for k, v in vae.state_dict().items()})
    sd.update({CLIP0 + k: v for k, v in clip.transformer.state_dict().items()})
    sd.update({BIGG1 + k: v for k, v in bigg.state_dict().items()})
    sd[CLIP0 + "embeddings.position_ids"] = torch.arange(77)[None]
    sd["model_ema.decay"] = torch.tensor(0.9999)
    return unet, clip, bigg, sd


@pytest.fixture(scope="module")
def folder(reduced, tmp_path_factory) -> Path:
    *_, sd = reduced
    out = tmp_path_factory.mktemp("sdxl") / "pipe"
    return to_diffusers(LoadedCheckpoint(out / "x.ckpt", sd), out, config=_reduced_config())


def _assert_same(a: dict, b: dict) -> None:
    assert set(a) == set(b), sorted(set(a) ^ set(b))[:8]
    for k, v in b.items():
        assert a[k].dtype == v.dtype and torch.equal(a[k], v), k


def test_round_trip_bit_exact(reduced, folder: Path, tmp_path: Path) -> None:
    *_, sd = reduced
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert index["force_zeros_for_empty_prompt"] is True
    back, config = from_diffusers(folder)
    _assert_same(back, sd)
    assert config == _reduced_config()
    out = diffusers_to_checkpoint(folder, tmp_path / "back.safetensors")
    ck = read_checkpoint(out)
    _assert_same(ck.state_dict, sd)
    with pytest.raises(DetectionError, match="adm"):  # reduced dims: only the embedded config
        detect_sd(ck.state_dict)
    assert ck.embedded_config == _reduced_config()


def test_round_trip_other_clip_layout(reduced, tmp_path: Path) -> None:
    """Files with `...transformer.text_model.*` (transformers 4) and without (5) both round-trip."""
    *_, sd = reduced
    nested = any(k.startswith(CLIP0 + "text_model.") for k in sd)
    if nested:
        other = {k.replace(CLIP0 + "text_model.", CLIP0): v for k, v in sd.items()}
    else:
        other = {
            (CLIP0 + "text_model." + k[len(CLIP0) :] if k.startswith(CLIP0) else k): v
            for k, v in sd.items()
        }
    out = to_diffusers(
        LoadedCheckpoint(tmp_path / "x.ckpt", other), tmp_path / "p", config=_reduced_config()
    )
    back, _ = from_diffusers(out)
    _assert_same(back, other)


def test_refiner_layout_round_trip(reduced, tmp_path: Path, diffusers) -> None:
    *_, sd = reduced
    cfg = _reduced_config()
    embs = cfg["model"]["params"]["conditioner_config"]["params"]["emb_models"]
    del embs[0]
    ref = {k: v for k, v in sd.items() if not k.startswith(CLIP0)}
    ref = {
        ("conditioner.embedders.0.model." + k[len(BIGG1) :] if k.startswith(BIGG1) else k): v
        for k, v in ref.items()
    }
    out = to_diffusers(LoadedCheckpoint(tmp_path / "x.ckpt", ref), tmp_path / "p", config=cfg)
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLImg2ImgPipeline"
    assert index["text_encoder"] == [None, None] and index["requires_aesthetics_score"] is True
    assert not (out / "text_encoder").exists()
    back, config = from_diffusers(out)
    _assert_same(back, ref)
    assert config == cfg
    foreign = tmp_path / "foreign"  # written by diffusers: no ldm_config.json, no extras
    diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(out).save_pretrained(foreign)
    back, config = from_diffusers(foreign)
    assert set(back) == set(ref) - {"model_ema.decay"}
    assert network_params(config)["adm_in_channels"] == ADM
    assert network_params(config)["context_dim"] == [96, 96, 96]  # the refiner's list form
    assert len(config["model"]["params"]["conditioner_config"]["params"]["emb_models"]) == 4


def test_unet_matches_diffusers(reduced, folder: Path, diffusers) -> None:
    from ldm.modules.timestep import timestep_embedding

    unet, *_ = reduced
    d_unet = diffusers.UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([10, 900])
    ctx = torch.randn(2, 77, 96, generator=g)
    pooled = torch.randn(2, 48, generator=g)
    time_ids = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024], [768, 512, 16, 32, 1024, 1024]])
    # y = [pooled, Fourier(each of the 6 numbers)]: [cos(n f), sin(n f)], f = 10000^(-i/128)
    four = timestep_embedding(time_ids.flatten(), 256).reshape(2, -1)
    n, f = time_ids[0, 0], torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(128) / 128)
    torch.testing.assert_close(four[0, :256], torch.cat([torch.cos(n * f), torch.sin(n * f)]))
    y = torch.cat([pooled, four], dim=1)
    with torch.no_grad():
        ours = unet(x, t, context=ctx, y=y)
        theirs = d_unet(
            x,
            t,
            encoder_hidden_states=ctx,
            added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
        ).sample
    assert ((theirs - ours).norm() / ours.norm()).item() <= 1e-4


def _tokens() -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, 49000, (2, 77), generator=g)
    ids[0, 5], ids[1, 40] = 49407, 49407  # end-of-text: the argmax, where the pooled state is read
    return ids


def test_text_encoder_2_matches_open_clip(reduced, folder: Path) -> None:
    _, _, bigg, _ = reduced
    d_te2 = transformers.CLIPTextModelWithProjection.from_pretrained(
        folder / "text_encoder_2"
    ).eval()
    ids = _tokens()
    with torch.no_grad():
        x = bigg.token_embedding(ids) + bigg.positional_embedding
        batch_first = getattr(bigg.transformer, "batch_first", False)
        x = x if batch_first else x.permute(1, 0, 2)
        states = []
        for block in bigg.transformer.resblocks:
            x = block(x, attn_mask=bigg.attn_mask)
            states.append(x if batch_first else x.permute(1, 0, 2))
        last = bigg.ln_final(states[-1])
        pooled = last[torch.arange(2), ids.argmax(-1)] @ bigg.text_projection
        out = d_te2(ids, output_hidden_states=True)
    torch.testing.assert_close(out.hidden_states[-2], states[-2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.text_embeds, pooled, rtol=1e-5, atol=1e-5)
    assert d_te2.config.num_hidden_layers == 3


def test_text_encoder_matches_clip(reduced, folder: Path) -> None:
    _, clip, _, _ = reduced
    d_te = transformers.CLIPTextModel.from_pretrained(folder / "text_encoder").eval()
    ids = _tokens()
    with torch.no_grad():
        ours = clip(ids)  # layer="hidden", layer_idx=-2: the penultimate hidden state
        theirs = d_te(ids, output_hidden_states=True).hidden_states[-2]
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_diffusers_pipeline_loads_and_foreign_folder_converts(
    reduced, folder: Path, tmp_path: Path, diffusers
) -> None:
    *_, sd = reduced
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(folder)
    assert pipe.tokenizer_2.pad_token_id == 0 and pipe.tokenizer.pad_token_id == 49407
    assert pipe.scheduler.__class__.__name__ == "EulerDiscreteScheduler"
    assert pipe.vae.config.force_upcast is True
    with torch.no_grad():
        lat = pipe(
            "a cube", num_inference_steps=1, height=32, width=32, output_type="latent"
        ).images
    assert lat.shape == (1, 4, 16, 16) and torch.isfinite(lat).all()
    foreign = tmp_path / "foreign"
    pipe.save_pretrained(foreign)
    assert not (foreign / "ldm_config.json").exists()
    back, config = from_diffusers(foreign)
    flat = {k.replace(CLIP0 + "text_model.", CLIP0): v for k, v in sd.items()}
    want = {  # foreign folders: the base 1.0 key list's CLIP layout (no `text_model.`)
        k: v
        for k, v in flat.items()
        if not k.endswith("position_ids") and not k.startswith("model_ema")
    }
    want[BIGG1 + "logit_scale"] = back[BIGG1 + "logit_scale"]  # not in diffusers folders: refilled
    _assert_same(back, want)
    reduced_cfg = _reduced_config()
    got_net, want_net = network_params(config), network_params(reduced_cfg)
    for key in (
        "model_channels",
        "channel_mult",
        "attention_resolutions",
        "num_res_blocks",
        "transformer_depth",
        "context_dim",
        "adm_in_channels",
        "num_head_channels",
    ):
        assert got_net[key] == want_net[key], key
    embs = config["model"]["params"]["conditioner_config"]["params"]["emb_models"]
    assert embs[0]["params"]["layer_idx"] == 2 and embs[0]["params"]["config"]["hidden_size"] == 32
    assert embs[1]["params"]["arch"]["text_cfg"]["width"] == 64
    shutil.rmtree(foreign)
    assert copy.deepcopy(config)["model"]["params"]["scale_factor"] == pytest.approx(0.13025)
