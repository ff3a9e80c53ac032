"""Samplers: solvers (ode, sde, adaptive), time grids, the driver and guidance."""

from diffjax.samplers import grids
from diffjax.samplers.adaptive import ADAPTIVE_SOLVERS
from diffjax.samplers.base import Denoiser, Solver, num_evaluations, points_for_budget, sample
from diffjax.samplers.ode import ODE_SOLVERS
from diffjax.samplers.sde import SDE_SOLVERS

SOLVERS = {**ODE_SOLVERS, **SDE_SOLVERS, **ADAPTIVE_SOLVERS}


def make_solver(name: str, process, **options) -> Solver:
  """The solver registered as ``name`` for ``process`` (options go to its factory)."""
  if name not in SOLVERS:
    raise ValueError(f"unknown sampler {name!r}; available: {sorted(SOLVERS)}")
  return SOLVERS[name](process, **options)


__all__ = ["Denoiser", "Solver", "SOLVERS", "grids", "make_solver", "num_evaluations", "points_for_budget", "sample"]
