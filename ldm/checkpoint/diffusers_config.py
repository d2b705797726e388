"""diffusers folder configs (unet, vae, text_encoder, tokenizer, scheduler) from our model config.

Writes plain JSON; diffusers/transformers are not imported. Hyperparameter correspondences follow
the CompVis constructors: attention at downsample factors in `attention_resolutions`, heads from
`num_heads` or `model_channels * mult // num_head_channels`, KL-f8 blocks `ch * ch_mult`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

DIFFUSERS_VERSION = "0.30.0"  # oldest layout we target; newer diffusers read it


class ConversionError(ValueError):
    """The model cannot be expressed in the diffusers Stable Diffusion layout."""


def unet_config(unet: dict[str, Any], sample_size: int) -> dict[str, Any]:
    """UNet2DConditionModel config from CompVis UNetModel params."""
    mc, mult = unet["model_channels"], list(unet["channel_mult"])
    if unet.get("context_dim") is None:
        raise ConversionError(
            "U-Net has no context_dim: diffusers' UNet2DConditionModel needs cross-attention."
        )
    attn_res = set(unet.get("attention_resolutions", []))
    att = [2**level in attn_res for level in range(len(mult))]
    heads, head_ch = unet.get("num_heads", -1), unet.get("num_head_channels", -1)
    if head_ch not in (-1, None):
        head_dim: Any = [mc * m // head_ch for m in mult]
    else:
        head_dim = heads
    depth = unet.get("transformer_depth", 1)
    ctx = unet["context_dim"]
    cfg: dict[str, Any] = {
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        "sample_size": sample_size,
        "in_channels": unet["in_channels"],
        "out_channels": unet["out_channels"],
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in att],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(att)],
        "block_out_channels": [mc * m for m in mult],
        "layers_per_block": unet["num_res_blocks"],
        "cross_attention_dim": ctx[0] if isinstance(ctx, list) else ctx,
        "attention_head_dim": head_dim,
        "use_linear_projection": bool(unet.get("use_linear_in_transformer", False)),
        "transformer_layers_per_block": list(depth) if isinstance(depth, (list, tuple)) else depth,
        "act_fn": "silu",
        "norm_num_groups": 32,
        "norm_eps": 1e-5,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "downsample_padding": 1,
        "center_input_sample": False,
    }
    if isinstance(unet.get("num_classes"), int):
        cfg["num_class_embeds"] = unet["num_classes"]
    return cfg


def vae_config(first_stage: dict[str, Any], scale_factor: float) -> dict[str, Any]:
    """diffusers AutoencoderKL config from CompVis AutoencoderKL params."""
    dd = first_stage["ddconfig"]
    if dd.get("attn_resolutions"):
        raise ConversionError(
            "diffusers' AutoencoderKL has no attention outside the mid block (attn_resolutions)."
        )
    if first_stage.get("embed_dim", dd["z_channels"]) != dd["z_channels"]:
        raise ConversionError("diffusers' AutoencoderKL needs embed_dim == z_channels.")
    n = len(dd["ch_mult"])
    return {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": DIFFUSERS_VERSION,
        "in_channels": dd["in_channels"],
        "out_channels": dd["out_ch"],
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": [dd["ch"] * m for m in dd["ch_mult"]],
        "layers_per_block": dd["num_res_blocks"],
        "latent_channels": dd["z_channels"],
        "act_fn": "silu",
        "norm_num_groups": 32,
        "sample_size": dd["resolution"],
        "scaling_factor": scale_factor,
    }


def text_config(
    hf_sd: dict[str, torch.Tensor], kind: str, heads: int | None = None
) -> dict[str, Any]:
    """CLIPTextConfig from a hub-layout text state dict; kind 'clip' (SD v1) or 'openclip' (SD v2)."""
    tok = hf_sd["text_model.embeddings.token_embedding.weight"]
    pos = hf_sd["text_model.embeddings.position_embedding.weight"]
    layers = 1 + max(
        int(m.group(1))
        for k in hf_sd
        if (m := re.match(r"text_model\.encoder\.layers\.(\d+)\.", k))
    )
    hidden = int(tok.shape[1])
    cfg = {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": int(tok.shape[0]),
        "hidden_size": hidden,
        "intermediate_size": int(hf_sd["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0]),
        "num_hidden_layers": layers,
        "num_attention_heads": heads or max(1, hidden // 64),
        "max_position_embeddings": int(pos.shape[0]),
        "hidden_act": "quick_gelu" if kind == "clip" else "gelu",
        "layer_norm_eps": 1e-5,
        "projection_dim": 768 if kind == "clip" else 512,
        "torch_dtype": "float32",
    }
    if kind == "clip":
        cfg.update(bos_token_id=49406, eos_token_id=49407, pad_token_id=1)
    else:
        cfg.update(bos_token_id=0, eos_token_id=2, pad_token_id=1)
    return cfg


def scheduler_config(model_params: dict[str, Any]) -> dict[str, Any]:
    """DDIMScheduler config for the training schedule of a LatentDiffusion config."""
    schedule = model_params.get("beta_schedule", "linear")
    names = {"linear": "scaled_linear", "sqrt_linear": "linear", "cosine": "squaredcos_cap_v2"}
    if schedule not in names:
        raise ConversionError(
            f"beta_schedule {schedule!r} has no diffusers equivalent ({sorted(names)})."
        )
    param = model_params.get("parameterization", "eps")
    pred = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}[param]
    # zero terminal SNR (Lin et al. 2023, Alg. 1) pairs with trailing timesteps (their Sec. 3.3)
    zero_snr = bool(model_params.get("zero_terminal_snr", False))
    return {
        "_class_name": "DDIMScheduler",
        "_diffusers_version": DIFFUSERS_VERSION,
        "num_train_timesteps": model_params.get("timesteps", 1000),
        "beta_start": model_params.get("linear_start", 1e-4),
        "beta_end": model_params.get("linear_end", 2e-2),
        "beta_schedule": names[schedule],
        "prediction_type": pred,
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "timestep_spacing": "trailing" if zero_snr else "leading",
        "rescale_betas_zero_snr": zero_snr,
    }


def params_from_scheduler(cfg: dict[str, Any]) -> dict[str, Any]:
    """LatentDiffusion schedule params from a diffusers scheduler config (inverse of the above)."""
    names = {"scaled_linear": "linear", "linear": "sqrt_linear", "squaredcos_cap_v2": "cosine"}
    pred = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}[
        cfg.get("prediction_type", "epsilon")
    ]
    params = {
        "timesteps": cfg.get("num_train_timesteps", 1000),
        "linear_start": cfg.get("beta_start", 1e-4),
        "linear_end": cfg.get("beta_end", 2e-2),
        "beta_schedule": names.get(cfg.get("beta_schedule", "scaled_linear"), "linear"),
        "parameterization": pred,
    }
    if cfg.get("rescale_betas_zero_snr"):
        params["zero_terminal_snr"] = True
    return params


def write_tokenizer(folder: Path, kind: str) -> None:
    """CLIPTokenizer files (vocab.json, merges.txt) built offline from CLIP's BPE file."""
    from ldm.modules.encoders.tokenizer import default_bpe_path, load_bpe

    vocab, ranks = load_bpe(default_bpe_path())
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges = sorted(ranks, key=ranks.__getitem__)
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8"
    )
    pad = "<|endoftext|>" if kind == "clip" else "!"  # SD v2 pads with id 0 ("!")
    specials = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": pad,
    }
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    tok_cfg = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "do_lower_case": True,
        **specials,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))


