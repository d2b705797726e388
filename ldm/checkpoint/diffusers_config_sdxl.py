"""diffusers SDXL folder configs from an SDXL (sgm-layout) config, and back.

Forward: `unet` (UNet2DConditionModel with `addition_embed_type="text_time"`), `text_encoder_2`
(CLIPTextModelWithProjection, every OpenCLIP layer), EulerDiscreteScheduler, model_index.json of
StableDiffusionXL(Img2Img)Pipeline, as in the published SDXL base/refiner folders. Backward: the
built-in sdxl-base / sdxl-refiner config with the dimensions read from a folder's component
configs. Plain JSON; diffusers/transformers are not imported.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from ldm.checkpoint import diffusers_config as dcfg
from ldm.checkpoint.diffusers_config import ConversionError
from ldm.checkpoint.diffusers_folder import read_json
from ldm.checkpoint.keymap_text import PROJECTION_KEY
from ldm.checkpoint.sdxl_layout import emb_models, network_params, text_embedders

SAMPLE_SIZE = 128  # latent side of SDXL's 1024x1024
_SCALINGS = {"EpsScaling": "epsilon", "VScaling": "v_prediction"}
_SGM_SCALING = "sgm.modules.diffusionmodules.denoiser_scaling."
# open_clip ViT-bigG-14 text tower and CLIP ViT-L/14 text model: what the built-ins assume
_BIGG = {"width": 1280, "layers": 32, "heads": 20, "vocab_size": 49408, "context_length": 77}
_VIT_L = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "vocab_size": 49408,
    "max_position_embeddings": 77,
}


def unet_config(config: dict[str, Any], time_dim: int) -> dict[str, Any]:
    """UNet2DConditionModel config of an SDXL U-Net (vector conditioning as `text_time`)."""
    params = network_params(config)
    if params.get("num_classes") != "sequential" or not params.get("adm_in_channels"):
        raise ConversionError(
            "network_config.params: SDXL U-Nets have num_classes 'sequential' and "
            f"adm_in_channels; found num_classes={params.get('num_classes')!r}, "
            f"adm_in_channels={params.get('adm_in_channels')!r}."
        )
    cfg = dcfg.unet_config(params, params.get("image_size") or SAMPLE_SIZE)
    cfg.update(
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=int(params["adm_in_channels"]),
        class_embed_type=None,
    )
    return cfg


def vae_config(config: dict[str, Any], scale_factor: float) -> dict[str, Any]:
    """AutoencoderKL config; SDXL's VAE overflows in fp16, so diffusers upcasts it."""
    first = config["model"]["params"]["first_stage_config"]["params"]
    return {**dcfg.vae_config(first, scale_factor), "force_upcast": True}


def clip_config(hf_sd: dict[str, torch.Tensor], params: dict[str, Any]) -> dict[str, Any]:
    """CLIPTextModel config (SDXL `text_encoder`); an embedder's `config` dict overrides dims."""
    given = dict(params.get("config") or {})
    cfg = dcfg.text_config(hf_sd, "clip", given.get("num_attention_heads"))
    cfg.update({k: v for k, v in given.items() if k in cfg})
    cfg.update(bos_token_id=0, eos_token_id=2, pad_token_id=1)  # as SDXL's published config
    return cfg


