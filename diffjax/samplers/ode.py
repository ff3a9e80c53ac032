"""Deterministic solvers of the probability-flow ODE, each a factory returning a Solver.

Notation (per step from t to t_next): alpha, sigma at t and alpha', sigma' at t_next;
lam = log(alpha / sigma) (DPM-Solver's lambda), h = lam' - lam > 0; D = denoise(x, t).
"EDM sigma" s = sigma / alpha and x~ = x / alpha are the variance-exploding view in
which the ODE reads dx~/ds = (x~ - D) / s (Karras et al. 2022, eq. 4).
"""

from __future__ import annotations

import jax.numpy as jnp

from diffjax.processes import Process
from diffjax.samplers.base import Solver, schedule_at


def _no_state(x, ts):
  return ()


def ddim_update(process: Process, x, x0, t, t_next):
  """First-order step given the data prediction x0: x' = alpha' x0 + sigma' eps_hat.

  This one rule is DDIM (eta = 0), Euler in the EDM sigma, Euler for rectified flow
  and DPM-Solver(++)-1. Written as (sigma'/sigma) x + (alpha' - alpha sigma'/sigma) x0
  it stays finite when alpha(t) = 0 (a flow starting from pure noise).
  """
  alpha, sigma, _ = schedule_at(process, t)
  alpha_n, sigma_n, _ = schedule_at(process, t_next)
  ratio = sigma_n / sigma
  return ratio * x + (alpha_n - alpha * ratio) * x0


def euler(process: Process) -> Solver:
  """Euler in the EDM sigma, identical to DDIM (eta = 0) and DPM-Solver-1. Order 1."""

  def step(denoise, x, t, t_next, state, key):
    return ddim_update(process, x, denoise(x, t), t, t_next), state

  return Solver(init=_no_state, step=step, order=1, nfe_per_step=1)


def heun(process: Process) -> Solver:
  """Heun's method in the EDM sigma (Karras et al. 2022, Algorithm 1). Order 2.

  The Euler predictor is followed by the trapezoidal corrector; on x~ = x / alpha:
  x~' = x~ + (s' - s) (d + d') / 2 with d = (x~ - D) / s. Needs alpha(t) > 0.
  """

  def step(denoise, x, t, t_next, state, key):
    alpha, sigma, _ = schedule_at(process, t)
    alpha_n, sigma_n, _ = schedule_at(process, t_next)
    s, s_n = sigma / alpha, sigma_n / alpha_n
    xs = x / alpha
    d = (xs - denoise(x, t)) / s
    xs_euler = xs + (s_n - s) * d
    d_next = (xs_euler - denoise(alpha_n * xs_euler, t_next)) / s_n
    return alpha_n * (xs + (s_n - s) * 0.5 * (d + d_next)), state

  return Solver(init=_no_state, step=step, order=2, nfe_per_step=2)


ODE_SOLVERS = {
    "euler": euler,
    "ddim": euler,
    "heun": heun,
}
