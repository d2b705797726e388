"""Legacy import path `ldm.models.diffusion.ddim.DDIMSampler` (CompVis); see ldm.models.diffusion.facades."""

from ldm.models.diffusion.facades import DDIMSampler

__all__ = ["DDIMSampler"]
