"""Legacy import path `ldm.models.diffusion.plms.PLMSSampler` (CompVis); see ldm.samplers.legacy."""

from ldm.samplers.legacy import PLMSSampler

__all__ = ["PLMSSampler"]
