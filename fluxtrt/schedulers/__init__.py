"""Flow-matching sigma schedules and solvers (DESIGN 3)."""

from fluxtrt.schedulers.sigmas import SCHEDULES, flux_mu, sigma_schedule, validate_sigmas
from fluxtrt.schedulers.solvers import SOLVERS, DPMSolverPP2M, EulerSolver, Solver, make_solver

__all__ = [
    "SCHEDULES",
    "SOLVERS",
    "DPMSolverPP2M",
    "EulerSolver",
    "Solver",
    "flux_mu",
    "make_solver",
    "sigma_schedule",
    "validate_sigmas",
]
