"""The CompVis / Stability classes (`ldm.models.diffusion.ddpm.DDPM`, `LatentDiffusion`,
`LatentInpaintDiffusion`) as thin translators of their constructor parameters into one
``ldm.engine.DiffusionEngine``, so every original config and checkpoint keeps working.

Each class's ``__init__`` only maps its parameters (``translate``) and builds the engine once; the
remaining methods are the CompVis API (``get_input``, ``p_losses``, ``predict_start_from_noise``,
...) for code written against the originals. The engine itself never calls them.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ldm.diffusion.gaussian import (
    eps_from_v,
    posterior,
    predict_x0_from_eps,
    to_eps_x0,
    v_from_eps_x0,
    x0_from_v,
)
from ldm.engine.engine import DiffusionEngine
from ldm.engine.frozen import disabled_train
from ldm.engine.network import DiffusionWrapper
from ldm.util import (
    FIRST_STAGE_SENTINEL,
    UNCONDITIONAL_SENTINEL,
    ConfigError,
    did_you_mean,
    misplaced_hint,
    plain,
)

logger = logging.getLogger(__name__)

__all__ = [
    "DDPM",
    "DiffusionWrapper",
    "LatentDiffusion",
    "LatentInpaintDiffusion",
    "disabled_train",
    "translate",
]

#: CompVis batch keys: captions (text) and class labels; any other cond key holds an image.
COMPVIS_TEXT_KEYS = ("caption", "txt", "text", "coordinates_bbox")
COMPVIS_CLASS_KEYS = ("class_label", "cls")
DEFAULT_FINETUNE_KEYS = (
    "model.diffusion_model.input_blocks.0.0.weight",
    "model_ema.diffusion_modelinput_blocks00weight",
)


def _is(config: Any, sentinel: str) -> bool:
    return isinstance(config, str) and config == sentinel


def translate(kind: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """CompVis constructor parameters of ``kind`` ("ddpm", "latent", "inpaint") -> engine keywords.

    Unknown names raise ConfigError naming the closest valid one.
    """
    allowed = (
        DDPM_PARAMS
        + (LATENT_PARAMS if kind != "ddpm" else ())
        + (INPAINT_PARAMS if kind == "inpaint" else ())
    )
    owner = {"ddpm": "DDPM", "latent": "LatentDiffusion", "inpaint": "LatentInpaintDiffusion"}[kind]
    for key in params:
        if key not in allowed:
            hint = misplaced_hint(key) or " Check model.params in your config."
            raise ConfigError(
                f"{owner} has no parameter '{key}'{did_you_mean(key, allowed)}.{hint}"
            )
    p = dict(params)
    if "unet_config" not in p:
        raise ConfigError(f"{owner} needs unet_config (the U-Net's {{target, params}}).")
    if p.get("use_positional_encodings"):
        raise ConfigError(
            "use_positional_encodings=True (CompVis layout models) is not supported: its "
            "latent-shift computation was never published. Set it to false."
        )
    denoiser = {
        k: plain(p[k])
        for k in (
            "timesteps",
            "beta_schedule",
            "linear_start",
            "linear_end",
            "cosine_s",
            "given_betas",
            "zero_terminal_snr",
            "v_posterior",
            "parameterization",
            "sigma_training",
        )
        if k in p
    }
    loss = {
        k: p[k]
        for k in (
            "loss_type",
            "l_simple_weight",
            "original_elbo_weight",
            "min_snr_gamma",
            "snr_weight_floor",
            "offset_noise",
            "input_perturbation",
            "learn_logvar",
            "logvar_init",
        )
        if k in p
    }
    out: dict[str, Any] = {
        "network_config": p["unet_config"],
        "denoiser_config": denoiser,
        "loss_config": loss,
        "conditioning_key": p.get("conditioning_key"),
        "clip_denoised": p.get("clip_denoised", True),
    }
    for k in (
        "ckpt_path",
        "ignore_keys",
        "load_only_unet",
        "monitor",
        "use_ema",
        "first_stage_key",
        "image_size",
        "channels",
        "log_every_t",
        "scheduler_config",
        "make_it_fit",
        "reset_ema",
        "reset_num_ema_updates",
        "ema_decay",
        "sampling_defaults",
        "adapter",
        "prior_loss_weight",
        "cache_latents",
        "cache_text_embeddings",
        "optimizer_config",
        "ema_device",
        "ema_every",
        "gradient_checkpointing",
        "compile",
    ):
        if k in p:
            out[k] = p[k]
    ucg_training = plain(p.get("ucg_training")) or {}
    if kind == "ddpm":
        if ucg_training:
            raise ConfigError(
                "ucg_training needs a conditional model (LatentDiffusion); DDPM has none."
            )
        return out
    # -- latent diffusion: first stage, cond stage, conditioning route
    first_stage = p.get("first_stage_config")
    if (
        first_stage is None
        or _is(first_stage, FIRST_STAGE_SENTINEL)
        or _is(first_stage, UNCONDITIONAL_SENTINEL)
    ):
        raise ConfigError(
            f"first_stage_config cannot be {first_stage!r}; give the autoencoder's "
            "{target, params} (ldm.models.autoencoder.IdentityFirstStage for pixel space)."
        )
    out["first_stage_config"] = first_stage
    out["clip_denoised"] = False
    out["scale_factor"] = p.get("scale_factor", 1.0)
    out["scale_by_std"] = p.get("scale_by_std", False)
    cond_cfg = p.get("cond_stage_config")
    if "cond_stage_config" not in p:
        raise ConfigError(f"{owner} needs cond_stage_config (or '{UNCONDITIONAL_SENTINEL}').")
    key = p.get("conditioning_key")
    if key is None:  # CompVis backwards compatibility
        key = "concat" if p.get("concat_mode", True) else "crossattn"
    unconditional = _is(cond_cfg, UNCONDITIONAL_SENTINEL)
    if unconditional and not p.get("force_null_conditioning", False):
        key = None
    out["conditioning_key"] = key
    cond_key = p.get("cond_stage_key", "image")
    trainable = bool(p.get("cond_stage_trainable", False))
    if trainable and (_is(cond_cfg, FIRST_STAGE_SENTINEL) or unconditional):
        raise ConfigError(
            f"cond_stage_trainable=True needs a real cond_stage_config, found '{cond_cfg}'."
        )
    for k in ucg_training:
        if k != cond_key:
            raise ConfigError(
                f"ucg_training names '{k}', but the condition is read from cond_stage_key "
                f"'{cond_key}'; caption dropout applies to the conditioning input."
            )
    if key is None or unconditional or p.get("force_null_conditioning", False):
        out["conditioner_config"] = {}
        if unconditional:
            logger.info("Training %s as an unconditional model.", owner)
        return _inpaint(kind, p, out)
    kind_of_input = (
        "text"
        if cond_key in COMPVIS_TEXT_KEYS
        else "class"
        if cond_key in COMPVIS_CLASS_KEYS
        else "image"
    )
    embedder: dict[str, Any] = {
        "input_key": cond_key,
        "input": kind_of_input,
        "is_trainable": trainable,
    }
    if _is(cond_cfg, FIRST_STAGE_SENTINEL):
        embedder["module"] = FIRST_STAGE_SENTINEL
    else:
        embedder["config"] = cond_cfg  # the same object: errors inside name its key path
    if p.get("cond_stage_forward") is not None:
        embedder["forward"] = p["cond_stage_forward"]
    embedder["kind"] = {"adm": "vector", "concat": "concat"}.get(key, "crossattn")
    if cond_key in ucg_training:
        spec = ucg_training[cond_key]
        embedder["ucg_rate"] = float(spec["p"])
        if spec.get("val", None) is not None:
            embedder["null"] = spec["val"]
    elif not trainable:
        embedder["ucg_rate"] = "from_module"  # a frozen cond stage's own ucg_rate (resolved below)
    out["conditioner_config"] = {
        "embedders": [embedder],
        "num_timesteps_cond": p.get("num_timesteps_cond") or 1,
    }
    return _inpaint(kind, p, out)


def _inpaint(kind: str, p: Mapping[str, Any], out: dict[str, Any]) -> dict[str, Any]:
    if kind != "inpaint":
        return out
    if p.get("cond_stage_trainable", False):
        raise ConfigError("LatentInpaintDiffusion supports frozen cond stages only.")
    concat_keys = tuple(p.get("concat_keys", ("mask", "masked_image")))
    masked = p.get("masked_image_key", "masked_image")
    if masked not in concat_keys:
        raise ConfigError(f"masked_image_key '{masked}' must be one of concat_keys {concat_keys}.")
    out["conditioner_config"]["concat"] = {"keys": list(concat_keys), "masked_image_key": masked}
    finetune = p.get("finetune_keys", DEFAULT_FINETUNE_KEYS)
    out["finetune_keys"] = tuple(finetune) if finetune else None
    out["keep_finetune_dims"] = p.get("keep_finetune_dims", 4)
    return out


#: The originals' parameters with their defaults, in their order (positional arguments bind in
#: it); ``None`` for the required configs. The entries from min_snr_gamma on are ours.
DDPM_DEFAULTS: dict[str, Any] = {
    "unet_config": None,
    "timesteps": 1000,
    "beta_schedule": "linear",
    "loss_type": "l2",
    "ckpt_path": None,
    "ignore_keys": (),
    "load_only_unet": False,
    "monitor": "val/loss",
    "use_ema": True,
    "first_stage_key": "image",
    "image_size": 256,
    "channels": 3,
    "log_every_t": 100,
    "clip_denoised": True,
    "linear_start": 1e-4,
    "linear_end": 2e-2,
    "cosine_s": 8e-3,
    "given_betas": None,
    "original_elbo_weight": 0.0,
    "v_posterior": 0.0,
    "l_simple_weight": 1.0,
    "conditioning_key": None,
    "parameterization": "eps",
    "scheduler_config": None,
    "use_positional_encodings": False,
    "learn_logvar": False,
    "logvar_init": 0.0,
    "make_it_fit": False,
    "ucg_training": None,
    "reset_ema": False,
    "reset_num_ema_updates": False,
    "min_snr_gamma": None,
    "snr_weight_floor": None,
    "offset_noise": 0.0,
    "input_perturbation": 0.0,
    "zero_terminal_snr": False,
    "ema_decay": 0.9999,
    "sigma_training": None,
    "sampling_defaults": None,
    # ours: an adapter (LoRA / textual inversion) trained on a frozen base; DreamBooth's weight
    # of the class images' loss (items flagged ``prior``)
    "adapter": None,
    "prior_loss_weight": 1.0,
    "cache_latents": None,  # ours: encode the training images once (ldm.engine.latent_caching)
    "cache_text_embeddings": None,  # ours: frozen text encoders encode each prompt once
    # ours: the optimizer and memory options (docs/optimizers.md)
    "optimizer_config": None,
    "ema_device": None,
    "ema_every": 1,
    "gradient_checkpointing": None,
    "compile": False,
}
LATENT_DEFAULTS: dict[str, Any] = {
    "first_stage_config": None,
    "cond_stage_config": None,
    "num_timesteps_cond": None,
    "cond_stage_key": "image",
    "cond_stage_trainable": False,
    "concat_mode": True,
    "cond_stage_forward": None,
    "scale_factor": 1.0,
    "scale_by_std": False,
    "force_null_conditioning": False,
}
INPAINT_DEFAULTS: dict[str, Any] = {
    "concat_keys": ("mask", "masked_image"),
    "masked_image_key": "masked_image",
    "finetune_keys": DEFAULT_FINETUNE_KEYS,
    "keep_finetune_dims": 4,
    "c_concat_log_start": None,
    "c_concat_log_end": None,
}
DDPM_PARAMS = tuple(DDPM_DEFAULTS)
LATENT_PARAMS = tuple(LATENT_DEFAULTS)
INPAINT_PARAMS = tuple(INPAINT_DEFAULTS)
DEFAULTS = {**DDPM_DEFAULTS, **LATENT_DEFAULTS, **INPAINT_DEFAULTS}
POSITIONAL = {
    "ddpm": DDPM_PARAMS,
    "latent": LATENT_PARAMS[:7] + ("conditioning_key",) + LATENT_PARAMS[7:],
    "inpaint": INPAINT_PARAMS,
}


def _bind(kind: str, args: tuple[Any, ...], params: dict[str, Any]) -> dict[str, Any]:
    """Positional arguments in the originals' order, then keywords."""
    names = POSITIONAL[kind]
    if len(args) > len(names):
        raise TypeError(f"too many positional arguments ({len(args)}); pass keywords")
    for name, value in zip(names, args):
        if name in params:
            raise TypeError(f"got multiple values for argument '{name}'")
        params[name] = value
    return params


