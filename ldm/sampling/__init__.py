"""Sampling commands (txt2img / img2img / inpaint), PNG metadata and memory-light VAE decoding."""
