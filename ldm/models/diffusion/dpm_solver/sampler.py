"""Legacy import path `ldm.models.diffusion.dpm_solver.sampler.DPMSolverSampler` (SD 2.x)."""

from ldm.samplers.legacy import DPMSolverSampler

__all__ = ["DPMSolverSampler"]
