"""Samplers: solvers (ode, sde, adaptive), time grids, the driver and guidance."""

from diffjax.samplers import grids
from diffjax.samplers.adaptive import ADAPTIVE_SOLVERS
from diffjax.samplers.base import Denoiser, Solver, num_evaluations, points_for_budget, sample
from diffjax.samplers.ode import ODE_SOLVERS
from diffjax.samplers.sde import SDE_SOLVERS

SOLVERS = {**ODE_SOLVERS, **SDE_SOLVERS, **ADAPTIVE_SOLVERS}
# Solvers that step in EDM's coordinates (x / alpha, sigma / alpha), which are infinite where a process is pure noise
# (alpha = 0: rectified flow at t = 1): they cannot start there (tests/test_samplers_start.py runs every solver from
# t = 1 and finds exactly these non-finite). The others step in log-SNR with data prediction, or in t.
NEED_SIGNAL_AT_START = frozenset({"heun", "ipndm", "ipndm_v", "pndm", "lms", "euler_maruyama", "edm_stochastic"})


def start_problem(name: str, process, t_start) -> str | None:
  """Why solver ``name`` cannot start at ``t_start`` of ``process`` (pure noise there), or None."""
  if name in NEED_SIGNAL_AT_START and float(process.alpha(t_start)) <= 0.0:
    able = sorted(set(SOLVERS) - NEED_SIGNAL_AT_START - set(ADAPTIVE_SOLVERS))
    return (f"{name} steps in x / alpha, infinite at t = {float(t_start):g} where this process is pure noise "
            f"(alpha = 0); solvers that start there: {', '.join(able)}")
  return None


def make_solver(name: str, process, **options) -> Solver:
  """The solver registered as ``name`` for ``process`` (options go to its factory)."""
  if name not in SOLVERS:
    raise ValueError(f"unknown sampler {name!r}; available: {sorted(SOLVERS)}")
  return SOLVERS[name](process, **options)


__all__ = ["NEED_SIGNAL_AT_START", "Denoiser", "Solver", "SOLVERS", "grids", "make_solver", "num_evaluations",
           "points_for_budget", "sample", "start_problem"]
