"""Latent diffusion (Rombach et al. 2022): DDPM in the latent space z = s * E(x) of a frozen first
stage, conditioned through tau_theta(y) (Sec. 3.3, eq. 2). CompVis / SD 2.x constructor parameters.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from ldm.engine.conditioner import Conditioner, Embedder
from ldm.models.diffusion.conditioning import CLASS_KEYS, TEXT_KEYS
from ldm.models.diffusion.ddpm import DDPM, _plain, disabled_train
from ldm.util import (
    FIRST_STAGE_SENTINEL,
    UNCONDITIONAL_SENTINEL,
    ConfigError,
    instantiate_from_config,
)

logger = logging.getLogger(__name__)

_DDPM_PARAMS = [
    name for name in inspect.signature(DDPM.__init__).parameters if name not in ("self",)
]


def check_ddpm_kwargs(owner: str, kwargs: Mapping[str, Any]) -> None:
    """Reject constructor keywords neither the subclass nor DDPM accepts (names the fix)."""
    import difflib

    for key in kwargs:
        if key not in _DDPM_PARAMS:
            close = difflib.get_close_matches(key, _DDPM_PARAMS, n=1, cutoff=0.6)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(
                f"{owner} has no parameter '{key}'{hint}. Check model.params in your config."
            )


def _first(xc: Any, n: int) -> Any:
    """The first n entries of a condition input (a batch dict: of each of its sequences)."""
    if isinstance(xc, Mapping):
        return {
            k: v[:n] if isinstance(v, torch.Tensor | list | tuple) else v for k, v in xc.items()
        }
    return xc[:n]


def _is_sentinel(config: Any, sentinel: str) -> bool:
    return isinstance(config, str) and config == sentinel


class LatentDiffusion(DDPM):
    """LDM: first stage (frozen autoencoder), cond stage tau_theta, denoiser on the latents."""

    latent_space = True

    def __init__(
        self,
        first_stage_config: Any,
        cond_stage_config: Any,
        num_timesteps_cond: int | None = None,
        cond_stage_key: str = "image",
        cond_stage_trainable: bool = False,
        concat_mode: bool = True,
        cond_stage_forward: str | None = None,
        conditioning_key: str | None = None,
        scale_factor: float = 1.0,
        scale_by_std: bool = False,
        force_null_conditioning: bool = False,
        **kwargs: Any,
    ) -> None:
        check_ddpm_kwargs(type(self).__name__, kwargs)
        self.force_null_conditioning = force_null_conditioning
        self._conditioner: Conditioner | None = None
        self.num_timesteps_cond = 1 if num_timesteps_cond is None else int(num_timesteps_cond)
        self.scale_by_std = scale_by_std
        timesteps = int(kwargs.get("timesteps", 1000))
        if self.num_timesteps_cond > timesteps:
            raise ConfigError(
                f"num_timesteps_cond={self.num_timesteps_cond} exceeds timesteps={timesteps}."
            )
        if conditioning_key is None:  # CompVis backwards compatibility
            conditioning_key = "concat" if concat_mode else "crossattn"
        if _is_sentinel(cond_stage_config, UNCONDITIONAL_SENTINEL) and not force_null_conditioning:
            conditioning_key = None
        super().__init__(conditioning_key=conditioning_key, **kwargs)
        self.concat_mode = concat_mode
        self.cond_stage_trainable = cond_stage_trainable
        self.cond_stage_key = cond_stage_key
        try:
            self.num_downs = len(first_stage_config["params"]["ddconfig"]["ch_mult"]) - 1
        except (KeyError, TypeError):
            self.num_downs = 0
        if not scale_by_std:
            self.scale_factor = scale_factor
        else:
            self.register_buffer("scale_factor", torch.tensor(float(scale_factor)))
        self.instantiate_first_stage(first_stage_config)
        self.instantiate_cond_stage(cond_stage_config)
        self.cond_stage_forward = cond_stage_forward
        self.clip_denoised = False
        self.bbox_tokenizer = None
        self.restarted_from_ckpt = False
        ckpt_path, ignore_keys, only_model = self._ckpt_args
        if ckpt_path is not None:
            self.restarted_from_ckpt = True
        self._restore(ckpt_path, ignore_keys, only_model)
        for key in self.ucg_training:
            if key != self.cond_stage_key:
                raise ConfigError(
                    f"ucg_training names '{key}', but the condition is read from cond_stage_key "
                    f"'{self.cond_stage_key}'; caption dropout applies to the conditioning input."
                )

    # ------------------------------------------------------------------ construction
    def register_schedule(self, *args: Any, **kwargs: Any) -> None:
        """DDPM buffers plus the shortened conditioning schedule (`cond_ids`) when asked."""
        super().register_schedule(*args, **kwargs)
        self.shorten_cond_schedule = self.num_timesteps_cond > 1
        if self.shorten_cond_schedule:
            self.make_cond_schedule()

    def make_cond_schedule(self) -> None:
        """cond_ids[t]: the noise level at which the condition is diffused (CompVis)."""
        cond_ids = torch.full((self.num_timesteps,), self.num_timesteps - 1, dtype=torch.long)
        ids = torch.linspace(0, self.num_timesteps - 1, self.num_timesteps_cond).round().long()
        cond_ids[: self.num_timesteps_cond] = ids
        self.register_buffer("cond_ids", cond_ids)

    def instantiate_first_stage(self, config: Any) -> None:
        """Build the autoencoder, frozen and kept in eval mode."""
        if _is_sentinel(config, FIRST_STAGE_SENTINEL) or _is_sentinel(
            config, UNCONDITIONAL_SENTINEL
        ):
            raise ConfigError(
                f"first_stage_config cannot be the sentinel '{config}'; give the autoencoder's "
                "{target, params} (ldm.models.autoencoder.IdentityFirstStage for pixel space)."
            )
        model = instantiate_from_config(config)
        self.first_stage_model = model.eval()
        self.first_stage_model.train = functools.partial(disabled_train, self.first_stage_model)
        for param in self.first_stage_model.parameters():
            param.requires_grad = False

    def instantiate_cond_stage(self, config: Any) -> None:
        """Build tau_theta: frozen (eval, no grad) unless cond_stage_trainable; handle sentinels."""
        if self.cond_stage_trainable:
            if _is_sentinel(config, FIRST_STAGE_SENTINEL) or _is_sentinel(
                config, UNCONDITIONAL_SENTINEL
            ):
                raise ConfigError(
                    f"cond_stage_trainable=True needs a real cond_stage_config, found '{config}'."
                )
            self.cond_stage_model = instantiate_from_config(config)
            return
        if _is_sentinel(config, FIRST_STAGE_SENTINEL):
            logger.info("Using the first stage also as the cond stage.")
            self.cond_stage_model = self.first_stage_model
        elif _is_sentinel(config, UNCONDITIONAL_SENTINEL):
            logger.info("Training %s as an unconditional model.", type(self).__name__)
            self.cond_stage_model = None
        else:
            model = instantiate_from_config(config)
            self.cond_stage_model = model.eval()
            self.cond_stage_model.train = functools.partial(disabled_train, self.cond_stage_model)
            for param in self.cond_stage_model.parameters():
                param.requires_grad = False

    # ------------------------------------------------------------------ first stage
    @torch.no_grad()
    def encode_first_stage(self, x: torch.Tensor) -> Any:
        """E(x): a posterior (KL), pre-quantization latents (VQ) or x itself (identity)."""
        return self.first_stage_model.encode(x)

    def get_first_stage_encoding(self, encoder_posterior: Any) -> torch.Tensor:
        """z = scale_factor * (posterior sample | tensor)."""
        if isinstance(encoder_posterior, torch.Tensor):
            z = encoder_posterior
        elif callable(getattr(encoder_posterior, "sample", None)):
            z = encoder_posterior.sample()
        else:
            raise TypeError(
                f"encoder_posterior of type {type(encoder_posterior).__name__} is neither a "
                "tensor nor a distribution with .sample()."
            )
        return self.scale_factor * z

    @torch.no_grad()
    def decode_first_stage(
        self, z: torch.Tensor, predict_cids: bool = False, force_not_quantize: bool = False
    ) -> torch.Tensor:
        """D(z / scale_factor)."""
        if predict_cids:
            raise NotImplementedError(
                "predict_cids (codebook-index prediction) is not supported; decode latents."
            )
        z = 1.0 / self.scale_factor * z
        decode = self.first_stage_model.decode
        if "force_not_quantize" in inspect.signature(decode).parameters:
            return decode(z, force_not_quantize=force_not_quantize)
        return decode(z)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """scale_by_std: set scale_factor = 1 / std(z) from the very first batch (LDM Sec. G)."""
        if not (
            self.scale_by_std
            and self.current_epoch == 0
            and self.global_step == 0
            and batch_idx == 0
            and not self.restarted_from_ckpt
        ):
            return
        if float(self.scale_factor) != 1.0:
            raise ConfigError(
                f"scale_by_std=True estimates scale_factor itself; set scale_factor: 1.0 "
                f"(found {float(self.scale_factor)})."
            )
        logger.info("### USING STD-RESCALING ###")
        x = DDPM.get_input(self, batch, self.first_stage_key).to(self.device)
        z = self.get_first_stage_encoding(self.encode_first_stage(x)).detach()
        value = 1.0 / z.flatten().float().std()
        trainer = getattr(self, "_trainer", None)
        if trainer is not None and trainer.world_size > 1:
            value = trainer.strategy.broadcast(value, src=0)
        self.scale_factor = value.to(self.scale_factor)
        logger.info("setting self.scale_factor to %s", float(self.scale_factor))

    # ------------------------------------------------------------------ conditioning
    def get_learned_conditioning(self, c: Any) -> Any:
        """tau_theta(y): `cond_stage_forward` method, else `.encode` (mode of a posterior), else call."""
        if self.cond_stage_model is None:
            raise RuntimeError(
                "This model is unconditional (cond_stage_config: __is_unconditional__)."
            )
        if self.cond_stage_forward is not None:
            return getattr(self.cond_stage_model, self.cond_stage_forward)(c)
        encode = getattr(self.cond_stage_model, "encode", None)
        if callable(encode):
            c = encode(c)
            if not isinstance(c, torch.Tensor) and callable(getattr(c, "mode", None)):
                c = c.mode()
            return c
        return self.cond_stage_model(c)

    def _null_condition_input(self) -> Any:
        """The raw input meaning 'no condition' (empty prompt, null class); None: not droppable."""
        if self.cond_stage_key in TEXT_KEYS:
            return ""
        n_classes = getattr(self.cond_stage_model, "n_classes", None)
        if self.cond_stage_key in CLASS_KEYS:
            return int(n_classes) - 1 if n_classes is not None else 0  # CompVis SD 2.x null class
        return None

    # ------------------------------------------------------------------ the composition
    @property
    def conditioner(self) -> Conditioner | None:
        """The embedders of this model (built once): the cond stage on ``cond_stage_key``."""
        if self._conditioner is None and self.model.conditioning_key is not None:
            if self.force_null_conditioning or self.cond_stage_model is None:
                return None
            self._conditioner = Conditioner(self.embedders(), self.assemble_condition)
        return self._conditioner

    def embedders(self) -> list[Embedder]:
        """Caption dropout: ``ucg_training`` of the cond key, else a frozen cond stage's ``ucg_rate``
        (a trainable one drops its own inputs in training mode)."""
        key = self.cond_stage_key
        null = self._null_condition_input()
        rate = 0.0
        if key in self.ucg_training:
            spec = self.ucg_training[key]
            rate = float(spec["p"])
            if spec.get("val", None) is not None:
                null = spec["val"]
        elif not self.cond_stage_trainable:
            rate = float(getattr(self.cond_stage_model, "ucg_rate", 0.0) or 0.0)
        kind = "vector" if self.model.conditioning_key == "adm" else "crossattn"
        if self.model.conditioning_key == "concat":
            kind = "concat"

        def encode(raw: Any) -> Any:
            xc = raw
            if isinstance(raw, Mapping) or self.cond_stage_key in TEXT_KEYS:
                xc = raw
            elif self.cond_stage_key in CLASS_KEYS:
                xc = torch.as_tensor(raw).to(self.device)
            elif isinstance(raw, torch.Tensor):
                xc = raw.to(self.device)
            return self.get_learned_conditioning(xc)

        return [
            Embedder(
                key,
                encode,
                kind=kind,
                ucg_rate=rate,
                null=null,
                is_trainable=bool(self.cond_stage_trainable),
            )
        ]

    def assemble_condition(self, outputs: list[Any]) -> Any:
        """The cond stage's output as apply_model takes it."""
        return outputs[0]

    def encode_latent(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """z = scale_factor * E(x): a posterior sample drawn from ``generator`` (KL), the latents (VQ)."""
        posterior = self.encode_first_stage(x)
        if isinstance(posterior, torch.Tensor) or generator is None:
            return self.get_first_stage_encoding(posterior)
        eps = torch.randn(posterior.mean.shape, generator=generator, device=generator.device)
        return self.scale_factor * (posterior.mean + posterior.std * eps.to(posterior.mean))

    def decode_latent(self, z: torch.Tensor) -> torch.Tensor:
        """D(z / scale_factor) in [-1, 1]."""
        return self.decode_first_stage(z)

    @torch.no_grad()
    def get_unconditional_conditioning(self, batch_size: int, null_label: Any = None) -> Any:
        """tau_theta(null) repeated batch_size times (empty prompt / null class by default)."""
        null_label = _plain(null_label)
        if null_label is None:
            if self.cond_stage_key in CLASS_KEYS:
                get_uc = getattr(self.cond_stage_model, "get_unconditional_conditioning", None)
                if callable(get_uc):
                    return self.get_learned_conditioning(get_uc(batch_size, device=self.device))
                null = self._null_condition_input()
                labels = torch.full((batch_size,), null, device=self.device, dtype=torch.long)
                return self.get_learned_conditioning(labels)
            if self.cond_stage_key in TEXT_KEYS:
                null_label = [""]
            else:
                raise ValueError(
                    f"No default null condition for cond_stage_key '{self.cond_stage_key}'; "
                    "pass unconditional_guidance_label."
                )
        if isinstance(null_label, torch.Tensor):
            null_label = null_label.to(self.device)
        c = self.get_learned_conditioning(null_label)
        if isinstance(c, list):
            return [ci.expand(batch_size, *ci.shape[1:]).to(self.device) for ci in c]
        if c.shape[0] == batch_size:
            return c.to(self.device)
        return c[:1].expand(batch_size, *c.shape[1:]).to(self.device)  # [1, ...] -> [B, ...]

    # ------------------------------------------------------------------ data
    @torch.no_grad()
    def get_input(
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
        x = DDPM.get_input(self, batch, k)
        if bs is not None:
            x = x[:bs]
        x = x.to(self.device)
        z = self.get_first_stage_encoding(self.encode_first_stage(x)).detach()
        c: Any = None
        xc: Any = None
        if self.model.conditioning_key is not None and not self.force_null_conditioning:
            xc = self._condition_input(batch, cond_key or self.cond_stage_key, x, bs)
            if not self.cond_stage_trainable or force_c_encode:
                if isinstance(xc, torch.Tensor):
                    xc = xc.to(self.device)
                c = self.get_learned_conditioning(xc)
            else:
                c = xc
            if bs is not None and isinstance(c, torch.Tensor | list):
                c = c[:bs]
        out: list[Any] = [z, c]
        if return_first_stage_outputs:
            out.extend([x, self.decode_first_stage(z)])
        if return_x:
            out.append(x)
        if return_original_cond:
            out.append(xc)
        return out

    def _condition_input(
        self, batch: Mapping[str, Any], cond_key: str, x: torch.Tensor | None, bs: int | None
    ) -> Any:
        """The raw condition of a batch: captions (list), class labels, or an image tensor."""
        if cond_key == self.first_stage_key and x is not None:
            xc = x
        elif cond_key in TEXT_KEYS:
            xc = list(batch[cond_key])
        elif cond_key in CLASS_KEYS:
            xc = self._class_input(batch, cond_key)
        else:
            xc = DDPM.get_input(self, batch, cond_key).to(self.device)
        return _first(xc, bs) if bs is not None else xc

    def _class_input(self, batch: Mapping[str, Any], cond_key: str) -> Any:
        """CompVis ClassEmbedder.forward takes the batch dict; ours may take the label tensor."""
        model = self.cond_stage_model
        if model is not None and "batch" in inspect.signature(model.forward).parameters:
            return batch
        return torch.as_tensor(batch[cond_key]).to(self.device)

    def shared_step(self, batch: Mapping[str, Any], **kwargs: Any) -> Any:
        """Loss of one batch."""
        x, c = self.get_input(batch, self.first_stage_key)
        return self(x, c)

    def forward(self, x: torch.Tensor, c: Any = None, *args: Any, **kwargs: Any) -> Any:
        """Training loss: encode trainable conditions, diffuse the condition if shortened, L_LDM."""
        if self.model.conditioning_key is not None and not self.force_null_conditioning:
            if c is None:
                raise ValueError("conditional model called without conditioning c.")
            if self.cond_stage_trainable:
                c = self.get_learned_conditioning(c)
        if self.sigma_training is not None:
            return self.sigma_loss(x, c)
        t = self.sample_timesteps(x.shape[0])
        if self.shorten_cond_schedule and isinstance(c, torch.Tensor):
            tc = self.cond_ids[t].to(self.device)
            c = self.q_sample(c, tc, torch.randn_like(c.float()))
        return self.p_losses(x, c, t, *args, **kwargs)

    def p_losses(  # type: ignore[override]
        self, x_start: torch.Tensor, cond: Any, t: torch.Tensor, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """L_LDM at timesteps t (Rombach et al. 2022, eq. 2)."""
        return self.diffusion_loss(x_start, cond, t, noise)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Denoiser, the cond stage when trainable, logvar when learned."""
        params = list(self.model.parameters())
        if self.cond_stage_trainable and self.cond_stage_model is not None:
            logger.info("%s: also optimizing conditioner params!", type(self).__name__)
            params += list(self.cond_stage_model.parameters())
        if self.learn_logvar:
            params.append(self.logvar)
        return params

    # ------------------------------------------------------------------ sampling and images
    @torch.no_grad()
    def sample_log(
        self,
        cond: Any,
        batch_size: int,
        ddim: bool = True,
        ddim_steps: int | None = 50,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
        """(latents, intermediates) with DDIM (ddim_steps) or ancestral DDPM (all T steps)."""
        from ldm.samplers.legacy import sample_model

        sampler = "ddim" if ddim and ddim_steps else "ddpm"
        steps = ddim_steps if sampler == "ddim" else self.num_timesteps
        if sampler == "ddpm":
            kwargs.pop("eta", None)
        return sample_model(
            self,
            cond,
            batch_size=batch_size,
            shape=self.latent_shape(),
            sampler=sampler,
            steps=steps,
            log_every_t=max(1, steps // 10) if steps else self.log_every_t,
            **kwargs,
        )

    def _conditioning_images(
        self, batch: Mapping[str, Any], x: torch.Tensor, c: Any, xc: Any, n: int
    ) -> Any:
        from ldm.models.diffusion.image_logging import class_labels_as_text, log_txt_as_img

        wh = (x.shape[3], x.shape[2])
        if self.cond_stage_key in TEXT_KEYS:
            return log_txt_as_img(wh, list(batch[self.cond_stage_key])[:n]).to(x)
        if self.cond_stage_key in CLASS_KEYS:
            if "human_label" in batch:
                return log_txt_as_img(wh, list(batch["human_label"])[:n]).to(x)
            return log_txt_as_img(
                wh, class_labels_as_text(torch.as_tensor(batch[self.cond_stage_key])[:n])
            ).to(x)
        if isinstance(xc, torch.Tensor) and xc.ndim == 4 and xc.shape[1] in (1, 3):
            return xc[:n]
        return None

    @torch.no_grad()
    def log_images(  # type: ignore[override]
        self,
        batch: Mapping[str, Any],
        N: int = 8,
        n_row: int = 4,
        sample: bool = True,
        ddim_steps: int | None = 50,
        ddim_eta: float = 0.0,
        return_keys: Sequence[str] | None = None,
        quantize_denoised: bool = True,
        inpaint: bool = True,
        plot_denoise_rows: bool = False,
        plot_progressive_rows: bool = True,
        plot_diffusion_rows: bool = True,
        unconditional_guidance_scale: float = 1.0,
        unconditional_guidance_label: Any = None,
        use_ema_scope: bool = True,
        **kwargs: Any,
    ) -> dict[str, torch.Tensor]:
        """inputs, reconstruction, conditioning, diffusion_row, samples, denoise_row,
        progressive_row, samples_cfg_scale_*, samples_inpainting, all in [-1, 1]."""
        from ldm.models.diffusion.image_logging import grid_from_rows

        ema = self.ema_scope if use_ema_scope else (lambda *a, **k: nullcontext())
        use_ddim = ddim_steps is not None
        z, c, x, xrec, xc = self.get_input(
            batch,
            self.first_stage_key,
            return_first_stage_outputs=True,
            force_c_encode=True,
            return_original_cond=True,
            bs=N,
        )
        N = min(x.shape[0], N)
        n_row = min(x.shape[0], n_row)
        log: dict[str, torch.Tensor] = {"inputs": x, "reconstruction": xrec}
        if self.model.conditioning_key is not None:
            cond_img = self._conditioning_images(batch, x, c, xc, N)
            if cond_img is not None:
                log["conditioning"] = cond_img
        if plot_diffusion_rows:
            rows = [self.decode_first_stage(zt) for zt in self.diffusion_row(z, n_row)]
            log["diffusion_row"] = grid_from_rows(rows)
        sample_args = {"ddim": use_ddim, "ddim_steps": ddim_steps, "eta": ddim_eta}
        if sample:
            with ema("Sampling"):
                samples, inter = self.sample_log(cond=c, batch_size=N, **sample_args)
            log["samples"] = self.decode_first_stage(samples)
            if plot_denoise_rows:
                log["denoise_row"] = grid_from_rows(
                    [self.decode_first_stage(zi[:n_row]) for zi in inter["x_inter"]]
                )
            if plot_progressive_rows:
                log["progressive_row"] = grid_from_rows(
                    [self.decode_first_stage(zi[:n_row]) for zi in inter["pred_x0"]]
                )
        if unconditional_guidance_scale > 1.0 and self.model.conditioning_key is not None:
            uc = self.unconditional_for(c, N, unconditional_guidance_label)
            with ema("Sampling with classifier-free guidance"):
                samples_cfg, _ = self.sample_log(
                    cond=c,
                    batch_size=N,
                    unconditional_guidance_scale=unconditional_guidance_scale,
                    unconditional_conditioning=uc,
                    **sample_args,
                )
            key = f"samples_cfg_scale_{unconditional_guidance_scale:.2f}"
            log[key] = self.decode_first_stage(samples_cfg)
        if inpaint and sample and z.ndim == 4:
            h, w = z.shape[2], z.shape[3]
            mask = torch.ones(N, 1, h, w, device=self.device)
            mask[:, :, h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = 0.0  # 1 = keep, 0 = generate
            with ema("Plotting inpaint"):
                samples_inp, _ = self.sample_log(
                    cond=c, batch_size=N, x0=z[:N], mask=mask, **sample_args
                )
            log["samples_inpainting"] = self.decode_first_stage(samples_inp)
            log["mask"] = mask.expand(-1, 3, -1, -1) * 2 - 1
        if return_keys:
            return {k: v for k, v in log.items() if k in return_keys}
        return log

    def unconditional_for(self, c: Any, batch_size: int, null_label: Any = None) -> Any:
        """Null conditioning shaped like c (dict conditions keep their c_concat / c_adm parts)."""
        if isinstance(c, Mapping):
            uc_cross = self.get_unconditional_conditioning(batch_size, null_label)
            uc = dict(c)
            uc["c_crossattn"] = [uc_cross]
            return uc
        return self.get_unconditional_conditioning(batch_size, null_label)
