"""Legacy import path `ldm.models.diffusion.dpm_solver.DPMSolverSampler` (SD 2.x); see
ldm.samplers.legacy."""

from ldm.samplers.legacy import DPMSolverSampler

__all__ = ["DPMSolverSampler"]
