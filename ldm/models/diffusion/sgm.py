"""Stability's generative-models engine (``sgm.models.diffusion.DiffusionEngine``, the SDXL configs)
as a translator of its constructor parameters into one ``ldm.engine.DiffusionEngine``.

sgm composes the same parts as our engine under other names: ``network_config`` (the U-Net),
``denoiser_config`` (scaling + discretization), ``conditioner_config`` (a ``GeneralConditioner``
with ``emb_models``), ``first_stage_config``, ``loss_fn_config``, ``sampler_config``. The state-dict
layout is sgm's: ``model.diffusion_model.*``, ``first_stage_model.*``, ``conditioner.embedders.N.*``,
and no schedule buffers. Facts: ``../shared/reference/later/`` and Podell et al. 2023 (SDXL).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from ldm.engine.engine import DiffusionEngine
from ldm.util import ConfigError, did_you_mean, misplaced_hint, plain

logger = logging.getLogger(__name__)

#: sgm scalings of the DiscreteDenoiser -> our parameterization
SCALINGS = {"EpsScaling": "eps", "VScaling": "v"}
#: sgm samplers -> ours (sampling defaults)
SAMPLERS = {
    "EulerEDMSampler": "euler",
    "HeunEDMSampler": "heun",
    "EulerAncestralSampler": "euler_a",
    "DPMPP2SAncestralSampler": "dpmpp_2s_a",
    "DPMPP2MSampler": "dpmpp_2m",
    "LinearMultistepSampler": "lms",
}
#: batch keys that hold prompts; any other embedder input is a tensor of numbers
TEXT_KEYS = ("txt", "caption", "text", "prompt")
#: "no condition" of the micro-conditioning inputs (sgm / diffusers sampling defaults)
NULL_VALUES = {"aesthetic_score": 2.5}

SGM_PARAMS = (
    "network_config",
    "denoiser_config",
    "first_stage_config",
    "conditioner_config",
    "sampler_config",
    "optimizer_config",
    "scheduler_config",
    "loss_fn_config",
    "network_wrapper",
    "ckpt_path",
    "use_ema",
    "ema_decay_rate",
    "scale_factor",
    "disable_first_stage_autocast",
    "input_key",
    "log_keys",
    "no_cond_log",
    "compile_model",
    "en_and_decode_n_samples_a_time",
)
#: our engine's own keywords that an sgm config may add (our extensions)
OWN_PARAMS = (
    "image_size",
    "sampling_defaults",
    "monitor",
    "load_ckpt_only_model",
    "adapter",  # ours: LoRA / textual inversion on the frozen model (ldm.adapters.training)
    "prior_loss_weight",  # ours: DreamBooth's class-image loss weight
    "cache_latents",  # ours: encode the training images once (ldm.engine.latent_caching)
    "cache_text_embeddings",  # ours: frozen text encoders encode each prompt once
    "ema_device",  # ours: the optimizer and memory options (docs/optimizers.md)
    "ema_every",
    "gradient_checkpointing",
    "compile",
)


def _name(config: Any, where: str) -> tuple[str, dict[str, Any]]:
    """(class name, params) of a ``{target, params}`` config."""
    if not isinstance(config, Mapping) or "target" not in config:
        raise ConfigError(f"{where}: expected a {{target, params}} mapping, found {config!r}.")
    return str(config["target"]).rsplit(".", 1)[-1], dict(plain(config.get("params")) or {})


def translate_denoiser(config: Any) -> dict[str, Any]:
    """sgm DiscreteDenoiser (Eps/V scaling, LegacyDDPMDiscretization) -> our denoiser_config."""
    name, p = _name(config, "denoiser_config")
    if name != "DiscreteDenoiser":
        raise ConfigError(
            f"denoiser_config: {config['target']} is not supported; SD / SDXL use "
            "sgm.modules.diffusionmodules.denoiser.DiscreteDenoiser (EDM-style denoisers: use our "
            "DiffusionEngine with denoiser_config.sigma_training)."
        )
    scaling, _ = _name(p.get("scaling_config"), "denoiser_config.params.scaling_config")
    if scaling not in SCALINGS:
        raise ConfigError(
            f"denoiser_config.params.scaling_config: {scaling} is not supported; expected one of "
            f"{sorted(SCALINGS)}."
        )
    disc, dp = _name(p.get("discretization_config"), "denoiser_config.params.discretization_config")
    if disc != "LegacyDDPMDiscretization":
        raise ConfigError(
            f"denoiser_config.params.discretization_config: {disc} is not supported with a "
            "DiscreteDenoiser; expected LegacyDDPMDiscretization."
        )
    timesteps = int(dp.get("num_timesteps", 1000))
    if int(p.get("num_idx", timesteps)) != timesteps:
        raise ConfigError(
            f"denoiser_config: num_idx={p['num_idx']} differs from the discretization's "
            f"num_timesteps={timesteps}; a discrete denoiser uses one index per training timestep."
        )
    unknown = sorted(set(p) - {"num_idx", "scaling_config", "discretization_config"})
    if unknown:
        raise ConfigError(f"denoiser_config.params: unsupported key(s) {unknown}.")
    return {
        "parameterization": SCALINGS[scaling],
        "timesteps": timesteps,
        "beta_schedule": "linear",  # sgm make_beta_schedule "linear": linear in sqrt(beta)
        "linear_start": float(dp.get("linear_start", 0.00085)),
        "linear_end": float(dp.get("linear_end", 0.0120)),
        "persistent_buffers": False,
    }


def translate_embedder(entry: Mapping[str, Any], i: int) -> dict[str, Any]:
    """One ``emb_models`` entry -> our embedder spec (outputs assembled by their ndim)."""
    where = f"conditioner_config.params.emb_models[{i}]"
    if "input_key" not in entry:
        hint = " (input_keys: several inputs per embedder are not supported)"
        raise ConfigError(f"{where} needs input_key{hint if 'input_keys' in entry else ''}.")
    key = str(entry["input_key"])
    text = key in TEXT_KEYS
    spec: dict[str, Any] = {
        "target": entry["target"],
        "params": dict(plain(entry.get("params")) or {}),
        "input_key": key,
        "is_trainable": bool(entry.get("is_trainable", False)),
        "ucg_rate": float(entry.get("ucg_rate", 0.0) or 0.0),
        "kind": "auto",
        "input": "text" if text else "tensor",
    }
    if entry.get("legacy_ucg_value") is not None:  # sgm: dropout replaces the input
        spec["null"] = entry["legacy_ucg_value"]
    elif text:  # sgm / diffusers: zero embeddings for "no prompt"
        spec["zero_null"] = True
    elif key in NULL_VALUES:
        spec["null"] = NULL_VALUES[key]
    if spec["params"].get("freeze") is not None and spec["is_trainable"]:
        spec["params"]["freeze"] = False
    return spec


def translate_conditioner(config: Any) -> dict[str, Any]:
    """sgm GeneralConditioner -> our conditioner_config."""
    if config is None:
        return {}
    name, p = _name(config, "conditioner_config")
    if name != "GeneralConditioner":
        raise ConfigError(
            f"conditioner_config: {config['target']} is not supported; expected "
            "sgm.modules.GeneralConditioner."
        )
    models = list(p.get("emb_models") or [])
    return {"embedders": [translate_embedder(dict(m), i) for i, m in enumerate(models)]}


def translate_sampler(config: Any) -> dict[str, Any]:
    """sgm sampler_config -> our sampling_defaults (sampler, steps, guidance)."""
    if config is None:
        return {}
    name, p = _name(config, "sampler_config")
    if name not in SAMPLERS:
        raise ConfigError(
            f"sampler_config: {name} has no counterpart here{did_you_mean(name, list(SAMPLERS))}; "
            f"known: {sorted(SAMPLERS)}."
        )
    out: dict[str, Any] = {"sampler": SAMPLERS[name]}
    if p.get("num_steps") is not None:
        out["steps"] = int(p["num_steps"])
    guider = p.get("guider_config")
    if guider is not None:
        gname, gp = _name(guider, "sampler_config.params.guider_config")
        if gname == "VanillaCFG":
            out["guidance_scale"] = float(gp.get("scale", 1.0))
        elif gname == "IdentityGuider":
            out["guidance_scale"] = 1.0
        else:
            raise ConfigError(f"sampler_config.params.guider_config: {gname} is not supported.")
    return out


def translate_loss(config: Any) -> dict[str, Any]:
    """sgm StandardDiffusionLoss -> our loss_config (loss type, offset noise)."""
    if config is None:
        return {}
    name, p = _name(config, "loss_fn_config")
    if name != "StandardDiffusionLoss":
        raise ConfigError(f"loss_fn_config: {name} is not supported (StandardDiffusionLoss is).")
    out: dict[str, Any] = {"loss_type": p.get("loss_type", "l2")}
    if p.get("offset_noise_level"):
        out["offset_noise"] = float(p["offset_noise_level"])
    sampling = p.get("sigma_sampler_config")
    if sampling is not None and _name(sampling, "sigma_sampler_config")[0] != "DiscreteSampling":
        raise ConfigError(
            "loss_fn_config.params.sigma_sampler_config: only DiscreteSampling (t uniform over "
            "the training timesteps) goes with a DiscreteDenoiser here."
        )
    weighting = p.get("loss_weighting_config")
    if weighting is not None:
        wname = _name(weighting, "loss_weighting_config")[0]
        if wname not in ("EpsWeighting", "UnitWeighting"):
            raise ConfigError(
                f"loss_fn_config.params.loss_weighting_config: {wname} is not supported; the "
                "eps-space loss (EpsWeighting) is; use loss_config.min_snr_gamma for SNR weights."
            )
    return out


def translate(params: Mapping[str, Any]) -> dict[str, Any]:
    """sgm DiffusionEngine parameters -> our DiffusionEngine keywords."""
    allowed = SGM_PARAMS + OWN_PARAMS
    for key in params:
        if key not in allowed:
            hint = misplaced_hint(key) or " Check model.params in your config."
            raise ConfigError(
                f"sgm DiffusionEngine has no parameter '{key}'{did_you_mean(key, allowed)}.{hint}"
            )
    p = dict(params)
    if "network_config" not in p or "denoiser_config" not in p:
        raise ConfigError(
            "sgm DiffusionEngine needs network_config (the U-Net) and denoiser_config."
        )
    net = dict(plain(p["network_config"]))
    net_params = dict(net.get("params") or {})
    if p.get("network_wrapper") not in (
        None,
        "sgm.modules.diffusionmodules.wrappers.OpenAIWrapper",
    ):
        raise ConfigError(
            f"network_wrapper={p['network_wrapper']!r}: only sgm's OpenAIWrapper (the default: "
            "concat channels, crossattn context, vector y) is supported."
        )
    conditioner = translate_conditioner(p.get("conditioner_config"))
    if any(sp.get("kind") == "concat" for sp in conditioner.get("embedders", [])):
        raise ConfigError("concat-conditioned sgm models are not supported.")
    has_vector = net_params.get("num_classes") is not None
    has_context = net_params.get("context_dim") is not None
    key = {
        (True, True): "crossattn-adm",
        (True, False): "crossattn",
        (False, True): "adm",
        (False, False): None,
    }[(has_context, has_vector)]
    if p.get("compile_model") and p.get("compile") is not None:
        raise ConfigError("give compile_model (sgm) or compile (ours), not both.")
    latent = p.get("image_size", 128)  # SDXL: 1024 px -> 128 x 128 latents
    out: dict[str, Any] = {
        "network_config": net,
        "denoiser_config": translate_denoiser(p["denoiser_config"]),
        "conditioner_config": conditioner,
        "first_stage_config": p.get("first_stage_config"),
        "loss_config": translate_loss(p.get("loss_fn_config")),
        "sampling_defaults": p.get("sampling_defaults")
        or translate_sampler(p.get("sampler_config")),
        "conditioning_key": key,
        "scheduler_config": p.get("scheduler_config"),
        "first_stage_key": p.get("input_key", "jpg"),
        "image_size": latent,
        "channels": int(net_params.get("in_channels", 4)),
        "scale_factor": float(p.get("scale_factor", 1.0)),
        "use_ema": bool(p.get("use_ema", False)),
        "ema_decay": float(p.get("ema_decay_rate", 0.9999)),
        "ckpt_path": p.get("ckpt_path"),
        "load_only_unet": bool(p.get("load_ckpt_only_model", False)),
        "first_stage_fp32": bool(p.get("disable_first_stage_autocast", False)),
        "monitor": p.get("monitor"),
        "adapter": p.get("adapter"),
        "prior_loss_weight": float(p.get("prior_loss_weight", 1.0)),
        "cache_latents": p.get("cache_latents"),
        "cache_text_embeddings": p.get("cache_text_embeddings"),
        # sgm's {target, params} optimizer_config is ours too (ldm.optimizers)
        "optimizer_config": p.get("optimizer_config"),
        "ema_device": p.get("ema_device"),
        "ema_every": p.get("ema_every", 1),
        "gradient_checkpointing": p.get("gradient_checkpointing"),
        "compile": p.get("compile", bool(p.get("compile_model", False))),
    }
    return out


class SGMDiffusionEngine(DiffusionEngine):
    """``sgm.models.diffusion.DiffusionEngine``: its parameters, our engine."""

    def __init__(self, **params: Any) -> None:
        super().__init__(**translate(params))
