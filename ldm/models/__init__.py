"""LightningModules: autoencoders (KL, VQ) and diffusion models (DDPM, LatentDiffusion, ...)."""
