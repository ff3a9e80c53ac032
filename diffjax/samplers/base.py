"""The solver interface and the one driver that runs every solver.

Conventions (shared by every solver in ``ode.py`` and ``sde.py``):

* A **denoiser** is a callable ``denoise(x, t) -> x0_hat``: ``x`` has shape (B, ...)
  in the process's own coordinates (x_t = alpha(t) x0 + sigma(t) eps), ``t`` is a
  scalar process time, and the result is the estimate of E[x0 | x_t], shape of x.
  Raw networks become denoisers through ``diffjax.parameterization``; guidance is a
  denoiser wrapper (``diffjax.samplers.guidance``).
* A **time grid** ``ts`` is a 1-D array of N process times with decreasing noise
  (``diffjax.samplers.grids``). It lists the noise levels the sampler visits; clean
  data (sigma = 0) is not a grid point.
* A **solver** is a pair of pure functions over an explicit state pytree:
  ``init(x, ts) -> state`` and ``step(denoise, x, t, t_next, state, key) -> (x, state)``
  taking x from time t to t_next (multistep history lives in ``state``).
* ``sample`` runs the N - 1 steps between grid points with ``lax.scan`` and then,
  with ``denoise_final=True``, returns D(x, ts[-1]): the final jump to sigma = 0,
  which is what every first-order or "lower order final" step to sigma = 0 reduces
  to (DDIM with alpha_bar = 1, Euler/Heun to sigma = 0, DPM-Solver++ to sigma = 0).
  So a grid of N points costs (N - 1) * nfe_per_step + 1 denoiser evaluations.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array
Denoiser = Callable[[Array, Array], Array]


class Solver(NamedTuple):
  """A sampler's update rule as pure functions (see module docstring).

  Attributes:
    init: ``(x, ts) -> state``; x (B, ...) at ts[0], ts the whole (N,) grid.
    step: ``(denoise, x, t, t_next, state, key) -> (x_next, state)``.
    order: declared convergence order of the global error (for ODE solvers), or
      the strong/weak order for SDE solvers; tests measure it.
    nfe_per_step: denoiser evaluations per step; None when adaptive (variable).
    stochastic: whether ``step`` needs a PRNG key.
    warmup_nfe: evaluations the first step makes beyond ``nfe_per_step`` (PNDM's
      Heun start), counted once per ``sample``.
  """

  init: Callable[[Array, Array], Any]
  step: Callable[..., tuple[Array, Any]]
  order: int
  nfe_per_step: int | None
  stochastic: bool = False
  warmup_nfe: int = 0


def sample(solver: Solver, denoise: Denoiser, x: Array, ts: Array, *,
           key: Array | None = None, denoise_final: bool = True) -> Array:
  """Runs ``solver`` along the grid ``ts`` from ``x`` (at ts[0]) towards clean data.

  Args:
    solver: a ``Solver``.
    denoise: ``(x, t) -> x0_hat`` (see module docstring).
    x: (B, ...) initial state at time ts[0] in process coordinates, e.g.
      ``process.prior_sample(key, shape)``.
    ts: (N,) process times, noise decreasing, N >= 1.
    key: PRNG key, required by stochastic solvers; split once per step.
    denoise_final: if True return D(x, ts[-1]) (the sample at sigma = 0), else
      the state at ts[-1].

  Returns:
    (B, ...) samples. jit-compatible; ``ts`` and ``key`` may be traced, so sweeping
    grids and seeds does not recompile.
  """
  ts = jnp.asarray(ts)
  if ts.ndim != 1 or ts.shape[0] < 1:
    raise ValueError(f"ts must be a 1-D array of at least one time, got shape {ts.shape}")
  if solver.stochastic and key is None:
    raise ValueError("this solver is stochastic: pass key=jax.random.key(seed)")
  n_steps = ts.shape[0] - 1
  keys = jax.random.split(key, max(n_steps, 1))[:n_steps] if key is not None else None

  def body(carry, inputs):
    x, state = carry
    t, t_next, step_key = inputs
    x, state = solver.step(denoise, x, t, t_next, state, step_key)
    return (x, state), None

  if n_steps > 0:
    state = solver.init(x, ts)
    (x, _), _ = jax.lax.scan(body, (x, state), (ts[:-1], ts[1:], keys))
  return denoise(x, ts[-1]) if denoise_final else x


def num_evaluations(solver: Solver, num_points: int, denoise_final: bool = True) -> int:
  """Denoiser evaluations of ``sample`` on a grid of ``num_points`` (fixed-step solvers)."""
  if solver.nfe_per_step is None:
    raise ValueError("adaptive solver: the number of evaluations is not known in advance")
  steps = num_points - 1
  return steps * solver.nfe_per_step + (solver.warmup_nfe if steps else 0) + int(denoise_final)


def points_for_budget(solver: Solver, nfe: int, denoise_final: bool = True) -> int:
  """The largest grid size whose ``sample`` cost stays within ``nfe`` evaluations (at least 1)."""
  n = 1
  while num_evaluations(solver, n + 1, denoise_final) <= nfe:
    n += 1
  return n


def schedule_at(process, t):
  """(alpha, sigma, lam) at time t, lam = log(alpha / sigma) (DPM-Solver's lambda)."""
  log_alpha, log_sigma = process.log_alpha(t), process.log_sigma(t)
  return jnp.exp(log_alpha), jnp.exp(log_sigma), log_alpha - log_sigma
