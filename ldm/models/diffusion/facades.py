"""CompVis-compatible sampler facades: ``DDIMSampler``, ``PLMSSampler``, ``DPMSolverSampler``.

`DDIMSampler(model).sample(S, batch_size, shape, conditioning, ...)` returns `(samples, intermediates)`
exactly as in CompVis/stable-diffusion (`ldm/models/diffusion/ddim.py`): DDIM (Song et al. 2021,
eq. 12) on the 'uniform' timesteps range(0, T, T // S) + 1, the last step landing on alpha_bar_0.
`PLMSSampler` (Liu et al. 2022, PNDM without Runge-Kutta warm-up) and `DPMSolverSampler`
(DPM-Solver++(2M), Lu et al. 2022) follow. `stochastic_encode` / `decode` implement img2img.
These classes only translate arguments into ``ldm.engine.generate.generate_latents``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ldm.engine.compvis_sampling import generate_latents as sample_model
from ldm.engine.compvis_sampling import legacy_callback as _legacy_callback

logger = logging.getLogger(__name__)

__all__ = ["DDIMSampler", "DPMSolverSampler", "PLMSSampler", "uniform_ddim_timesteps"]


def uniform_ddim_timesteps(
    num_ddim_steps: int, num_ddpm_steps: int, discretize: str = "uniform"
) -> np.ndarray:
    """CompVis make_ddim_timesteps: range(0, T, T // S) + 1 ('uniform') or quadratic ('quad'), ascending."""
    if discretize == "uniform":
        c = num_ddpm_steps // num_ddim_steps
        if c < 1:
            raise ValueError(f"S={num_ddim_steps} exceeds the {num_ddpm_steps} training timesteps.")
        ts = np.asarray(list(range(0, num_ddpm_steps, c)))
    elif discretize == "quad":
        ts = (np.linspace(0, np.sqrt(num_ddpm_steps * 0.8), num_ddim_steps) ** 2).astype(int)
    else:
        raise ValueError(f"ddim_discretize must be 'uniform' or 'quad', got {discretize!r}")
    return ts + 1


class DDIMSampler:
    """CompVis `DDIMSampler(model)`: `.make_schedule`, `.sample`, `.stochastic_encode`, `.decode`."""

    sampler_name = "ddim"

    def __init__(
        self, model: Any, schedule: str = "linear", device: Any = None, **kwargs: Any
    ) -> None:
        self.model = model
        self.ddpm_num_timesteps = model.num_timesteps
        self.schedule = schedule
        self.device = device
        self.ddim_eta = 0.0

    def register_buffer(self, name: str, attr: Any) -> None:
        """CompVis helper: keep a tensor attribute (moved to the sampler's device when set)."""
        if isinstance(attr, torch.Tensor) and self.device is not None:
            attr = attr.to(self.device)
        setattr(self, name, attr)

    def make_schedule(
        self,
        ddim_num_steps: int,
        ddim_discretize: str = "uniform",
        ddim_eta: float = 0.0,
        verbose: bool = True,
    ) -> None:
        """DDIM timesteps and their alpha_bar, alpha_bar_prev, sigma (DDIM eq. 16) as attributes."""
        self.ddim_timesteps = uniform_ddim_timesteps(
            ddim_num_steps, self.ddpm_num_timesteps, ddim_discretize
        )
        ac = self.model.alphas_cumprod_f64
        self.register_buffer("betas", self.model.betas)
        self.register_buffer("alphas_cumprod", self.model.alphas_cumprod)
        self.register_buffer("alphas_cumprod_prev", self.model.alphas_cumprod_prev)
        self.register_buffer("sqrt_alphas_cumprod", ac.sqrt().float())
        self.register_buffer("sqrt_one_minus_alphas_cumprod", (1 - ac).sqrt().float())
        alphas = ac[torch.as_tensor(self.ddim_timesteps)]
        alphas_prev = torch.cat([ac[:1], alphas[:-1]])
        sigmas = ddim_eta * ((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev)).sqrt()
        self.ddim_alphas = alphas.float()
        self.ddim_alphas_prev = alphas_prev.numpy()
        self.ddim_sigmas = sigmas.float()
        self.ddim_sqrt_one_minus_alphas = (1.0 - alphas).sqrt().float()
        self.ddim_eta = float(ddim_eta)
        if verbose:
            logger.info(
                "DDIM: %d steps, eta %g, timesteps %s",
                len(self.ddim_timesteps),
                ddim_eta,
                self.ddim_timesteps.tolist(),
            )

    def _options(self, eta: float) -> dict[str, Any]:
        return {"eta": eta, "timesteps": [int(t) for t in self.ddim_timesteps[::-1]]}

    @torch.no_grad()
    def sample(
        self,
        S: int,
        batch_size: int,
        shape: tuple[int, ...],
        conditioning: Any = None,
        callback: Callable[[int], None] | None = None,
        normals_sequence: Any = None,
        img_callback: Callable[[torch.Tensor, int], None] | None = None,
        quantize_x0: bool = False,
        eta: float = 0.0,
        mask: torch.Tensor | None = None,
        x0: torch.Tensor | None = None,
        temperature: float = 1.0,
        noise_dropout: float = 0.0,
        score_corrector: Any = None,
        corrector_kwargs: dict[str, Any] | None = None,
        verbose: bool = True,
        x_T: torch.Tensor | None = None,
        log_every_t: int = 100,
        unconditional_guidance_scale: float = 1.0,
        unconditional_conditioning: Any = None,
        dynamic_threshold: float | None = None,
        ucg_schedule: Any = None,
        generator: torch.Generator | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
        """CompVis signature; returns (samples [B, C, H, W], {"x_inter": [...], "pred_x0": [...]})."""
        unsupported = {
            "quantize_x0": quantize_x0 is not False,
            "temperature": temperature != 1.0,
            "noise_dropout": noise_dropout != 0.0,
            "dynamic_threshold": dynamic_threshold is not None,
            "ucg_schedule": ucg_schedule is not None,
            "normals_sequence": normals_sequence is not None,
        }
        bad = [k for k, v in unsupported.items() if v]
        if bad:
            raise ValueError(
                f"{type(self).__name__}.sample: {bad} are not supported by ldm.samplers; leave them "
                "at their defaults."
            )
        if kwargs:
            logger.warning("%s.sample ignores %s", type(self).__name__, sorted(kwargs))
        _check_batch(conditioning, batch_size)
        self._check_eta(eta)
        self.make_schedule(ddim_num_steps=S, ddim_eta=eta, verbose=verbose)
        user_cb = _legacy_callback(callback, img_callback)
        options = self._options(eta)
        if mask is not None:
            options.update(mask=mask, x0=x0)
        return sample_model(
            self.model,
            conditioning,
            batch_size=batch_size,
            shape=tuple(shape),
            sampler=self.sampler_name,
            steps=len(self.ddim_timesteps),
            x_T=x_T,
            log_every_t=log_every_t,
            unconditional_guidance_scale=unconditional_guidance_scale,
            unconditional_conditioning=unconditional_conditioning,
            generator=generator,
            callback=user_cb,
            score_corrector=score_corrector,
            corrector_kwargs=corrector_kwargs,
            **options,
        )

    def _check_eta(self, eta: float) -> None:
        return None

    @torch.no_grad()
    def stochastic_encode(
        self,
        x0: torch.Tensor,
        t: torch.Tensor,
        use_original_steps: bool = False,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """q(x_t | x_0) at DDIM step index t [B] (or training timestep with use_original_steps)."""
        if use_original_steps:
            ac = self.model.alphas_cumprod_f64
        else:
            if not hasattr(self, "ddim_alphas"):
                raise RuntimeError(
                    "call make_schedule(ddim_num_steps=...) before stochastic_encode."
                )
            ac = self.ddim_alphas.double()
        noise = torch.randn_like(x0) if noise is None else noise
        a = ac[torch.as_tensor(t).long().cpu()].to(x0).view(-1, *([1] * (x0.ndim - 1)))
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    @torch.no_grad()
    def decode(
        self,
        x_latent: torch.Tensor,
        cond: Any,
        t_start: int,
        unconditional_guidance_scale: float = 1.0,
        unconditional_conditioning: Any = None,
        use_original_steps: bool = False,
        callback: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """Denoise x_latent from DDIM step t_start down to 0 (CompVis img2img)."""
        base = np.arange(self.ddpm_num_timesteps) if use_original_steps else self.ddim_timesteps
        timesteps = [int(t) for t in base[:t_start][::-1]]
        if not timesteps:
            return x_latent
        x, _ = sample_model(
            self.model,
            cond,
            batch_size=x_latent.shape[0],
            shape=tuple(x_latent.shape[1:]),
            sampler="ddim",
            steps=len(timesteps),
            x_T=x_latent,
            unconditional_guidance_scale=unconditional_guidance_scale,
            unconditional_conditioning=unconditional_conditioning,
            callback=_legacy_callback(callback, None),
            timesteps=timesteps,
            eta=self.ddim_eta,
        )
        return x


class PLMSSampler(DDIMSampler):
    """CompVis `PLMSSampler(model)`: pseudo linear multistep (PNDM without PRK), eta must be 0."""

    sampler_name = "plms"

    def _check_eta(self, eta: float) -> None:
        if eta != 0:
            raise ValueError("eta must be 0 for PLMS")

    def _options(self, eta: float) -> dict[str, Any]:
        return {"timesteps": [int(t) for t in self.ddim_timesteps[::-1]]}


class DPMSolverSampler:
    """SD 2.x `DPMSolverSampler(model)`: DPM-Solver++(2M) in S steps; returns (samples, None)."""

    def __init__(self, model: Any, **kwargs: Any) -> None:
        self.model = model

    @torch.no_grad()
    def sample(
        self,
        S: int,
        batch_size: int,
        shape: tuple[int, ...],
        conditioning: Any = None,
        callback: Callable[[int], None] | None = None,
        normals_sequence: Any = None,
        img_callback: Callable[[torch.Tensor, int], None] | None = None,
        quantize_x0: bool = False,
        eta: float = 0.0,
        mask: torch.Tensor | None = None,
        x0: torch.Tensor | None = None,
        temperature: float = 1.0,
        noise_dropout: float = 0.0,
        score_corrector: Any = None,
        corrector_kwargs: dict[str, Any] | None = None,
        verbose: bool = True,
        x_T: torch.Tensor | None = None,
        log_every_t: int = 100,
        unconditional_guidance_scale: float = 1.0,
        unconditional_conditioning: Any = None,
        generator: torch.Generator | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        """CompVis signature; multistep DPM-Solver++ of order 2 (`dpmpp_2m`)."""
        _check_batch(conditioning, batch_size)
        options: dict[str, Any] = {}
        if mask is not None:
            options.update(mask=mask, x0=x0)
        x, _ = sample_model(
            self.model,
            conditioning,
            batch_size=batch_size,
            shape=tuple(shape),
            sampler="dpmpp_2m",
            steps=S,
            x_T=x_T,
            unconditional_guidance_scale=unconditional_guidance_scale,
            unconditional_conditioning=unconditional_conditioning,
            generator=generator,
            callback=_legacy_callback(callback, img_callback),
            **options,
        )
        return x, None


def _check_batch(conditioning: Any, batch_size: int) -> None:
    """Warn like CompVis when the conditioning's batch differs from batch_size."""
    if conditioning is None:
        return
    if isinstance(conditioning, dict):
        first = next(iter(conditioning.values()))
        first = first[0] if isinstance(first, list) else first
        n = first.shape[0]
    elif isinstance(conditioning, list):
        n = conditioning[0].shape[0]
    else:
        n = conditioning.shape[0]
    if n != batch_size:
        logger.warning("Got %d conditionings but batch-size is %d", n, batch_size)
