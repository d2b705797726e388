"""The composed diffusion engine: conditioner, denoiser, guider, sampling defaults and the one
generation path (``generate``) that every way of making images goes through."""