def _signature(kind: str) -> inspect.Signature:
    """The originals' keyword signature, so config checks see every accepted name."""
    names = (
        DDPM_PARAMS
        + (LATENT_PARAMS if kind != "ddpm" else ())
        + (INPAINT_PARAMS if kind == "inpaint" else ())
    )
    required = {"unet_config"} | (
        {"first_stage_config", "cond_stage_config"} if kind != "ddpm" else set()
    )
    first = [n for n in POSITIONAL[kind] if n in required]
    rest = [n for n in names if n not in first]
    kw = inspect.Parameter.POSITIONAL_OR_KEYWORD
    params = [inspect.Parameter("self", kw)]
    params += [inspect.Parameter(n, kw) for n in first]
    params += [
        inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=DEFAULTS.get(n)) for n in rest
    ]
    return inspect.Signature(params)


class DDPM(DiffusionEngine):
    """Pixel-space denoising diffusion model trained with L_simple (+ optional VLB term)."""

    _kind = "ddpm"

    def __init__(self, *args: Any, **params: Any) -> None:
        params = _bind(self._kind, args, params)
        DiffusionEngine.__init__(self, **translate(self._kind, params))
        self.use_positional_encodings = False
        self.ucg_training = plain(params.get("ucg_training")) or {}

    @property
    def l_simple_weight(self) -> float:
        return self.loss.l_simple_weight

    @property
    def original_elbo_weight(self) -> float:
        return self.loss.original_elbo_weight

    # -- CompVis DDPM API (diffusion math lives in ldm.diffusion)
    def get_input(self, batch: Mapping[str, Any], k: str) -> torch.Tensor:
        """batch[k] as B x H x W x C -> float B x C x H x W."""
        return self.image_input(batch, k)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """Training loss for a clean batch x [B, C, H, W] (optional noise)."""
        return DiffusionEngine.forward(self, x, None, *args, **kwargs)

    def p_losses(
        self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Unconditional diffusion loss at timesteps t (CompVis DDPM.p_losses)."""
        return self.diffusion_loss(x_start, None, t, noise)

    def get_v(self, x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x_0 (Salimans & Ho 2022)."""
        return v_from_eps_x0(noise, x, t, self.alphas_cumprod_f64)

    def predict_start_from_noise(
        self, x_t: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
    ) -> torch.Tensor:
        """x_0 from (x_t, eps) (DDPM eq. 15)."""
        return predict_x0_from_eps(x_t, t, noise, self.alphas_cumprod_f64)

    def predict_start_from_z_and_v(
        self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """x_0 = sqrt(a) x_t - sqrt(1 - a) v."""
        return x0_from_v(x_t, t, v, self.alphas_cumprod_f64)

    def predict_eps_from_z_and_v(
        self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """eps = sqrt(a) v + sqrt(1 - a) x_t."""
        return eps_from_v(x_t, t, v, self.alphas_cumprod_f64)

    def q_posterior(
        self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance, clipped log-variance of q(x_{t-1} | x_t, x_0) (DDPM eq. 7)."""
        return posterior(x_start, x_t, t, self.alphas_cumprod_f64, self.v_posterior)

    def predict_eps_x0(
        self, model_out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(eps, x_0) implied by the network output in this model's parameterization."""
        return to_eps_x0(model_out, x_t, t, self.alphas_cumprod_f64, self.parameterization)

    def diffusion_row(self, x_start: torch.Tensor, n_row: int) -> list[torch.Tensor]:
        """x_t of the first n_row inputs every log_every_t steps."""
        from ldm.engine.image_logs import diffusion_row

        return diffusion_row(self, x_start, n_row)


class LatentDiffusion(DDPM):
    """LDM (Rombach et al. 2022): frozen first stage, cond stage tau_theta, denoiser on latents."""

    _kind = "latent"

    def __init__(self, *args: Any, **params: Any) -> None:
        params = _bind(self._kind, args, params)
        super().__init__(**params)
        self.cond_stage_key = params.get("cond_stage_key", "image")
        self.cond_stage_trainable = bool(params.get("cond_stage_trainable", False))
        self.concat_mode = params.get("concat_mode", True)
        self.cond_stage_forward = params.get("cond_stage_forward")
        self.force_null_conditioning = bool(params.get("force_null_conditioning", False))
        self.num_timesteps_cond = int(params.get("num_timesteps_cond") or 1)
        self.shorten_cond_schedule = self.num_timesteps_cond > 1
        try:
            ddconfig = params["first_stage_config"]["params"]["ddconfig"]
            self.num_downs = len(ddconfig["ch_mult"]) - 1
        except (KeyError, TypeError):
            self.num_downs = 0
        self.bbox_tokenizer = None

    # -- CompVis LatentDiffusion API
    @torch.no_grad()
    def get_input(  # type: ignore[override]
        self,
        batch: Mapping[str, Any],
        k: str,
        return_first_stage_outputs: bool = False,
        force_c_encode: bool = False,
        cond_key: str | None = None,
        return_original_cond: bool = False,
        bs: int | None = None,
        return_x: bool = False,
    ) -> list[Any]:
        """[z, c] (+ [x, x_rec], + [x], + [xc]) from a CompVis batch dict."""
        if cond_key not in (None, self.cond_stage_key):
            raise ValueError(
                f"cond_key '{cond_key}' differs from cond_stage_key '{self.cond_stage_key}'; "
                "the conditioner reads cond_stage_key."
            )
        z, c, x = self.prepare_batch(batch, bs)
        if force_c_encode and self.conditioner is not None and self.conditioner.trains:
            c = self.conditioner.batch_condition(batch, x, bs, encode=True)
        out: list[Any] = [z, c]
        if return_first_stage_outputs:
            out.extend([x, self.decode_first_stage(z)])
        if return_x:
            out.append(x)
        if return_original_cond:
            xc = self.conditioner.raw_input(batch, x, bs) if self.conditioner is not None else None
            out.append(xc)
        return out

    def p_losses(  # type: ignore[override]
        self, x_start: torch.Tensor, cond: Any, t: torch.Tensor, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """L_LDM at timesteps t (Rombach et al. 2022, eq. 2)."""
        return self.diffusion_loss(x_start, cond, t, noise)

    def forward(self, x: torch.Tensor, c: Any = None, *args: Any, **kwargs: Any) -> Any:
        """Training loss of latents x with condition c."""
        return DiffusionEngine.forward(self, x, c, *args, **kwargs)


class LatentInpaintDiffusion(LatentDiffusion):
    """SD 2.x inpainting: the U-Net sees [z_t, mask, E(masked image)] (4 + 1 + 4 = 9 channels)
    plus cross-attention text. Starting from a 4-channel checkpoint, ``finetune_keys`` name the
    input convolution (and its EMA copy); their extra input channels are zero-initialised."""

    _kind = "inpaint"

    def __init__(self, *args: Any, **params: Any) -> None:
        params = _bind(self._kind, args, params)
        super().__init__(**params)
        self.concat_keys = tuple(params.get("concat_keys", ("mask", "masked_image")))
        self.masked_image_key = params.get("masked_image_key", "masked_image")
        self.c_concat_log_start = params.get("c_concat_log_start")
        self.c_concat_log_end = params.get("c_concat_log_end")

    def concat_conditioning(
        self, batch: Mapping[str, Any], z_shape: Sequence[int] | None = None, bs: int | None = None
    ) -> torch.Tensor:
        """c_concat [B, 1 + C_z, h, w]: mask resized to the latent grid, masked image encoded."""
        return self.conditioner._encode_concat(batch, bs)


DDPM.__init__.__signature__ = _signature("ddpm")  # type: ignore[attr-defined]
LatentDiffusion.__init__.__signature__ = _signature("latent")  # type: ignore[attr-defined]
LatentInpaintDiffusion.__init__.__signature__ = _signature("inpaint")  # type: ignore[attr-defined]
