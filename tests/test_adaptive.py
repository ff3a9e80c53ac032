"""Tests of the adaptive Dormand-Prince integrator and the dopri5 reference sampler."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from diffjax.analytic import GaussianMixture
from diffjax.processes import make_process
from diffjax.samplers import adaptive, grids
from diffjax.samplers.adaptive import dopri5, dopri5_step, odeint, odeint_through
from diffjax.samplers.base import sample

A = np.array([[-0.5, 2.0], [-2.0, -0.5]])  # decaying rotation


def _field(t, y):
  """A pytree ODE with closed-form solution: y_a' = A y_a, y_b' = cos(t) y_b."""
  return {"a": jnp.asarray(A, y["a"].dtype) @ y["a"], "b": jnp.cos(t) * y["b"]}


def _exact(y0, t0, t1):
  return {"a": scipy.linalg.expm(A * (t1 - t0)) @ np.asarray(y0["a"]),
          "b": np.asarray(y0["b"]) * np.exp(np.sin(t1) - np.sin(t0))}


def _max_err(y, ref):
  return max(float(np.max(np.abs(np.asarray(y[k]) - ref[k]))) for k in ref)


def test_tableau_is_consistent():
  for row, c in zip(adaptive._A, adaptive._C[1:], strict=True):
    assert math.isclose(sum(row), c, abs_tol=1e-14)
  assert math.isclose(sum(adaptive._B), 1.0) and math.isclose(sum(adaptive._B4), 1.0)
  # order conditions sum b c^(k-1) = 1/k, k = 1..5, for the 5th-order weights (4th for the embedded ones)
  c = np.array(adaptive._C)
  for k in range(1, 6):
    assert math.isclose(np.dot(adaptive._B, c ** (k - 1)), 1.0 / k, abs_tol=1e-14)
  for k in range(1, 5):
    assert math.isclose(np.dot(adaptive._B4, c ** (k - 1)), 1.0 / k, abs_tol=1e-14)


def test_linear_odes_reach_the_tolerance(x64):
  y0 = {"a": jnp.array([1.0, 0.5]), "b": jnp.array(1.0)}
  solve = jax.jit(odeint, static_argnames=("f", "rtol", "atol", "max_steps"))
  errors, nfes = [], []
  for tol in (1e-5, 1e-7, 1e-9):
    y, stats = solve(_field, y0, 0.0, 5.0, rtol=tol, atol=tol)
    errors.append(_max_err(y, _exact(y0, 0.0, 5.0)))
    nfes.append(int(stats.nfe))
    assert int(stats.nfe) == 2 + 6 * (int(stats.accepted) + int(stats.rejected))
    assert errors[-1] < 10 * tol, (tol, errors[-1])
  # error ~ tol and work ~ tol^(-1/5) (5th order): 100x tighter costs ~ 100^(1/5) = 2.5x the evaluations
  assert errors[0] > errors[1] > errors[2]
  assert 1.8 < nfes[1] / nfes[0] < 3.5 and 1.8 < nfes[2] / nfes[1] < 3.5, nfes
  # backwards in time, from a traced end point
  y_back, _ = jax.jit(lambda y, t1: odeint(_field, y, 5.0, t1, rtol=1e-9, atol=1e-9))(y, 0.0)
  assert _max_err(y_back, {k: np.asarray(v) for k, v in y0.items()}) < 1e-7


def test_one_integration_through_many_times_is_as_accurate_for_fewer_evaluations(x64):
  """``odeint_through`` lands on every time with ``odeint``'s accuracy, and carrying the step size and the last
  derivative across the times costs fewer evaluations than one ``odeint`` per interval."""
  y0 = {"a": jnp.array([1.0, 0.5]), "b": jnp.array(1.0)}
  ts = np.linspace(0.0, 5.0, 41)
  tol = 1e-7
  ys, stats = jax.jit(lambda y: odeint_through(_field, y, ts, rtol=tol, atol=tol))(y0)
  assert int(stats.nfe) == 2 + 6 * (int(stats.accepted) + int(stats.rejected))
  chained, y, nfe = [], y0, 0
  for t0, t1 in zip(ts[:-1], ts[1:], strict=True):
    y, st = odeint(_field, y, t0, t1, rtol=tol, atol=tol)
    chained.append(y)
    nfe += int(st.nfe)
  for i, t1 in enumerate(ts[1:]):
    exact = _exact(y0, 0.0, t1)
    assert _max_err(jax.tree.map(lambda v, i=i: v[i], ys), exact) < 10 * tol, t1  # as in the test above
    assert _max_err(chained[i], exact) < 10 * tol, t1
  assert int(stats.nfe) < 0.7 * nfe, (int(stats.nfe), nfe)
  # an interval that cannot be finished makes its state and the later ones NaN
  ys, _ = odeint_through(_field, y0, ts, rtol=1e-12, atol=1e-12, max_steps=1)
  assert all(bool(jnp.all(jnp.isnan(v[-1]))) for v in jax.tree.leaves(ys))


def test_step_size_control_rejects_and_recovers(x64):
  """A first step far too large is rejected (counted) and the result is still accurate."""
  y0 = {"a": jnp.array([1.0, 0.5]), "b": jnp.array(1.0)}
  y, stats = odeint(_field, y0, 0.0, 5.0, rtol=1e-8, atol=1e-8, first_step=5.0)
  assert int(stats.rejected) >= 1
  assert int(stats.nfe) == 1 + 6 * (int(stats.accepted) + int(stats.rejected))
  assert _max_err(y, _exact(y0, 0.0, 5.0)) < 1e-7


def test_max_steps_gives_nan():
  y, stats = odeint(_field, {"a": jnp.ones(2), "b": jnp.ones(())}, 0.0, 5.0, rtol=1e-8, atol=1e-8, max_steps=5)
  assert int(stats.accepted) + int(stats.rejected) == 5
  assert all(bool(jnp.all(jnp.isnan(v))) for v in jax.tree.leaves(y))


@pytest.mark.parametrize("case", ["linear", "riccati"])
def test_embedded_pair_orders(x64, case):
  """Local error of the 5th-order solution ~ h^6, of the embedded 4th-order one ~ h^5 (closed forms)."""
  t0 = 0.3
  if case == "linear":  # y' = cos(t) y
    f, y0, exact = lambda t, y: jnp.cos(t) * y, 1.0, lambda h: math.exp(math.sin(t0 + h) - math.sin(t0))
  else:  # y' = cos(3t) (1 + y^2): y = tan(atan(y0) + (sin 3t - sin 3t0) / 3)
    f, y0 = lambda t, y: jnp.cos(3.0 * t) * (1.0 + y**2), 0.5
    exact = lambda h: math.tan(math.atan(0.5) + (math.sin(3 * (t0 + h)) - math.sin(3 * t0)) / 3)
  y0 = jnp.float64(y0)
  hs = np.array([0.1, 0.05, 0.025])
  err5, err4 = [], []
  for h in hs:
    y5, y_err, _ = dopri5_step(f, jnp.float64(t0), y0, f(t0, y0), jnp.float64(h))
    err5.append(abs(float(y5) - exact(h)))
    err4.append(abs(float(y5 - y_err) - exact(h)))
  slope5 = np.polyfit(np.log(hs), np.log(err5), 1)[0]
  slope4 = np.polyfit(np.log(hs), np.log(err4), 1)[0]
  assert 5.7 < slope5 < 6.4, (err5, slope5)
  assert 4.8 < slope4 < 5.4, (err4, slope4)


def test_no_host_round_trip():
  jaxpr = str(jax.make_jaxpr(lambda y: odeint(_field, y, 0.0, 1.0)[0])({"a": jnp.ones(2), "b": jnp.ones(())}))
  assert "while" in jaxpr and "callback" not in jaxpr


@pytest.mark.parametrize("process_name", ["vp_linear", "edm", "ve", "sd"])
def test_dopri5_solver_matches_gaussian_flow(x64, process_name):
  """The dopri5 Solver reproduces the exact probability-flow map of Gaussian data to ~1e-6."""
  gm = GaussianMixture.create([1.0], [[1.0, -2.0]], [[0.25, 4.0]])
  process = make_process(process_name)
  ts = grids.karras(process, 4)
  x = process.prior_sample(jax.random.key(0), (64, 2), jnp.float64)
  solver = dopri5(process)
  run = jax.jit(lambda x, ts: sample(solver, gm.denoiser(process), x, ts, denoise_final=False))
  out = run(x, ts)
  exact = gm.gaussian_flow(x, process.alpha(ts[0]), process.sigma(ts[0]), process.alpha(ts[-1]),
                           process.sigma(ts[-1]))
  err = float(jnp.max(jnp.abs(out - exact)))
  assert err < 5e-6, err  # measured 2-4e-6 with rtol = atol = 1e-6
  if process_name != "vp_linear":
    return
  # tighter tolerances converge further (the map is exact up to the integrator)
  tight = jax.jit(lambda x, ts: sample(dopri5(process, rtol=1e-10, atol=1e-10), gm.denoiser(process), x, ts,
                                       denoise_final=False))(x, ts)
  assert float(jnp.max(jnp.abs(tight - exact))) < 1e-9


def test_dopri5_state_counts_work(x64):
  process = make_process("edm")
  gm = GaussianMixture.create([1.0], [[0.0]], [[1.0]])
  solver = dopri5(process)
  ts = grids.karras(process, 3)
  x = jnp.ones((2, 1))
  state, step = solver.init(x, ts), jax.jit(functools.partial(solver.step, gm.denoiser(process)))
  for t, t_next in zip(ts[:-1], ts[1:], strict=True):
    x, state = step(x, t, t_next, state, None)
  assert int(state.nfe) == 2 * 2 + 6 * (int(state.accepted) + int(state.rejected)) and int(state.accepted) >= 2
  assert solver.nfe_per_step is None and not solver.stochastic
