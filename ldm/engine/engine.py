"""DiffusionEngine: the one LightningModule, composed from its parts (glue only).

    engine = first stage (E, D) + Conditioner + network (U-Net) + Denoiser + DiffusionLoss

- ``network_config``: the U-Net (``{target, params}``), held as ``model.diffusion_model`` so keys
  read as in SD files; ``conditioning_key`` says how conditioning reaches it (``engine/network.py``).
- ``denoiser_config``: the parameterization and the discrete schedule (``parameterization``,
  ``timesteps``, ``beta_schedule``, ``linear_start``, ``linear_end``, ``cosine_s``,
  ``given_betas``, ``zero_terminal_snr``, ``v_posterior``), or ``sigma_training`` (EDM / VE).
- ``conditioner_config``: the embedders (``engine/embedders.py``).
- ``first_stage_config``: the frozen autoencoder (None: pixel space); ``first_stage_fp32`` runs it
  in float32 whatever the sampling precision (SDXL's VAE overflows in fp16).
- ``loss_config``: ``ldm.diffusion.objective.DiffusionLoss`` options plus ``learn_logvar`` /
  ``logvar_init``.
- ``sampling_defaults``: the sampler, steps and guidance ``generate`` uses when given none.
- ``optimizer_config`` (optimizer, per-name param groups, freeze: ``engine/optimization.py``),
  ``ema_device`` / ``ema_every`` (``engine/ema_placement.py``), ``gradient_checkpointing``
  (``engine/memory.py``), ``compile`` (``engine/compilation.py``); see docs/optimizers.md.
- ``cache_latents`` (first-stage encodings of the training images stored once:
  ``engine/latent_caching.py``), ``cache_text_embeddings`` (frozen text encoders memoised by
  prompt: ``engine/text_cache.py``).

The CompVis classes (``ldm.models.diffusion.ddpm``) translate their parameters into these.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import pytorch_lightning as pl
import torch
from einops import rearrange
from torch import nn

from ldm.diffusion import losses
from ldm.diffusion.denoiser import Denoiser, DiscreteDenoiser, SigmaDenoiser
from ldm.diffusion.edm import SigmaTraining
from ldm.diffusion.gaussian import PARAMETERIZATIONS, q_sample
from ldm.diffusion.objective import DiffusionLoss
from ldm.ema import LitEma
from ldm.engine.compilation import compile_network, compile_options
from ldm.engine.compvis_sampling import CompVisSampling
from ldm.engine.conditioner import Conditioner
from ldm.engine.defaults import check_sampling_defaults
from ldm.engine.ema_placement import ema_options, ignore_pinned_ema_in_ddp
from ldm.engine.embedders import build_conditioner
from ldm.engine.first_stage import FirstStageMixin
from ldm.engine.frozen import freeze
from ldm.engine.init_weights import load_into
from ldm.engine.latent_caching import (
    MOMENTS_KEY,
    batch_size_of,
    cache_settings,
    latents_from_cache,
    prepare_latent_cache,
)
from ldm.engine.memory import apply_gradient_checkpointing, checkpointing_options
from ldm.engine.network import DiffusionWrapper, as_cond_dict
from ldm.engine.optimization import apply_freeze, engine_optimizer, without_frozen
from ldm.engine.prior_preservation import PRIOR_KEY, prior_preservation_loss
from ldm.engine.schedule import TrainingSchedule
from ldm.engine.sharding import shard_engine, uses_fsdp2
from ldm.engine.text_cache import enable_text_cache, text_cache_settings
from ldm.optimizers import OptimizerSpec
from ldm.util import ConfigError, DataKeyError, count_params, instantiate_from_config, plain

logger = logging.getLogger(__name__)


def positive_or_none(name: str, value: Any) -> float | None:
    """A loss-weight bound from the config: a positive number, or None (no bound)."""
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not number > 0:
        raise ConfigError(f"{name}={value!r}: expected a positive number or null.")
    return number


def loss_from_config(config: Mapping[str, Any]) -> DiffusionLoss:
    """DiffusionLoss from ``loss_config`` (learn_logvar / logvar_init are the engine's)."""
    cfg = {k: v for k, v in config.items() if k not in ("learn_logvar", "logvar_init")}
    gamma = positive_or_none("min_snr_gamma", cfg.get("min_snr_gamma"))
    floor = positive_or_none("snr_weight_floor", cfg.get("snr_weight_floor"))
    if None not in (gamma, floor) and floor > gamma:
        raise ConfigError(
            f"snr_weight_floor={floor} is above min_snr_gamma={gamma}: the x0-space loss weight "
            "is clamp(SNR, snr_weight_floor, min_snr_gamma)."
        )
    cfg["min_snr_gamma"], cfg["snr_weight_floor"] = gamma, floor
    if cfg.get("loss_type", "l2") not in losses.LOSS_TYPES:
        raise ConfigError(
            f"loss_type={cfg['loss_type']!r}: expected one of {list(losses.LOSS_TYPES)}."
        )
    try:
        return DiffusionLoss(**cfg)
    except TypeError as err:
        raise ConfigError(f"loss_config: {err}") from None


def _rename_embedder_keys(state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """Checkpoints written before several embedders moved to ``conditioner.embedders.N``."""
    old = prefix + "embedder_modules."
    for key in [k for k in state_dict if k.startswith(old)]:
        state_dict[prefix + "conditioner.embedders." + key[len(old) :]] = state_dict.pop(key)


class DiffusionEngine(FirstStageMixin, CompVisSampling, pl.LightningModule):
    """Training (L_LDM), EMA, logging and ``generate`` over the composed parts."""

    def __init__(
        self,
        network_config: Any,
        denoiser_config: Mapping[str, Any] | None = None,
        conditioner_config: Mapping[str, Any] | None = None,
        first_stage_config: Any = None,
        loss_config: Mapping[str, Any] | None = None,
        sampling_defaults: Mapping[str, Any] | None = None,
        conditioning_key: str | None = None,
        scheduler_config: Any = None,
        first_stage_key: str = "image",
        image_size: int | Sequence[int] = 256,
        channels: int = 3,
        scale_factor: float = 1.0,
        scale_by_std: bool = False,
        use_ema: bool = True,
        ema_decay: float = 0.9999,
        monitor: str | None = "val/loss",
        log_every_t: int = 100,
        clip_denoised: bool = False,
        ckpt_path: str | None = None,
        ignore_keys: Sequence[str] = (),
        load_only_unet: bool = False,
        make_it_fit: bool = False,
        reset_ema: bool = False,
        reset_num_ema_updates: bool = False,
        finetune_keys: Sequence[str] | None = None,
        keep_finetune_dims: int = 4,
        first_stage_fp32: bool = False,
        adapter: Mapping[str, Any] | None = None,
        prior_loss_weight: float = 1.0,
        cache_latents: Any = None,
        cache_text_embeddings: Any = None,
        optimizer_config: Mapping[str, Any] | None = None,
        ema_device: str | None = None,
        ema_every: int = 1,
        gradient_checkpointing: Mapping[str, bool] | bool | None = None,
        compile: bool | Mapping[str, Any] = False,
    ) -> None:
        super().__init__()
        # -- memory and optimizer options, checked before anything is built
        self.optimizer_spec = OptimizerSpec.from_config(optimizer_config)
        self.ema_options = ema_options(ema_device, ema_every)
        checkpointing = checkpointing_options(plain(gradient_checkpointing))
        self.compile_options = compile_options(plain(compile))
        denoiser_config = dict(plain(denoiser_config) or {})
        loss_config = dict(plain(loss_config) or {})
        self.sampling_defaults = check_sampling_defaults(plain(sampling_defaults))
        self.first_stage_key = first_stage_key
        self.cache_latents = cache_settings(plain(cache_latents))
        self.image_size = image_size
        self.channels = channels
        self.log_every_t = log_every_t
        self.clip_denoised = clip_denoised
        self.make_it_fit = make_it_fit
        self.finetune_keys = tuple(finetune_keys) if finetune_keys else None
        self.keep_dims = keep_finetune_dims
        if monitor is not None:
            self.monitor = monitor
        self.learning_rate = 1.0e-4  # main.py sets base_learning_rate (times scaling) here
        self.use_scheduler = scheduler_config is not None
        if self.use_scheduler:
            self.scheduler_config = scheduler_config
        # -- denoiser: parameterization + discrete schedule, or sigma preconditioning
        self.parameterization = denoiser_config.pop("parameterization", "eps")
        sigma_training = denoiser_config.pop("sigma_training", None)
        self.sigma_training = SigmaTraining(**plain(sigma_training)) if sigma_training else None
        if self.parameterization not in PARAMETERIZATIONS:
            raise ConfigError(
                f"parameterization={self.parameterization!r}: expected one of "
                f"{list(PARAMETERIZATIONS)} (eps: noise, x0: data, v: Salimans & Ho 2022)."
            )
        logger.info("%s: running in %s-prediction mode", type(self).__name__, self.parameterization)
        try:
            self.training_schedule = TrainingSchedule(**denoiser_config)
        except TypeError as err:
            raise ConfigError(f"denoiser_config: {err}") from None
        if self.training_schedule.zero_terminal_snr and self.parameterization == "eps":
            raise ConfigError(
                "zero_terminal_snr=True makes x_T pure noise, where an eps-prediction cannot "
                "recover x_0 (Lin et al. 2023, Sec. 3.2); use parameterization: v."
            )
        self.v_posterior = self.training_schedule.v_posterior
        self.register_schedule()
        # -- loss
        self.loss = loss_from_config(loss_config)
        self.loss_type = self.loss.loss_type
        self.learn_logvar = bool(loss_config.get("learn_logvar", False))
        logvar = torch.full((self.num_timesteps,), float(loss_config.get("logvar_init", 0.0)))
        if self.learn_logvar:
            self.logvar = nn.Parameter(logvar, requires_grad=True)
        else:
            self.register_buffer("logvar", logvar, persistent=False)
        # -- network, EMA
        self.model = DiffusionWrapper(network_config, conditioning_key)
        count_params(self.model, verbose=True)
        self.use_ema = use_ema
        if self.use_ema:
            self.model_ema = LitEma(self.model, decay=ema_decay, **self.ema_options)
            logger.info("Keeping EMAs of %d parameters.", len(self.model_ema.m_name2s_name))
        # -- first stage (frozen) and conditioner
        self.scale_by_std = scale_by_std
        if not scale_by_std:
            self.scale_factor = scale_factor
        else:
            self.register_buffer("scale_factor", torch.tensor(float(scale_factor)))
        self.first_stage_fp32 = bool(first_stage_fp32)  # SDXL: the VAE overflows in fp16
        self.first_stage_model = (
            freeze(instantiate_from_config(first_stage_config))
            if first_stage_config is not None
            else None
        )
        self.cond_stage_model: nn.Module | None = None
        self.conditioner: Conditioner | None = build_conditioner(
            self, plain(conditioner_config) or {}
        )
        self._register_load_state_dict_pre_hook(_rename_embedder_keys)
        # -- weights
        if reset_ema and ckpt_path is None:
            raise ConfigError("reset_ema=True needs ckpt_path (the EMA to reset comes from it).")
        self.restarted_from_ckpt = ckpt_path is not None
        self._restore(ckpt_path, list(ignore_keys or ()), load_only_unet, reset_ema)
        if reset_num_ema_updates:
            if not self.use_ema:
                raise ConfigError("reset_num_ema_updates=True needs use_ema=True.")
            logger.info("Resetting the number of EMA updates to 0.")
            self.model_ema.reset_num_updates()
        # -- adapters (LoRA, textual inversion): only their weights train; DreamBooth's prior loss
        self.prior_loss_weight = float(prior_loss_weight)
        self.adapter: Any = None
        self.adapter_config = dict(plain(adapter) or {})
        if self.adapter_config:
            self._setup_adapter()
        # -- what trains, activation recomputation, compilation (docs/optimizers.md)
        apply_freeze(self, self.optimizer_spec)
        ignore_pinned_ema_in_ddp(self)
        apply_gradient_checkpointing(self, checkpointing)
        compile_network(self.model.diffusion_model, self.compile_options)
        # -- frozen text encoders: each distinct prompt encoded once (after any freezing)
        text_cache = text_cache_settings(plain(cache_text_embeddings))
        self.text_memos = enable_text_cache(self, text_cache) if text_cache else []

    # ------------------------------------------------------------------ construction helpers
    def register_schedule(self) -> None:
        """Register the CompVis schedule buffers (DDPM eq. 4, 6, 7) and the VLB weights."""
        self.training_schedule.register(self)
        self.num_timesteps = self.training_schedule.num_timesteps
        self.linear_start, self.linear_end = (
            self.training_schedule.linear_start,
            self.training_schedule.linear_end,
        )
        self._ac64 = self.training_schedule.alphas_cumprod.clone()
        self._ac64_key: tuple[int, int] | None = None
        weights = losses.lvlb_weights(
            self.training_schedule.betas, self._ac64, self.posterior_variance, self.parameterization
        )
        self.register_buffer("lvlb_weights", weights, persistent=False)

    @property
    def alphas_cumprod_f64(self) -> torch.Tensor:
        """alpha_bar [T] in float64 on CPU, following the `alphas_cumprod` buffer (e.g. after a
        checkpoint with another schedule was loaded into it)."""
        buf = self.alphas_cumprod
        key = (buf.data_ptr(), buf._version)
        if key != self._ac64_key:
            if buf.device.type != "meta":
                stored = buf.detach().to("cpu", torch.float64)
                if not torch.equal(stored.float(), self._ac64.float()):
                    self._ac64 = stored
            self._ac64_key = key
        return self._ac64

    @property
    def denoiser(self) -> Denoiser:
        """D(x; sigma) of this model, shared by the loss and every solver (ldm.diffusion.denoiser)."""
        st = self.sigma_training
        source = st if st is not None else self.alphas_cumprod_f64  # what it is built on
        cached = self.__dict__.get("_denoiser")  # (source, parameterization, denoiser)
        if cached is None or cached[0] is not source or cached[1] != self.parameterization:
            if self.sigma_training is not None:
                made: Denoiser = SigmaDenoiser(self.sigma_training)
            else:
                made = DiscreteDenoiser(source, self.parameterization)
            cached = (source, self.parameterization, made)
            self.__dict__["_denoiser"] = cached  # rebuilt only when the schedule changes
        return cached[2]

    @property
    def latent_space(self) -> bool:
        return self.first_stage_model is not None

    def _restore(
        self, ckpt_path: str | None, ignore_keys: Sequence[str], only_model: bool, reset_ema: bool
    ) -> None:
        self._ema_from_file = False
        if ckpt_path is None:
            return
        missing, _ = self.init_from_ckpt(ckpt_path, ignore_keys=ignore_keys, only_model=only_model)
        no_ema_in_file = any(k.startswith("model_ema.") for k in missing) and not only_model
        self._ema_from_file = self.use_ema and not no_ema_in_file and not only_model
        if self.use_ema and no_ema_in_file and not reset_ema:
            logger.warning(
                "%s has no (complete) EMA weights: starting the EMA from the loaded weights.",
                ckpt_path,
            )
            self.model_ema = LitEma(
                self.model, decay=float(self.model_ema.decay), **self.ema_options
            )
        if reset_ema:
            if not self.use_ema:
                raise ConfigError("reset_ema=True needs use_ema=True.")
            logger.info("Resetting EMA to the pure model weights of %s.", ckpt_path)
            self.model_ema = LitEma(
                self.model, decay=float(self.model_ema.decay), **self.ema_options
            )

    def init_from_ckpt(
        self, path: str, ignore_keys: Sequence[str] = (), only_model: bool = False
    ) -> tuple[list[str], list[str]]:
        """Load weights from a .ckpt / .safetensors file non-strictly (CompVis semantics);
        ``finetune_keys`` are widened with zero-initialised extra input channels."""
        return load_into(
            self,
            path,
            ignore_keys,
            only_model,
            fit=self.make_it_fit,
            finetune_keys=self.finetune_keys,
            keep_dims=self.keep_dims,
        )

    def _setup_adapter(self) -> None:
        """Freeze the model, add the adapter; the EMA then follows only the adapter's weights."""
        from ldm.adapters.training import build_adapter

        cfg = self.adapter_config
        if cfg.get("base_weights", "ema") == "ema" and self._ema_from_file:
            logger.info("Adapter: the base weights are the checkpoint's EMA weights.")
            self.model_ema.copy_to(self.model)  # the adapter sits on what the base samples with
        self.adapter = build_adapter(self, cfg)
        if self.conditioner is not None:  # encode with gradients only when text weights train
            te_params = {id(p) for p in self.adapter.trainable_parameters()}
            own = self.cond_stage_model if self.cond_stage_model is not None else self.conditioner
            self.conditioner.trains = any(
                id(p) in te_params for p in (own.parameters() if own is not None else [])
            )
        if self.use_ema:
            self.model_ema = LitEma(
                self.model, decay=float(self.model_ema.decay), **self.ema_options
            )

    # ------------------------------------------------------------------ EMA
    @contextmanager
    def ema_scope(self, context: str | None = None) -> Iterator[None]:
        """Temporarily swap in the EMA weights (no-op without use_ema)."""
        if self.use_ema:
            self.model_ema.store(self.model.parameters())
            self.model_ema.copy_to(self.model)
            if context is not None:
                logger.info("%s: switched to EMA weights", context)
        try:
            yield None
        finally:
            if self.use_ema:
                self.model_ema.restore(self.model.parameters())
                if context is not None:
                    logger.info("%s: restored training weights", context)

    def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
        """Adapter upkeep (textual inversion restores the other tokens), then the EMA update."""
        if self.adapter is not None:
            self.adapter.after_step()
        if self.use_ema:  # every ema_every optimizer steps (the trainer's count when there is one)
            step = self.global_step if self._trainer is not None else None
            self.model_ema.after_step(self.model, step)

    # ------------------------------------------------------------------ the network
    def apply_model(self, x_noisy: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
        """Network output for x_t at timesteps t [B] with conditioning (tensor, list or dict)."""
        if self.model.conditioning_key is None:
            return self.model(x_noisy, t)
        return self.model(x_noisy, t, **as_cond_dict(cond, self.model.conditioning_key))

    def q_sample(
        self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x_t ~ q(x_t | x_0) (DDPM eq. 4)."""
        noise = torch.randn_like(x_start) if noise is None else noise
        return q_sample(x_start, t, noise, self.alphas_cumprod_f64)

    # ------------------------------------------------------------------ batches and loss
    def image_input(self, batch: Mapping[str, Any], k: str) -> torch.Tensor:
        """batch[k] as B x H x W x C in [-1, 1] -> float B x C x H x W (CompVis data convention)."""
        if k not in batch and k == self.first_stage_key and MOMENTS_KEY in batch:
            return self.images_from_cache(batch)
        if k not in batch:
            which = "first_stage_key" if k == self.first_stage_key else "cond_stage_key"
            raise DataKeyError(
                f"model.params.{which}: the batch has no key '{k}' (keys: {sorted(batch)}); set "
                f"model.params.{which} to the key your data set yields (or the data set's "
                "image_key / caption_key to this one)."
            )
        x = batch[k]
        if not isinstance(x, torch.Tensor):
            x = torch.as_tensor(x)
        if x.ndim == 3:
            x = x[..., None]
        x = rearrange(x, "b h w c -> b c h w")
        return x.to(memory_format=torch.contiguous_format).float()

    @torch.no_grad()
    def prepare_batch(
        self, batch: Mapping[str, Any], bs: int | None = None
    ) -> tuple[torch.Tensor, Any, torch.Tensor]:
        """(z, c, x): latents of the images, their conditioning (raw when the conditioner trains:
        it is encoded with gradients in ``forward``), the images."""
        if MOMENTS_KEY in batch:  # cache_latents: z drawn from the stored posterior
            x = None
            z = latents_from_cache(self, batch[MOMENTS_KEY][:bs]).detach()
        else:
            x = self.image_input(batch, self.first_stage_key)
            if bs is not None:
                x = x[:bs]
            x = x.to(self.device)
            z = self.get_first_stage_encoding(self.encode_first_stage(x)).detach()
        c = None
        if self.conditioner is not None:
            c = self.conditioner.batch_condition(batch, x, bs, encode=not self.conditioner.trains)
        return z, c, x

    @torch.no_grad()
    def images_from_cache(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """The images of a cached batch, decoded from the stored posterior means (image logs)."""
        stored = batch[MOMENTS_KEY].to(self.device, torch.float32)
        if stored.shape[1] == 2 * int(getattr(self.first_stage_model, "embed_dim", -1)):
            stored = stored.chunk(2, dim=1)[0]
        return self.decode_first_stage(self.scale_factor * stored).float().cpu()

    def configure_model(self) -> None:
        """Under ``strategy: fsdp2``: shard the U-Net (and a training text encoder) and the EMA."""
        if uses_fsdp2(self):
            shard_engine(self)

    def on_fit_start(self) -> None:
        """cache_latents: fill the training set's latent cache and switch it to cached items."""
        if self.cache_latents is not None:
            prepare_latent_cache(self, self.trainer)

    def sample_timesteps(self, batch_size: int) -> torch.Tensor:
        """t ~ U{0, ..., T-1} [B]."""
        return torch.randint(0, self.num_timesteps, (batch_size,), device=self.device).long()

    def diffusion_loss(
        self, x_start: torch.Tensor, cond: Any, t: torch.Tensor, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """L = l_simple_weight * mean(w_t L_simple / e^logvar_t + logvar_t) + elbo_weight * L_vlb."""
        return self.loss.discrete(
            lambda x, tt: self.apply_model(x, tt, cond),
            self.denoiser,
            x_start,
            t,
            self.alphas_cumprod_f64,
            self.logvar,
            self.lvlb_weights,
            noise,
            "train" if self.training else "val",
            self.learn_logvar,
        )

    def sigma_loss(
        self, x_start: torch.Tensor, cond: Any
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """EDM / VE denoiser loss lambda(sigma) ||D(x + sigma n, sigma) - x||^2 (Karras et al. 2022)."""
        return self.loss.sigma(
            lambda x, c_noise: self.apply_model(x, c_noise, cond),
            self.denoiser,
            x_start,
            "train" if self.training else "val",
        )

    def forward(self, x: torch.Tensor, c: Any = None, *args: Any, **kwargs: Any) -> Any:
        """Training loss of latents x: encode a trainable condition, diffuse a shortened one, L_LDM."""
        if self.conditioner is not None:
            if c is None:
                raise ValueError("conditional model called without conditioning c.")
            if self.conditioner.trains:
                c = self.conditioner.encode_raw(c)
        if self.sigma_training is not None:
            return self.sigma_loss(x, c)
        t = self.sample_timesteps(x.shape[0])
        if self.conditioner is not None:
            c = self.conditioner.diffuse(self, c, t)
        return self.diffusion_loss(x, c, t, *args, **kwargs)

    def shared_step(self, batch: Mapping[str, Any], **kwargs: Any) -> Any:
        """Loss of one batch (DreamBooth batches: instance loss + prior_loss_weight * class loss)."""
        if PRIOR_KEY in batch:
            prefix = "train" if self.training else "val"
            return prior_preservation_loss(batch, self._plain_step, self.prior_loss_weight, prefix)
        return self._plain_step(batch)

    def _plain_step(self, batch: Mapping[str, Any]) -> Any:
        z, c, _ = self.prepare_batch(batch)
        return self(z, c)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Conditioning dropout (per embedder), loss, logging of loss / global step / lr."""
        if self.conditioner is not None:
            self.conditioner.drop(batch)  # caption dropout for classifier-free guidance
        loss, loss_dict = self.shared_step(batch)
        if self._trainer is None:  # called outside a Trainer (scripts, tests): nothing to log to
            return loss
        bs = batch_size_of(batch, self.first_stage_key)
        self.log_dict(
            loss_dict, prog_bar=True, logger=True, on_step=True, on_epoch=True, batch_size=bs
        )
        self.log(
            "global_step",
            float(self.global_step),
            prog_bar=True,
            logger=True,
            on_step=True,
            on_epoch=False,
            batch_size=bs,
        )
        if self.use_scheduler:
            lr = self.optimizers().param_groups[0]["lr"]
            self.log("lr_abs", lr, prog_bar=True, on_step=True, on_epoch=False, batch_size=bs)
        return loss

    @torch.no_grad()
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """val/* with training weights and val/*_ema with EMA weights, on the same t and noise."""
        seed = int(batch_idx) + 1000 * int(getattr(self, "current_epoch", 0) or 0)
        with self._seeded(seed):
            _, loss_dict_no_ema = self.shared_step(batch)
        with self.ema_scope(), self._seeded(seed):
            _, loss_dict_ema = self.shared_step(batch)
        loss_dict_ema = {key + "_ema": value for key, value in loss_dict_ema.items()}
        bs = batch_size_of(batch, self.first_stage_key)
        for logged in (loss_dict_no_ema, loss_dict_ema):
            self.log_dict(logged, on_step=False, on_epoch=True, batch_size=bs)

    @contextmanager
    def _seeded(self, seed: int) -> Iterator[None]:
        """Fixed t and noise inside, global RNG state untouched outside (accelerator too)."""
        kind = self.device.type
        if kind in ("cpu", "meta"):
            fork = torch.random.fork_rng(devices=[])
        else:
            fork = torch.random.fork_rng(devices=[self.device], device_type=kind)
        with fork:
            torch.manual_seed(seed)
            yield

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The network, trainable embedders, logvar when learned (with an adapter: its weights)."""
        if self.adapter is not None:
            params = list(self.adapter.trainable_parameters())
            return without_frozen(self, params + ([self.logvar] if self.learn_logvar else []))
        params = list(self.model.parameters())
        if self.conditioner is not None and self.conditioner.trains:
            logger.info("%s: also optimizing conditioner params!", type(self).__name__)
            params += self.conditioner.trainable_parameters()
        if self.learn_logvar:
            params.append(self.logvar)
        return without_frozen(self, params)  # optimizer_config.freeze

    def configure_optimizers(self) -> Any:
        """The optimizer of ``optimizer_config`` (default: AdamW) at lr = self.learning_rate and,
        with scheduler_config, a per-step LambdaLR (scaling every param group's lr)."""
        opt = engine_optimizer(self)
        if not self.use_scheduler:
            return opt
        scheduler = instantiate_from_config(self.scheduler_config)
        logger.info("Setting up LambdaLR scheduler...")
        lr_sched = {
            "scheduler": torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda=scheduler.schedule),
            "interval": "step",
            "frequency": 1,
        }
        return [opt], [lr_sched]

    # ------------------------------------------------------------------ generation
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of samples."""
        size = self.image_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return (self.channels, int(h), int(w))

    def generate(self, prompt: Any = None, **kwargs: Any) -> Any:
        """Images for prompts (or a batch, or a conditioning); see :func:`ldm.engine.generate.generate`."""
        from ldm.engine.generate import generate

        return generate(self, prompt, **kwargs)

    @torch.no_grad()
    def log_images(self, batch: Mapping[str, Any], **kwargs: Any) -> dict[str, torch.Tensor]:
        """Image rows for ImageLogger, every sample made by ``generate``; see ``engine/image_logs.py``."""
        from ldm.engine.image_logs import log_images

        return log_images(self, batch, **kwargs)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record the sampling defaults (sampler, steps, guidance) with the weights; with an
        adapter keep only its weights (the base comes from ``ckpt_path``) and export its file."""
        if self.sampling_defaults:
            checkpoint["sampling_defaults"] = dict(self.sampling_defaults)
        if self.adapter is not None:
            from ldm.adapters.checkpointing import adapter_only, export_adapter

            checkpoint["state_dict"] = adapter_only(self, checkpoint["state_dict"])
            checkpoint["adapter"] = dict(self.adapter_config)
            export_adapter(self)

    def on_train_end(self) -> None:
        if self.adapter is not None:
            from ldm.adapters.checkpointing import export_adapter

            export_adapter(self)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if checkpoint.get("adapter") is not None:
            from ldm.adapters.checkpointing import fill_base

            fill_base(self, checkpoint)
        if checkpoint.get("sampling_defaults"):
            self.sampling_defaults = check_sampling_defaults(checkpoint["sampling_defaults"])