def model_index(inpainting: bool, text_class: str = "CLIPTextModel") -> dict[str, Any]:
    """model_index.json of a StableDiffusion(Inpaint)Pipeline folder."""
    return {
        "_class_name": "StableDiffusionInpaintPipeline"
        if inpainting
        else "StableDiffusionPipeline",
        "_diffusers_version": DIFFUSERS_VERSION,
        "feature_extractor": [None, None],
        "safety_checker": [None, None],
        "requires_safety_checker": False,
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", text_class],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def ldm_config_from_diffusers(folder: str | Path) -> dict[str, Any]:
    """Our LatentDiffusion config from a diffusers folder's component configs (inverse of the above)."""
    folder = Path(folder)
    unet = _read_json(folder / "unet" / "config.json")
    vae = _read_json(folder / "vae" / "config.json")
    text = _read_json(folder / "text_encoder" / "config.json")
    sched = _read_json(folder / "scheduler" / "scheduler_config.json")
    if not unet or not vae:
        raise ConversionError(f"{folder}: unet/config.json and vae/config.json are required.")
    bo = list(unet["block_out_channels"])
    mc = bo[0]
    heads = unet.get("attention_head_dim", 8)
    unet_params: dict[str, Any] = {
        "image_size": unet.get("sample_size", 64),
        "in_channels": unet.get("in_channels", 4),
        "out_channels": unet.get("out_channels", 4),
        "model_channels": mc,
        "attention_resolutions": [
            2**i for i, t in enumerate(unet["down_block_types"]) if t.startswith("CrossAttn")
        ],
        "num_res_blocks": unet.get("layers_per_block", 2),
        "channel_mult": [c // mc for c in bo],
        "use_spatial_transformer": True,
        "transformer_depth": unet.get("transformer_layers_per_block", 1),
        "context_dim": unet.get("cross_attention_dim", 768),
        "use_linear_in_transformer": bool(unet.get("use_linear_projection", False)),
        "legacy": False,
    }
    if isinstance(heads, list):
        per_head = {c // h for c, h in zip(bo, heads)}
        if len(per_head) != 1:
            raise ConversionError(
                f"attention_head_dim {heads} gives unequal head widths {per_head}."
            )
        unet_params["num_head_channels"] = per_head.pop()
    else:
        unet_params["num_heads"] = heads
    vbo = list(vae["block_out_channels"])
    ddconfig = {
        "double_z": True,
        "z_channels": vae.get("latent_channels", 4),
        "resolution": vae.get("sample_size", 256),
        "in_channels": vae.get("in_channels", 3),
        "out_ch": vae.get("out_channels", 3),
        "ch": vbo[0],
        "ch_mult": [c // vbo[0] for c in vbo],
        "num_res_blocks": vae.get("layers_per_block", 2),
        "attn_resolutions": [],
        "dropout": 0.0,
    }
    if text.get("hidden_act", "quick_gelu") == "quick_gelu":
        fields = (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "max_position_embeddings",
            "hidden_act",
            "layer_norm_eps",
        )
        cond = {
            "target": "ldm.modules.encoders.clip.FrozenCLIPEmbedder",
            "params": {"config": {k: text[k] for k in fields if k in text}},
        }
    else:
        cond = {
            "target": "ldm.modules.encoders.open_clip.FrozenOpenCLIPEmbedder",
            "params": {"freeze": True, "layer": "penultimate"},
        }
    inpaint = unet_params["in_channels"] == 9
    params = {
        **params_from_scheduler(sched),
        "first_stage_key": "jpg",
        "cond_stage_key": "txt",
        "image_size": unet_params["image_size"],
        "channels": vae.get("latent_channels", 4),
        "cond_stage_trainable": False,
        "conditioning_key": "hybrid" if inpaint else "crossattn",
        "scale_factor": vae.get("scaling_factor", 0.18215),
        "use_ema": False,
        "unet_config": {"target": "ldm.modules.unet.UNetModel", "params": unet_params},
        "first_stage_config": {
            "target": "ldm.models.autoencoder.AutoencoderKL",
            "params": {
                "embed_dim": ddconfig["z_channels"],
                "ddconfig": ddconfig,
                "lossconfig": {"target": "torch.nn.Identity"},
            },
        },
        "cond_stage_config": cond,
    }
    if params["parameterization"] == "eps":
        params.pop("parameterization")
    cls = "LatentInpaintDiffusion" if inpaint else "LatentDiffusion"
    return {"model": {"target": f"ldm.models.diffusion.ddpm.{cls}", "params": params}}
