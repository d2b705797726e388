"""CompVis-style sampling calls (``S``, conditioning tensors, ``unconditional_*``, ``x_T``,
``log_every_t``, ``callback(i)`` / ``img_callback(x0, i)``, ``score_corrector``) translated into one
``generate(..., output="latent")`` call each: what ``DDPM.sample``, ``sample_log`` and the
``DDIMSampler`` / ``PLMSSampler`` / ``DPMSolverSampler`` facades run."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from ldm.engine.generate import generate
from ldm.util import plain


def _device_of(model: Any) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(model.parameters()).device


def _intermediate_collector(
    log_every_t: int, total: int, user_callback: Callable[[dict[str, Any]], None] | None
) -> tuple[dict[str, list[torch.Tensor]], Callable[[dict[str, Any]], None]]:
    inter: dict[str, list[torch.Tensor]] = {"x_inter": [], "pred_x0": []}
    every = max(1, int(log_every_t))

    def callback(info: dict[str, Any]) -> None:
        i = int(info.get("i", 0))
        index = total - i - 1
        if "denoised" in info and (index % every == 0 or i == 0):
            inter["x_inter"].append(info["x"])
            inter["pred_x0"].append(info["denoised"])
        if user_callback is not None:
            user_callback(info)

    return inter, callback


@torch.no_grad()
def generate_latents(
    model: Any,
    cond: Any,
    batch_size: int,
    shape: tuple[int, ...],
    sampler: str = "ddim",
    steps: int = 50,
    x_T: torch.Tensor | None = None,
    log_every_t: int = 100,
    unconditional_guidance_scale: float = 1.0,
    unconditional_conditioning: Any = None,
    guidance_rescale: float = 0.0,
    generator: torch.Generator | None = None,
    callback: Callable[[dict[str, Any]], None] | None = None,
    score_corrector: Any = None,
    corrector_kwargs: dict[str, Any] | None = None,
    use_ema: bool = False,
    **options: Any,
) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
    """CompVis-style sampling arguments (``S``, conditioning tensors, ``unconditional_*``, ``x_T``,
    ``log_every_t``, ``score_corrector``) translated into one ``generate(..., output="latent")`` call.

    Returns (x_0 [B, *shape], {"x_inter": [...], "pred_x0": [...]}) like CompVis samplers.
    """
    device = _device_of(model)
    if x_T is None:
        x_T = torch.randn(
            (batch_size, *shape),
            generator=generator,
            device=generator.device if generator is not None else device,
        )
    x_T = x_T.to(device)
    if unconditional_guidance_scale != 1.0 and unconditional_conditioning is None:
        raise ValueError(
            "unconditional_guidance_scale != 1 needs unconditional_conditioning (e.g. "
            "model.get_unconditional_conditioning(batch_size))."
        )
    wrap = None
    if score_corrector is not None:
        wrap = lambda fn: _corrected(model, fn, cond, score_corrector, corrector_kwargs or {})  # noqa: E731
    inter, collect = _intermediate_collector(log_every_t, steps, callback)
    x = generate(
        model,
        cond=cond,
        uncond=unconditional_conditioning,
        x_T=x_T,
        sampler=sampler,
        steps=steps,
        guidance_scale=unconditional_guidance_scale,
        guidance_rescale=guidance_rescale,
        generator=generator,
        callback=collect,
        use_ema=use_ema,
        wrap_model_fn=wrap,
        output="latent",
        solver_options=options,
    )
    inter["x_inter"].append(x)
    inter["pred_x0"].append(x)
    return x, inter


def _corrected(model: Any, model_fn: Callable, cond: Any, corrector: Any, kwargs: dict) -> Callable:
    """CompVis score_corrector.modify_score(model, e_t, x, t, c) applied to eps predictions."""
    if getattr(model, "parameterization", "eps") != "eps":
        raise ValueError("score_corrector works on eps predictions; this model is not 'eps'.")

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return corrector.modify_score(model, model_fn(x, t), x, t, cond, **kwargs)

    return fn


def legacy_callback(
    callback: Callable[[int], None] | None, img_callback: Callable[[torch.Tensor, int], None] | None
) -> Callable[[dict[str, Any]], None] | None:
    """CompVis callbacks: callback(i) and img_callback(pred_x0, i) from the solvers' info dicts."""
    if callback is None and img_callback is None:
        return None

    def cb(info: dict[str, Any]) -> None:
        i = int(info.get("i", 0))
        if callback is not None:
            callback(i)
        if img_callback is not None and "denoised" in info:
            img_callback(info["denoised"], i)

    return cb


class CompVisSampling:
    """The CompVis methods of a diffusion module (conditioning helpers, ``sample``, ``sample_log``),
    each one translation into ``generate``; mixed into ``DiffusionEngine``."""

    def get_learned_conditioning(self, c: Any) -> Any:
        """tau_theta(y) of raw conditioning inputs (prompts, labels, images)."""
        if self.conditioner is None:
            raise RuntimeError(f"{type(self).__name__} is unconditional: it has no cond stage.")
        return self.conditioner.encode_raw(c)

    @torch.no_grad()
    def get_unconditional_conditioning(self, batch_size: int, null_label: Any = None) -> Any:
        """tau_theta(null) repeated batch_size times (empty prompt / null class by default)."""
        if self.conditioner is None:
            raise RuntimeError(f"{type(self).__name__} is unconditional: it has no cond stage.")
        null_label = plain(null_label)
        if null_label is None:
            get_uc = getattr(self.cond_stage_model, "get_unconditional_conditioning", None)
            if self.conditioner.input_kind == "class" and callable(get_uc):
                return self.get_learned_conditioning(get_uc(batch_size, device=self.device))
            null = self.conditioner.entries[0].null
            if null is None:
                raise ValueError(
                    f"No default null condition for cond_stage_key '{self.conditioner.input_key}'; "
                    "pass unconditional_guidance_label."
                )
            if isinstance(null, str):
                null_label = [null]
            else:
                null_label = torch.full((batch_size,), int(null), device=self.device)
        if isinstance(null_label, torch.Tensor):
            null_label = null_label.to(self.device)
        c = self.get_learned_conditioning(null_label)
        if isinstance(c, list):
            return [ci.expand(batch_size, *ci.shape[1:]).to(self.device) for ci in c]
        if c.shape[0] == batch_size:
            return c.to(self.device)
        return c[:1].expand(batch_size, *c.shape[1:]).to(self.device)  # [1, ...] -> [B, ...]

    def unconditional_for(self, c: Any, batch_size: int, null_label: Any = None) -> Any:
        """Null conditioning shaped like c (dict conditions keep their c_concat / c_adm parts)."""
        if isinstance(c, Mapping):
            uc = dict(c)
            uc["c_crossattn"] = [self.get_unconditional_conditioning(batch_size, null_label)]
            return uc
        return self.get_unconditional_conditioning(batch_size, null_label)

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
        """CompVis ``sample``: latents through generate (default: ancestral DDPM, all T steps)."""
        samples, intermediates = generate_latents(
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
        sampler = "ddim" if ddim and ddim_steps else "ddpm"
        steps = ddim_steps if sampler == "ddim" else self.num_timesteps
        if sampler == "ddpm":
            kwargs.pop("eta", None)
        return generate_latents(
            self,
            cond,
            batch_size=batch_size,
            shape=self.latent_shape(),
            sampler=sampler,
            steps=steps,
            log_every_t=max(1, steps // 10) if steps else self.log_every_t,
            **kwargs,
        )
