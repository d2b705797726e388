"""DDPM training module (Ho et al. 2020), config-compatible with CompVis / Stability `ddpm.DDPM`.

The LightningModule is glue: the forward process and conversions come from `ldm.diffusion`,
the loss pieces from `losses.py`, conditioning routing from `conditioning.py`, sampling from
`ldm.samplers.sample`. `LatentDiffusion` / `LatentInpaintDiffusion` live in `latent.py` /
`inpaint.py` and are re-exported here, so the original target paths
(`ldm.models.diffusion.ddpm.LatentDiffusion`) keep working.
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

from ldm.diffusion import make_beta_schedule, q_sample, rescale_zero_terminal_snr, snr
from ldm.diffusion.gaussian import (
    eps_from_v,
    posterior,
    predict_x0_from_eps,
    to_eps_x0,
    v_from_eps_x0,
    x0_from_v,
)
from ldm.ema import LitEma
from ldm.models.diffusion import losses
from ldm.models.diffusion.checkpoint_io import load_into
from ldm.models.diffusion.conditioning import DiffusionWrapper, as_cond_dict
from ldm.models.diffusion.schedule_buffers import register_schedule_buffers
from ldm.optim import adamw
from ldm.util import ConfigError, count_params, instantiate_from_config

logger = logging.getLogger(__name__)

__all__ = [  # noqa: F822 - the latent models are lazy module attributes (see __getattr__)
    "DDPM",
    "DiffusionWrapper",
    "LatentDiffusion",
    "LatentInpaintDiffusion",
    "disabled_train",
]


def disabled_train(self: nn.Module, mode: bool = True) -> nn.Module:
    """Replacement for `.train()` on frozen sub-models so they stay in eval mode (CompVis)."""
    return self


def _positive_or_none(name: str, value: Any) -> float | None:
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


def _plain(value: Any) -> Any:
    """OmegaConf containers -> plain dict / list (other values unchanged)."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(value, DictConfig | ListConfig):
            return OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return value


