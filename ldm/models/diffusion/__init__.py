"""CompVis import paths: ``ddpm`` (DDPM, LatentDiffusion, LatentInpaintDiffusion, translated into
``ldm.engine.DiffusionEngine``), ``ddim`` / ``plms`` / ``dpm_solver`` (sampler facades)."""
