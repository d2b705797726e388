"""Legacy import path `ldm.models.diffusion.dpm_solver.DPMSolverSampler` (SD 2.x); see
ldm.models.diffusion.facades."""

from ldm.models.diffusion.facades import DPMSolverSampler

__all__ = ["DPMSolverSampler"]