class DDPM(pl.LightningModule):
    """Pixel-space denoising diffusion model trained with L_simple (+ optional VLB term)."""

    latent_space = False
    conditioner: Any = None

    def __init__(
        self,
        unet_config: Any,
        timesteps: int = 1000,
        beta_schedule: str = "linear",
        loss_type: str = "l2",
        ckpt_path: str | None = None,
        ignore_keys: Sequence[str] = (),
        load_only_unet: bool = False,
        monitor: str | None = "val/loss",
        use_ema: bool = True,
        first_stage_key: str = "image",
        image_size: int | Sequence[int] = 256,
        channels: int = 3,
        log_every_t: int = 100,
        clip_denoised: bool = True,
        linear_start: float = 1e-4,
        linear_end: float = 2e-2,
        cosine_s: float = 8e-3,
        given_betas: Sequence[float] | None = None,
        original_elbo_weight: float = 0.0,
        v_posterior: float = 0.0,
        l_simple_weight: float = 1.0,
        conditioning_key: str | None = None,
        parameterization: str = "eps",
        scheduler_config: Any = None,
        use_positional_encodings: bool = False,
        learn_logvar: bool = False,
        logvar_init: float = 0.0,
        make_it_fit: bool = False,
        ucg_training: Mapping[str, Any] | None = None,
        reset_ema: bool = False,
        reset_num_ema_updates: bool = False,
        # ours, beyond the originals
        min_snr_gamma: float | None = None,
        snr_weight_floor: float | None = None,
        offset_noise: float = 0.0,
        input_perturbation: float = 0.0,
        zero_terminal_snr: bool = False,
        ema_decay: float = 0.9999,
        sigma_training: Mapping[str, Any] | None = None,
        sampling_defaults: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        from ldm.engine.defaults import check_sampling_defaults

        self.sampling_defaults = check_sampling_defaults(_plain(sampling_defaults))
        if parameterization not in losses.PARAMETERIZATIONS:
            raise ConfigError(
                f"parameterization={parameterization!r}: expected one of "
                f"{list(losses.PARAMETERIZATIONS)} (eps: noise, x0: data, v: Salimans & Ho 2022)."
            )
        if loss_type not in losses.LOSS_TYPES:
            raise ConfigError(
                f"loss_type={loss_type!r}: expected one of {list(losses.LOSS_TYPES)}."
            )
        if use_positional_encodings:
            raise ConfigError(
                "use_positional_encodings=True (CompVis layout models) is not supported: its "
                "latent-shift computation was never published. Set it to false."
            )
        if zero_terminal_snr and parameterization == "eps":
            raise ConfigError(
                "zero_terminal_snr=True makes x_T pure noise, where an eps-prediction cannot "
                "recover x_0 (Lin et al. 2023, Sec. 3.2); use parameterization: v."
            )
        self.parameterization = parameterization
        logger.info("%s: running in %s-prediction mode", type(self).__name__, parameterization)
        self.cond_stage_model: nn.Module | None = None
        self.clip_denoised = clip_denoised
        self.log_every_t = log_every_t
        self.first_stage_key = first_stage_key
        self.image_size = image_size
        self.channels = channels
        self.use_positional_encodings = use_positional_encodings
        self.model = DiffusionWrapper(unet_config, conditioning_key)
        count_params(self.model, verbose=True)
        self.use_ema = use_ema
        if self.use_ema:
            self.model_ema = LitEma(self.model, decay=ema_decay)
            logger.info("Keeping EMAs of %d parameters.", len(self.model_ema.m_name2s_name))
        self.use_scheduler = scheduler_config is not None
        if self.use_scheduler:
            self.scheduler_config = scheduler_config
        self.v_posterior = v_posterior
        self.original_elbo_weight = original_elbo_weight
        self.l_simple_weight = l_simple_weight
        min_snr_gamma = _positive_or_none("min_snr_gamma", min_snr_gamma)
        snr_weight_floor = _positive_or_none("snr_weight_floor", snr_weight_floor)
        if None not in (min_snr_gamma, snr_weight_floor) and snr_weight_floor > min_snr_gamma:
            raise ConfigError(
                f"snr_weight_floor={snr_weight_floor} is above min_snr_gamma={min_snr_gamma}: the "
                "x0-space loss weight is clamp(SNR, snr_weight_floor, min_snr_gamma)."
            )
        self.min_snr_gamma = min_snr_gamma
        self.snr_weight_floor = snr_weight_floor
        self.offset_noise = offset_noise
        self.input_perturbation = input_perturbation
        self.zero_terminal_snr = zero_terminal_snr
        self.sigma_training = None
        if sigma_training is not None:
            from ldm.diffusion.edm import SigmaTraining

            self.sigma_training = SigmaTraining(**_plain(sigma_training))
        if monitor is not None:
            self.monitor = monitor
        self.make_it_fit = make_it_fit
        self.learning_rate = 1.0e-4  # main.py sets base_learning_rate (times scaling) here
        self.register_schedule(
            given_betas=given_betas,
            beta_schedule=beta_schedule,
            timesteps=timesteps,
            linear_start=linear_start,
            linear_end=linear_end,
            cosine_s=cosine_s,
        )
        self.loss_type = loss_type
        self.learn_logvar = learn_logvar
        logvar = torch.full((self.num_timesteps,), float(logvar_init))
        if self.learn_logvar:
            self.logvar = nn.Parameter(logvar, requires_grad=True)
        else:
            self.register_buffer("logvar", logvar, persistent=False)
        self.ucg_training = _plain(ucg_training) or {}
        if self.ucg_training and type(self) is DDPM:
            raise ConfigError("ucg_training needs a conditional model (LatentDiffusion); DDPM has none.")
        if reset_ema and ckpt_path is None:
            raise ConfigError("reset_ema=True needs ckpt_path (the EMA to reset comes from it).")
        # LatentDiffusion loads its checkpoint after building the first / cond stages
        self._ckpt_args = (ckpt_path, list(ignore_keys or ()), load_only_unet)
        self._reset_ema, self._reset_num_ema_updates = reset_ema, reset_num_ema_updates
        if type(self) is DDPM:
            self._restore(ckpt_path, ignore_keys, load_only_unet)

    # ------------------------------------------------------------------ construction helpers
    def register_schedule(
        self,
        given_betas: Sequence[float] | None = None,
        beta_schedule: str = "linear",
        timesteps: int = 1000,
        linear_start: float = 1e-4,
        linear_end: float = 2e-2,
        cosine_s: float = 8e-3,
    ) -> None:
        """Build betas (float64) and register the CompVis schedule buffers (DDPM eq. 4, 6, 7)."""
        with torch.device("cpu"):  # schedule math on CPU even inside `with torch.device("meta")`
            betas = make_beta_schedule(
                beta_schedule,
                timesteps,
                linear_start=linear_start,
                linear_end=linear_end,
                cosine_s=cosine_s,
                given_betas=_plain(given_betas),
            )
            if self.zero_terminal_snr:
                betas = rescale_zero_terminal_snr(betas)
        self.num_timesteps = int(betas.shape[0])
        self.linear_start, self.linear_end = linear_start, linear_end
        register_schedule_buffers(self, betas, self.v_posterior)
        # float64 copy on CPU for ldm.diffusion math (not a buffer: MPS has no float64)
        self._ac64 = torch.cumprod(1.0 - betas.to(torch.float64), dim=0)
        self._ac64_key: tuple[int, int] | None = None
        weights = losses.lvlb_weights(
            betas, self._ac64, self.posterior_variance, self.parameterization
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

    def _restore(self, ckpt_path: str | None, ignore_keys: Sequence[str], only_model: bool) -> None:
        if ckpt_path is not None:
            missing, _ = self.init_from_ckpt(
                ckpt_path, ignore_keys=ignore_keys, only_model=only_model
            )
            no_ema_in_file = any(k.startswith("model_ema.") for k in missing) and not only_model
            if self.use_ema and no_ema_in_file and not self._reset_ema:
                logger.warning(
                    "%s has no (complete) EMA weights: starting the EMA from the loaded weights.",
                    ckpt_path,
                )
                self.model_ema = LitEma(self.model, decay=float(self.model_ema.decay))
            if self._reset_ema:
                if not self.use_ema:
                    raise ConfigError("reset_ema=True needs use_ema=True.")
                logger.info("Resetting EMA to the pure model weights of %s.", ckpt_path)
                self.model_ema = LitEma(self.model, decay=float(self.model_ema.decay))
        if self._reset_num_ema_updates:
            if not self.use_ema:
                raise ConfigError("reset_num_ema_updates=True needs use_ema=True.")
            logger.info("Resetting the number of EMA updates to 0.")
            self.model_ema.reset_num_updates()

    def init_from_ckpt(
        self, path: str, ignore_keys: Sequence[str] = (), only_model: bool = False
    ) -> tuple[list[str], list[str]]:
        """Load weights from a .ckpt / .safetensors file non-strictly (CompVis semantics)."""
        return load_into(self, path, ignore_keys, only_model, fit=self.make_it_fit)

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
        """EMA update after every training batch (CompVis)."""
        if self.use_ema:
            self.model_ema(self.model)

    # ------------------------------------------------------------------ diffusion pieces
    def q_sample(
        self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x_t ~ q(x_t | x_0) (DDPM eq. 4)."""
        noise = torch.randn_like(x_start) if noise is None else noise
        return q_sample(x_start, t, noise, self.alphas_cumprod_f64)

    def get_v(self, x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x_0 (Salimans & Ho 2022)."""
        return v_from_eps_x0(noise, x, t, self.alphas_cumprod_f64)

    def predict_start_from_noise(
        self, x_t: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
    ) -> torch.Tensor:
        """x_0 from (x_t, eps) (DDPM eq. 15; CompVis name)."""
        return predict_x0_from_eps(x_t, t, noise, self.alphas_cumprod_f64)

    def predict_start_from_z_and_v(
        self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """x_0 = sqrt(a) x_t - sqrt(1 - a) v (Salimans & Ho 2022; CompVis name)."""
        return x0_from_v(x_t, t, v, self.alphas_cumprod_f64)

    def predict_eps_from_z_and_v(
        self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """eps = sqrt(a) v + sqrt(1 - a) x_t (Salimans & Ho 2022; CompVis name)."""
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

    def apply_model(self, x_noisy: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
        """Network output for x_t at timesteps t [B] with conditioning (tensor, list or dict)."""
        if self.model.conditioning_key is None:
            return self.model(x_noisy, t)
        return self.model(x_noisy, t, **as_cond_dict(cond, self.model.conditioning_key))

    def _target(self, x_start: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.parameterization == "eps":
            return noise
        if self.parameterization == "x0":
            return x_start
        return self.get_v(x_start, noise, t)

    def diffusion_loss(
        self,
        x_start: torch.Tensor,
        cond: Any,
        t: torch.Tensor,
        noise: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """L = l_simple_weight * mean(w_t L_simple / e^logvar_t + logvar_t) + elbo_weight * L_vlb."""
        prefix = "train" if self.training else "val"
        noise = torch.randn_like(x_start) if noise is None else noise
        noise = losses.offset_noise(noise, self.offset_noise)
        x_noisy = self.q_sample(x_start, t, losses.perturb_noise(noise, self.input_perturbation))
        model_output = self.apply_model(x_noisy, t, cond)
        target = self._target(x_start, noise, t)
        reduce_dims = list(range(1, x_start.ndim))
        loss_simple = losses.elementwise_loss(model_output, target, self.loss_type)
        loss_simple = loss_simple.mean(dim=reduce_dims)  # [B]
        loss_dict = {f"{prefix}/loss_simple": loss_simple.mean()}
        weighted = loss_simple
        if self.min_snr_gamma is not None or self.snr_weight_floor is not None:
            snr_t = snr(t, self.alphas_cumprod_f64).to(loss_simple)
            weighted = loss_simple * losses.min_snr_weights(
                snr_t, self.min_snr_gamma, self.parameterization, self.snr_weight_floor
            )
        logvar_t = self.logvar[t.to(self.logvar.device)].to(loss_simple)
        loss = weighted / torch.exp(logvar_t) + logvar_t
        if self.learn_logvar:
            loss_dict[f"{prefix}/loss_gamma"] = loss.mean()
            loss_dict["logvar"] = self.logvar.data.mean()
        loss = self.l_simple_weight * loss.mean()
        loss_vlb = (self.lvlb_weights[t] * loss_simple).mean()
        loss_dict[f"{prefix}/loss_vlb"] = loss_vlb
        loss = loss + self.original_elbo_weight * loss_vlb
        loss_dict[f"{prefix}/loss"] = loss
        return loss, loss_dict

    def sigma_loss(
        self, x_start: torch.Tensor, cond: Any
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """EDM / VE denoiser loss lambda(sigma) ||D(x + sigma n, sigma) - x||^2 (Karras et al. 2022)."""
        prefix = "train" if self.training else "val"

        def net(x: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
            return self.apply_model(x, c_noise, cond)

        loss = self.sigma_training.loss(net, x_start, loss_type=self.loss_type)  # [B]
        out = self.l_simple_weight * loss.mean()
        return out, {f"{prefix}/loss_simple": loss.mean(), f"{prefix}/loss": out}

    def p_losses(
        self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Unconditional diffusion loss at timesteps t (CompVis DDPM.p_losses)."""
        return self.diffusion_loss(x_start, None, t, noise)

    def sample_timesteps(self, batch_size: int) -> torch.Tensor:
        """t ~ U{0, ..., T-1} [B]."""
        return torch.randint(0, self.num_timesteps, (batch_size,), device=self.device).long()

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """Training loss for a clean batch x [B, C, H, W]."""
        if self.sigma_training is not None:
            return self.sigma_loss(x, None)
        return self.p_losses(x, self.sample_timesteps(x.shape[0]), *args, **kwargs)

    # ------------------------------------------------------------------ Lightning glue
    def get_input(self, batch: Mapping[str, Any], k: str) -> torch.Tensor:
        """batch[k] as B x H x W x C in [-1, 1] -> float B x C x H x W (CompVis data convention)."""
        if k not in batch:
            raise KeyError(
                f"batch has no key '{k}' (keys: {sorted(batch)}); set first_stage_key / "
                "cond_stage_key to the key your data set yields."
            )
        x = batch[k]
        if not isinstance(x, torch.Tensor):
            x = torch.as_tensor(x)
        if x.ndim == 3:
            x = x[..., None]
        x = rearrange(x, "b h w c -> b c h w")
        return x.to(memory_format=torch.contiguous_format).float()

    def shared_step(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss of one batch."""
        x = self.get_input(batch, self.first_stage_key)
        return self(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Conditioning dropout (ucg_training), loss, logging of loss / global step / lr."""
        if self.conditioner is not None:
            self.conditioner.drop(batch)  # caption dropout for classifier-free guidance
        loss, loss_dict = self.shared_step(batch)
        if self._trainer is None:  # called outside a Trainer (scripts, tests): nothing to log to
            return loss
        bs = len(batch[self.first_stage_key])
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
        bs = len(batch[self.first_stage_key])
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
        """Parameters the optimizer updates: the denoiser and, when learned, logvar."""
        params = list(self.model.parameters())
        if self.learn_logvar:
            params.append(self.logvar)
        return params

    def configure_optimizers(self) -> Any:
        """AdamW(lr = self.learning_rate) and, with scheduler_config, a per-step LambdaLR."""
        opt = adamw(self.trainable_parameters(), lr=self.learning_rate)
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
    @property
    def denoiser(self) -> Any:
        """D(x; sigma) of this model, shared by the loss and every solver (ldm.diffusion.denoiser)."""
        from ldm.diffusion.denoiser import DiscreteDenoiser, SigmaDenoiser

        if self.sigma_training is not None:
            return SigmaDenoiser(self.sigma_training)
        return DiscreteDenoiser(self.alphas_cumprod_f64, self.parameterization)

    def encode_latent(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images [B, C, H, W] in [-1, 1] -> the sampler's space (pixel space: the images)."""
        return x

    def decode_latent(self, z: torch.Tensor) -> torch.Tensor:
        """The sampler's x_0 -> images in [-1, 1]."""
        return z

    def generate(self, prompt: Any = None, **kwargs: Any) -> Any:
        """Images for prompts (or a batch, or a conditioning); see :func:`ldm.engine.generate.generate`."""
        from ldm.engine.generate import generate

        return generate(self, prompt, **kwargs)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record the sampling defaults (sampler, steps, guidance) with the weights."""
        if self.sampling_defaults:
            checkpoint["sampling_defaults"] = dict(self.sampling_defaults)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        from ldm.engine.defaults import check_sampling_defaults

        if checkpoint.get("sampling_defaults"):
            self.sampling_defaults = check_sampling_defaults(checkpoint["sampling_defaults"])

    # ------------------------------------------------------------------ sampling and images
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of samples."""
        size = self.image_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return (self.channels, int(h), int(w))

    @torch.no_grad()
    def sample(
        self,
        cond: Any = None,
        batch_size: int = 16,
        return_intermediates: bool = False,
        x_T: torch.Tensor | None = None,
        sampler: str = "ddpm",
        steps: int | None = None,
        **options: Any,
    ) -> Any:
        """Draw samples through `ldm.samplers.sample` (default: ancestral DDPM, all T steps)."""
        from ldm.samplers.legacy import sample_model

        samples, intermediates = sample_model(
            self,
            cond,
            batch_size=batch_size,
            shape=self.latent_shape(),
            sampler=sampler,
            steps=steps or self.num_timesteps,
            x_T=x_T,
            log_every_t=self.log_every_t,
            **options,
        )
        if return_intermediates:
            return samples, intermediates["pred_x0"]
        return samples

    def diffusion_row(self, x_start: torch.Tensor, n_row: int) -> list[torch.Tensor]:
        """x_t of the first n_row inputs every log_every_t steps (forward-process picture)."""
        x_start = x_start[:n_row]
        row = []
        noise = torch.randn_like(x_start)
        for t in range(self.num_timesteps):
            if t % self.log_every_t == 0 or t == self.num_timesteps - 1:
                tt = torch.full((x_start.shape[0],), t, device=self.device, dtype=torch.long)
                row.append(self.q_sample(x_start, tt, noise))
        return row

    @torch.no_grad()
    def log_images(
        self,
        batch: Mapping[str, Any],
        N: int = 8,
        n_row: int = 2,
        sample: bool = True,
        return_keys: Sequence[str] | None = None,
        ddim_steps: int | None = None,
        ddim_eta: float = 1.0,
        **kwargs: Any,
    ) -> dict[str, torch.Tensor]:
        """inputs, diffusion_row, samples, denoise_row as images in [-1, 1]."""
        from ldm.models.diffusion.image_logging import grid_from_rows

        log: dict[str, torch.Tensor] = {}
        x = self.get_input(batch, self.first_stage_key).to(self.device)
        N = min(x.shape[0], N)
        n_row = min(x.shape[0], n_row)
        x = x[:N]
        log["inputs"] = x
        log["diffusion_row"] = grid_from_rows(self.diffusion_row(x, n_row))
        if sample:
            options = (
                {"sampler": "ddim", "steps": ddim_steps, "eta": ddim_eta} if ddim_steps else {}
            )
            with self.ema_scope("Plotting"):
                samples, denoise_row = self.sample(
                    batch_size=N, return_intermediates=True, **options
                )
            log["samples"] = samples
            log["denoise_row"] = grid_from_rows([d[:n_row] for d in denoise_row])
        if return_keys:
            return {k: v for k, v in log.items() if k in return_keys}
        return log


def __getattr__(name: str) -> Any:
    """Lazy re-exports of the latent models (they import this module)."""
    if name == "LatentDiffusion":
        from ldm.models.diffusion.latent import LatentDiffusion

        return LatentDiffusion
    if name == "LatentInpaintDiffusion":
        from ldm.models.diffusion.inpaint import LatentInpaintDiffusion

        return LatentInpaintDiffusion
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