def openclip_heads(params: dict[str, Any], width: int) -> int:
    """Attention heads of an OpenCLIP text tower: from an `arch` dict, else width // 64."""
    arch = params.get("arch")
    if isinstance(arch, dict):
        return int((arch.get("text_cfg") or {}).get("heads", 8))
    return max(1, width // 64)


def openclip_config(hf_sd: dict[str, torch.Tensor], params: dict[str, Any]) -> dict[str, Any]:
    """CLIPTextModelWithProjection config (SDXL `text_encoder_2`): all layers, gelu, projection."""
    width = int(hf_sd["text_model.embeddings.token_embedding.weight"].shape[1])
    cfg = dcfg.text_config(hf_sd, "openclip", openclip_heads(params, width))
    if PROJECTION_KEY not in hf_sd:
        raise ConversionError(
            f"OpenCLIP text tower has no `text_projection`; SDXL's text_encoder_2 needs it "
            f"(found {len(hf_sd)} keys)."
        )
    cfg.update(
        architectures=["CLIPTextModelWithProjection"],
        projection_dim=int(hf_sd[PROJECTION_KEY].shape[0]),
        hidden_act="gelu",
    )
    return cfg


def scheduler_config(config: dict[str, Any]) -> dict[str, Any]:
    """EulerDiscreteScheduler of the SDXL folders, from the config's DiscreteDenoiser."""
    den = config["model"]["params"].get("denoiser_config") or {}
    den_params = den.get("params") or {}
    scaling = str((den_params.get("scaling_config") or {}).get("target", "EpsScaling"))
    pred = _SCALINGS.get(scaling.rsplit(".", 1)[-1])
    if pred is None:
        raise ConversionError(
            f"denoiser_config.params.scaling_config.target {scaling!r} has no diffusers "
            f"EulerDiscreteScheduler prediction type; expected one of {sorted(_SCALINGS)}."
        )
    disc = (den_params.get("discretization_config") or {}).get("params") or {}
    return {
        "_class_name": "EulerDiscreteScheduler",
        "_diffusers_version": dcfg.DIFFUSERS_VERSION,
        "num_train_timesteps": int(den_params.get("num_idx", 1000)),
        "beta_start": float(disc.get("linear_start", 0.00085)),
        "beta_end": float(disc.get("linear_end", 0.012)),
        "beta_schedule": "scaled_linear",
        "prediction_type": pred,
        "interpolation_type": "linear",
        "use_karras_sigmas": False,
        "clip_sample": False,
        "sample_max_value": 1.0,
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "timestep_spacing": "leading",
        "trained_betas": None,
    }


def model_index(has_clip: bool) -> dict[str, Any]:
    """model_index.json: the base pipeline with both encoders, the refiner's img2img without CLIP."""
    index: dict[str, Any] = {
        "_class_name": "StableDiffusionXLPipeline"
        if has_clip
        else "StableDiffusionXLImg2ImgPipeline",
        "_diffusers_version": dcfg.DIFFUSERS_VERSION,
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"] if has_clip else [None, None],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"] if has_clip else [None, None],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    if has_clip:
        index["force_zeros_for_empty_prompt"] = True
    else:
        index.update(force_zeros_for_empty_prompt=False, requires_aesthetics_score=True)
    return index


def _network_from_unet(params: dict[str, Any], unet: dict[str, Any]) -> None:
    bo = list(unet["block_out_channels"])
    heads = unet.get("attention_head_dim")
    heads = heads if isinstance(heads, list) else [heads] * len(bo)
    head_ch = {c // h for c, h in zip(bo, heads)}
    if len(head_ch) != 1:
        raise ConversionError(
            f"unet/config.json: attention_head_dim {heads} over block_out_channels {bo} gives "
            f"unequal head widths {sorted(head_ch)}; SDXL uses one num_head_channels."
        )
    ctx = unet["cross_attention_dim"]
    depth = unet.get("transformer_layers_per_block", 1)
    params.update(
        in_channels=unet.get("in_channels", 4),
        out_channels=unet.get("out_channels", 4),
        model_channels=bo[0],
        channel_mult=[c // bo[0] for c in bo],
        num_res_blocks=unet.get("layers_per_block", 2),
        attention_resolutions=[
            2**i for i, t in enumerate(unet["down_block_types"]) if t.startswith("CrossAttn")
        ],
        num_head_channels=head_ch.pop(),
        transformer_depth=list(depth) if isinstance(depth, list) else depth,
        context_dim=[ctx] * len(bo) if isinstance(params.get("context_dim"), list) else ctx,
        adm_in_channels=unet["projection_class_embeddings_input_dim"],
    )


def _openclip_params(params: dict[str, Any], text: dict[str, Any]) -> None:
    dims = {
        "width": text["hidden_size"],
        "layers": text["num_hidden_layers"],
        "heads": text["num_attention_heads"],
        "vocab_size": text["vocab_size"],
        "context_length": text["max_position_embeddings"],
    }
    if dims != _BIGG or text.get("projection_dim", 1280) != 1280:
        params["arch"] = {
            "embed_dim": text.get("projection_dim", dims["width"]),
            "text_cfg": {**dims, "mlp_ratio": text["intermediate_size"] / dims["width"]},
            "vision_cfg": {"image_size": 14, "patch_size": 14, "layers": 1, "width": 64},
        }


def _clip_params(params: dict[str, Any], text: dict[str, Any]) -> None:
    dims = {k: text[k] for k in _VIT_L if k in text}
    if dims != _VIT_L:
        params["config"] = {**dims, "hidden_act": text.get("hidden_act", "quick_gelu")}
        if params.get("layer") == "hidden":  # SDXL reads the penultimate hidden state
            params["layer_idx"] = dims["num_hidden_layers"] - 1


def sdxl_config_from_diffusers(folder: Path, base: dict[str, Any]) -> dict[str, Any]:
    """The built-in SDXL config `base` with the dimensions of a diffusers SDXL folder."""
    cfg = copy.deepcopy(base)
    unet = read_json(folder / "unet" / "config.json")
    vae = read_json(folder / "vae" / "config.json")
    if not unet or not vae:
        raise ConversionError(f"{folder}: unet/config.json and vae/config.json are required.")
    if "projection_class_embeddings_input_dim" not in unet:
        raise ConversionError(
            f"{folder}/unet/config.json has no projection_class_embeddings_input_dim; an SDXL "
            "U-Net has one (addition_embed_type 'text_time')."
        )
    _network_from_unet(network_params(cfg), unet)
    params = cfg["model"]["params"]
    params["scale_factor"] = vae.get("scaling_factor", params.get("scale_factor"))
    first = params["first_stage_config"]["params"]
    vbo = list(vae["block_out_channels"])
    first["embed_dim"] = vae.get("latent_channels", 4)
    first["ddconfig"].update(
        z_channels=vae.get("latent_channels", 4),
        in_channels=vae.get("in_channels", 3),
        out_ch=vae.get("out_channels", 3),
        ch=vbo[0],
        ch_mult=[c // vbo[0] for c in vbo],
        num_res_blocks=vae.get("layers_per_block", 2),
    )
    for emb in emb_models(cfg):
        if "TimestepEmbedder" in str(emb.get("target", "")):
            emb.setdefault("params", {})["outdim"] = unet.get("addition_time_embed_dim", 256)
    for t in text_embedders(cfg):
        sub = "text_encoder" if t.kind == "clip" else "text_encoder_2"
        text = read_json(folder / sub / "config.json")
        if not text:
            raise ConversionError(f"{folder}/{sub}/config.json is missing (needed for {t.kind}).")
        emb_params = emb_models(cfg)[t.index].setdefault("params", {})
        (_clip_params if t.kind == "clip" else _openclip_params)(emb_params, text)
    sched = read_json(folder / "scheduler" / "scheduler_config.json")
    if sched.get("prediction_type") == "v_prediction":
        den = params["denoiser_config"]["params"]
        den["scaling_config"] = {"target": _SGM_SCALING + "VScaling"}
    return cfg
