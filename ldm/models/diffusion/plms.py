"""Legacy import path `ldm.models.diffusion.plms.PLMSSampler` (CompVis); see ldm.models.diffusion.facades."""

from ldm.models.diffusion.facades import PLMSSampler

__all__ = ["PLMSSampler"]
