"""Legacy import path `ldm.models.diffusion.ddim.DDIMSampler` (CompVis); see ldm.samplers.legacy."""

from ldm.samplers.legacy import DDIMSampler

__all__ = ["DDIMSampler"]
