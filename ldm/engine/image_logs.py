"""``log_images`` for ImageLogger: inputs, reconstructions, conditioning pictures, the forward
process and samples; every sample is made by ``generate`` (through ``DiffusionEngine.sample_log``).
All images are in [-1, 1]."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from einops import rearrange

from ldm.engine.embedders import MultiConditioner
from ldm.engine.image_rows import class_labels_as_text, grid_from_rows, log_txt_as_img


def diffusion_row(engine: Any, x_start: torch.Tensor, n_row: int) -> list[torch.Tensor]:
    """x_t of the first n_row inputs every log_every_t steps (forward-process picture)."""
    x_start = x_start[:n_row]
    row = []
    noise = torch.randn_like(x_start)
    for t in range(engine.num_timesteps):
        if t % engine.log_every_t == 0 or t == engine.num_timesteps - 1:
            tt = torch.full((x_start.shape[0],), t, device=engine.device, dtype=torch.long)
            row.append(engine.q_sample(x_start, tt, noise))
    return row


def _conditioning_images(
    engine: Any, batch: Mapping[str, Any], x: torch.Tensor, xc: Any, n: int
) -> torch.Tensor | None:
    wh = (x.shape[3], x.shape[2])
    key, kind = engine.conditioner.input_key, engine.conditioner.input_kind
    if kind == "text":
        return log_txt_as_img(wh, list(batch[key])[:n]).to(x)
    if kind == "class":
        if "human_label" in batch:
            return log_txt_as_img(wh, list(batch["human_label"])[:n]).to(x)
        return log_txt_as_img(wh, class_labels_as_text(torch.as_tensor(batch[key])[:n])).to(x)
    if isinstance(xc, torch.Tensor) and xc.ndim == 4 and xc.shape[1] in (1, 3):
        return xc[:n]
    return None


@torch.no_grad()
def log_pixel_images(
    engine: Any,
    batch: Mapping[str, Any],
    N: int = 8,
    n_row: int = 2,
    sample: bool = True,
    return_keys: Sequence[str] | None = None,
    ddim_steps: int | None = None,
    ddim_eta: float = 1.0,
    **kwargs: Any,
) -> dict[str, torch.Tensor]:
    """Pixel-space model: inputs, diffusion_row, samples, denoise_row."""
    log: dict[str, torch.Tensor] = {}
    x = engine.image_input(batch, engine.first_stage_key).to(engine.device)
    N = min(x.shape[0], N)
    n_row = min(x.shape[0], n_row)
    x = x[:N]
    log["inputs"] = x
    log["diffusion_row"] = grid_from_rows(diffusion_row(engine, x, n_row))
    if sample:
        options = {"sampler": "ddim", "steps": ddim_steps, "eta": ddim_eta} if ddim_steps else {}
        with engine.ema_scope("Plotting"):
            samples, denoise_row = engine.sample(batch_size=N, return_intermediates=True, **options)
        log["samples"] = samples
        log["denoise_row"] = grid_from_rows([d[:n_row] for d in denoise_row])
    if return_keys:
        return {k: v for k, v in log.items() if k in return_keys}
    return log


@torch.no_grad()
def log_images(
    engine: Any,
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
    seed: int | None = None,
    **kwargs: Any,
) -> dict[str, torch.Tensor]:
    """inputs, reconstruction, conditioning, diffusion_row, samples, denoise_row, progressive_row,
    samples_cfg_scale_*, samples_inpainting (blending), and for inpainting models the mask and the
    masked image. With ``seed`` every sample row starts from that seed's noise, so a row equals
    ``generate(captions, seed=seed, ...)`` with the same settings."""
    if engine.first_stage_model is None:
        return log_pixel_images(
            engine,
            batch,
            N=N,
            sample=sample,
            return_keys=return_keys,
            ddim_steps=ddim_steps,
            **kwargs,
        )
    conditioner = engine.conditioner
    concat_model = conditioner is not None and bool(conditioner.concat_keys)
    ema = engine.ema_scope if use_ema_scope else (lambda *a, **k: nullcontext())
    use_ddim = ddim_steps is not None
    x = engine.image_input(batch, engine.first_stage_key)[:N].to(engine.device)
    z = engine.get_first_stage_encoding(engine.encode_first_stage(x)).detach()
    c = xc = None
    if conditioner is not None:
        xc = conditioner.raw_input(batch, x, N)
        c = conditioner.batch_condition(batch, x, N)
    xrec = engine.decode_first_stage(z)
    N = min(x.shape[0], N)
    n_row = min(x.shape[0], n_row)
    log: dict[str, torch.Tensor] = {"inputs": x, "reconstruction": xrec}
    if conditioner is not None:
        cond_img = _conditioning_images(engine, batch, x, xc, N)
        if cond_img is not None:
            log["conditioning"] = cond_img
    if plot_diffusion_rows:
        rows = [engine.decode_first_stage(zt) for zt in diffusion_row(engine, z, n_row)]
        log["diffusion_row"] = grid_from_rows(rows)
    sample_args = {"ddim": use_ddim, "ddim_steps": ddim_steps, "eta": ddim_eta}

    def seeded() -> dict[str, Any]:
        if seed is None:
            return sample_args
        return {**sample_args, "generator": torch.Generator().manual_seed(int(seed))}

    if sample:
        with ema("Sampling"):
            samples, inter = engine.sample_log(cond=c, batch_size=N, **seeded())
        log["samples"] = engine.decode_first_stage(samples)
        if plot_denoise_rows:
            log["denoise_row"] = grid_from_rows(
                [engine.decode_first_stage(zi[:n_row]) for zi in inter["x_inter"]]
            )
        if plot_progressive_rows:
            log["progressive_row"] = grid_from_rows(
                [engine.decode_first_stage(zi[:n_row]) for zi in inter["pred_x0"]]
            )
    if unconditional_guidance_scale > 1.0 and conditioner is not None:
        if unconditional_guidance_label is None and isinstance(conditioner, MultiConditioner):
            # several embedders (SDXL): each text embedder's null, the size embedders as they are
            uc = conditioner.uncond(conditioner.batch_condition(batch, x, N, encode=False), N)
        else:
            uc = engine.unconditional_for(c, N, unconditional_guidance_label)
        with ema("Sampling with classifier-free guidance"):
            samples_cfg, _ = engine.sample_log(
                cond=c,
                batch_size=N,
                unconditional_guidance_scale=unconditional_guidance_scale,
                unconditional_conditioning=uc,
                **seeded(),
            )
        key = f"samples_cfg_scale_{unconditional_guidance_scale:.2f}"
        log[key] = engine.decode_first_stage(samples_cfg)
    if inpaint and sample and z.ndim == 4 and not concat_model:
        h, w = z.shape[2], z.shape[3]
        mask = torch.ones(N, 1, h, w, device=engine.device)
        mask[:, :, h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = 0.0  # 1 = keep, 0 = generate
        with ema("Plotting inpaint"):
            samples_inp, _ = engine.sample_log(
                cond=c, batch_size=N, x0=z[:N], mask=mask, **seeded()
            )
        log["samples_inpainting"] = engine.decode_first_stage(samples_inp)
        log["mask"] = mask.expand(-1, 3, -1, -1) * 2 - 1
    if concat_model:
        _inpainting_inputs(engine, batch, log, c, kwargs)
    if return_keys:
        return {k: v for k, v in log.items() if k in return_keys}
    return log


def _inpainting_inputs(
    engine: Any, batch: Mapping[str, Any], log: dict[str, torch.Tensor], c: Any, kw: dict
) -> None:
    """The mask and the masked image of an inpainting model's batch (and a slice of c_concat
    decoded, with c_concat_log_start / c_concat_log_end)."""
    conditioner = engine.conditioner
    n = log["inputs"].shape[0]
    if conditioner.masked_image_key in batch:
        masked = torch.as_tensor(batch[conditioner.masked_image_key])[:n]
        log["masked_image"] = rearrange(masked, "b h w c -> b c h w").float().to(engine.device)
    for key in conditioner.concat_keys:
        if key != conditioner.masked_image_key and key in batch:
            m = torch.as_tensor(batch[key])[:n].float()
            m = m[..., None] if m.ndim == 3 else m
            log[key] = rearrange(m, "b h w c -> b c h w").to(engine.device) * 2 - 1
    start = kw.get("c_concat_log_start", getattr(engine, "c_concat_log_start", None))
    end = kw.get("c_concat_log_end", getattr(engine, "c_concat_log_end", None))
    if start is not None and end is not None:
        log["c_concat_decoded"] = engine.decode_first_stage(c["c_concat"][0][:, start:end])
