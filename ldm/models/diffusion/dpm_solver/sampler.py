"""Legacy import path `ldm.models.diffusion.dpm_solver.sampler.DPMSolverSampler` (SD 2.x)."""

from ldm.models.diffusion.facades import DPMSolverSampler

__all__ = ["DPMSolverSampler"]
