"""Adaptive Runge-Kutta integration, fully inside jit, and the adaptive reference sampler.

``odeint`` is Dormand-Prince 5(4) (Dormand & Prince 1980; Hairer, Norsett & Wanner,
"Solving ODEs I", sec. II.5, table 5.2) with the embedded 4th-order error estimate,
local extrapolation (the 5th-order solution is propagated), first-same-as-last
(6 evaluations per step) and the standard integral step-size controller
h <- h * clip(safety * err^(-1/5), min_factor, max_factor) (ibid., II.4). The loop
is a ``lax.while_loop``: no host round trip, the state may be any pytree.

``dopri5`` wraps it as a ``Solver``: the probability-flow ODE is integrated between
grid points to a tight tolerance, the reference solution of sampler benchmarks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from diffjax.processes import Process
from diffjax.samplers.base import Solver

# Dormand-Prince 5(4): nodes C, stage matrix A (rows 2..7), 5th-order weights B (= A's
# last row: FSAL) and E = B - B4, the difference to the embedded 4th-order weights.
_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_A = (
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
_B = _A[-1] + (0.0,)
_B4 = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)
_E = tuple(b - b4 for b, b4 in zip(_B, _B4, strict=True))


class Stats(NamedTuple):
  """Work done by ``odeint``: function evaluations, accepted and rejected steps (int32)."""

  nfe: jax.Array
  accepted: jax.Array
  rejected: jax.Array


def _combine(y, h, ks, coeffs):
  """y + h * sum_j coeffs[j] * ks[j] over pytrees (zero coefficients skipped)."""
  terms = [(c, k) for c, k in zip(coeffs, ks, strict=True) if c != 0.0]
  return jax.tree.map(lambda y0, *kk: y0 + h * sum(c * k for (c, _), k in zip(terms, kk, strict=True)), y,
                      *[k for _, k in terms])


def dopri5_step(f, t, y, f0, h):
  """One Dormand-Prince step of size h (6 evaluations: f0 = f(t, y) is given, FSAL).

  Returns ``(y5, y_err, f1)``: the 5th-order solution at t + h, the difference
  y5 - y4 to the embedded 4th-order solution (local error O(h^5)) and f(t + h, y5).
  """
  ks = [f0]
  for c, a in zip(_C[1:], _A, strict=True):
    y_stage = _combine(y, h, ks, a)
    ks.append(f(t + c * h, y_stage))
  y5 = y_stage  # the last stage is evaluated at the 5th-order solution (FSAL)
  y_err = _combine(jax.tree.map(jnp.zeros_like, y), h, ks, _E)
  return y5, y_err, ks[-1]


def _rms(tree) -> jax.Array:
  leaves = jax.tree.leaves(tree)
  total = sum(jnp.sum(jnp.square(x.astype(jnp.result_type(x, jnp.float32)))) for x in leaves)
  return jnp.sqrt(total / sum(x.size for x in leaves))


def _scaled(err, y0, y1, rtol, atol):
  return jax.tree.map(lambda e, a, b: e / (atol + rtol * jnp.maximum(jnp.abs(a), jnp.abs(b))), err, y0, y1)


def _initial_step(f, t0, y0, f0, direction, rtol, atol):
  """Hairer, Norsett & Wanner (1993, II.4) starting step size; one evaluation."""
  scale = lambda tree: _rms(_scaled(tree, y0, y0, rtol, atol))
  d0, d1 = scale(y0), scale(f0)
  h0 = jnp.where((d0 < 1e-5) | (d1 < 1e-5), 1e-6, 0.01 * d0 / d1)
  y1 = jax.tree.map(lambda y, k: y + direction * h0 * k, y0, f0)
  f1 = f(t0 + direction * h0, y1)
  d2 = scale(jax.tree.map(lambda a, b: a - b, f1, f0)) / h0
  dmax = jnp.maximum(d1, d2)
  h1 = jnp.where(dmax <= 1e-15, jnp.maximum(1e-6, h0 * 1e-3), (0.01 / jnp.maximum(dmax, 1e-15)) ** 0.2)
  return jnp.minimum(100.0 * h0, h1)


def odeint(f: Callable[[jax.Array, Any], Any], y0, t0, t1, *, rtol: float = 1e-6, atol: float = 1e-6,
           max_steps: int = 10_000, first_step: float | None = None, safety: float = 0.9,
           min_factor: float = 0.2, max_factor: float = 10.0):
  """Integrates dy/dt = f(t, y) from t0 to t1 with adaptive Dormand-Prince 5(4).

  Args:
    f: ``(t, y) -> dy/dt`` with t a scalar and y a pytree (same structure out).
    y0: initial state, any pytree of float arrays.
    t0, t1: scalar start and end times; t1 < t0 integrates backwards. May be traced.
    rtol, atol: a step is accepted when the RMS over all elements of
      (y5 - y4) / (atol + rtol * max(|y_n|, |y_n+1|)) is <= 1 (one norm for the
      whole pytree, so a batch shares its step sizes).
    max_steps: cap on attempted (accepted + rejected) steps. If t1 is not reached,
      every leaf of the result is NaN, so a failure cannot pass silently.
    first_step: initial |h|; by default Hairer's estimate (one extra evaluation).
    safety, min_factor, max_factor: the controller
      h <- h * clip(safety * err^(-1/5), min_factor, max_factor); a step whose
      error is not finite is rejected with min_factor.

  Returns:
    ``(y1, stats)``: the state at t1 and ``Stats(nfe, accepted, rejected)``.
    nfe = 1 + [1 if first_step is None] + 6 * (accepted + rejected). Order 5 (global).
  """
  dtype, t0, t1, direction, f0, h, nfe0 = _start(f, y0, t0, t1, rtol, atol, first_step)
  control = dict(rtol=rtol, atol=atol, safety=safety, min_factor=min_factor, max_factor=max_factor)
  y, _, _, acc, rej = _integrate(f, y0, f0, h, t0, t1, direction, max_steps, **control)
  return y, Stats(nfe=nfe0 + 6 * (acc + rej), accepted=acc, rejected=rej)


def odeint_through(f: Callable[[jax.Array, Any], Any], y0, ts, *, rtol: float = 1e-6, atol: float = 1e-6,
                   max_steps: int = 10_000, safety: float = 0.9, min_factor: float = 0.2, max_factor: float = 10.0):
  """``odeint`` from ts[0] through every time in ts (monotone, (L,)), returning the states there.

  One integration whose steps are shortened to land on each time, not L - 1 separate ones: the
  step size and the derivative at the last state (first-same-as-last) carry from one interval to
  the next, which saves the two evaluations every ``odeint`` call spends to start and the ramp-up
  of its step size. A step shortened to reach a time does not shrink the next interval's first step.

  Returns:
    ``(ys, stats)``: ys with a leading axis L - 1 (the states at ts[1:]) and the summed ``Stats``
    (nfe = 2 + 6 * (accepted + rejected)). ``max_steps`` caps each interval; an interval that does
    not reach its end makes that state and all later ones NaN.
  """
  ts = jnp.asarray(ts)
  dtype, t0, t1, direction, f0, h, nfe0 = _start(f, y0, ts[0], ts[-1], rtol, atol, None)
  control = dict(rtol=rtol, atol=atol, safety=safety, min_factor=min_factor, max_factor=max_factor)

  def interval(carry, pair):
    y, fy, h, acc, rej = carry
    y, fy, h, a, r = _integrate(f, y, fy, h, pair[0], pair[1], direction, max_steps, **control)
    return (y, fy, h, acc + a, rej + r), y

  zero = jnp.zeros((), jnp.int32)
  (_, _, _, acc, rej), ys = jax.lax.scan(interval, (y0, f0, h, zero, zero),
                                          (ts[:-1].astype(dtype), ts[1:].astype(dtype)))
  return ys, Stats(nfe=nfe0 + 6 * (acc + rej), accepted=acc, rejected=rej)


def _start(f, y0, t0, t1, rtol, atol, first_step):
  """(dtype, t0, t1, direction, f(t0, y0), first |h|, evaluations made) of an integration from t0 to t1."""
  dtype = jnp.promote_types(jnp.result_type(*jax.tree.leaves(y0)), jnp.float32)
  t0, t1 = jnp.asarray(t0, dtype), jnp.asarray(t1, dtype)
  direction = jnp.where(t1 >= t0, 1.0, -1.0).astype(dtype)
  f0 = f(t0, y0)
  if first_step is None:
    return dtype, t0, t1, direction, f0, _initial_step(f, t0, y0, f0, direction, rtol, atol), 2
  return dtype, t0, t1, direction, f0, jnp.asarray(first_step, dtype), 1


def _integrate(f, y0, f0, h, t0, t1, direction, max_steps, *, rtol, atol, safety, min_factor, max_factor):
  """Adaptive steps from (t0, y0, f0 = f(t0, y0)) with first |h| to t1: (y1 (NaN if t1 was not reached within
  ``max_steps``), f(t1, y1), the next step's |h|, accepted, rejected)."""
  zero = jnp.zeros((), jnp.int32)

  def cond(carry):
    t, _, _, _, _, acc, rej = carry
    return (direction * (t1 - t) > 0) & (acc + rej < max_steps)

  def body(carry):
    t, y, fy, h, h_out, acc, rej = carry
    last = h >= direction * (t1 - t)
    step = jnp.where(last, t1 - t, direction * h)
    y_new, y_err, f_new = dopri5_step(f, t, y, fy, step)
    err = _rms(_scaled(y_err, y, y_new, rtol, atol))
    err = jnp.where(jnp.isfinite(err), err, jnp.inf)
    accept = err <= 1.0
    factor = jnp.clip(safety * jnp.where(err > 0, err, 1e-30) ** -0.2, min_factor, max_factor)
    h_new = jnp.abs(step) * factor
    pick = lambda a, b: jax.tree.map(lambda u, v: jnp.where(accept, u, v), a, b)
    t_new = jnp.where(accept, jnp.where(last, t1, t + step), t)
    # after an accepted step shortened to land on t1, the next interval starts from the unshortened proposal
    h_out = jnp.where(accept & last, jnp.maximum(h, h_new), h_new)
    return (t_new, pick(y_new, y), pick(f_new, fy), h_new, h_out, acc + accept, rej + (~accept))

  h = jnp.minimum(jnp.abs(h), jnp.abs(t1 - t0))
  t, y, fy, _, h_out, acc, rej = jax.lax.while_loop(cond, body, (t0, y0, f0, h, h, zero, zero))
  done = direction * (t1 - t) <= 0
  y = jax.tree.map(lambda v: jnp.where(done, v, jnp.nan), y)
  return y, fy, h_out, acc, rej


def flow_field(process: Process, denoise):
  """The probability-flow ODE as dx~/du = x~ - D(alpha(t(u)) x~, t(u)) in u = log(sigma / alpha) and
  x~ = x / alpha (``dopri5``'s variables): ``(u, x~) -> dx~/du``."""

  def field(u, xs):
    tu = process.t_from_edm_sigma(jnp.exp(u))
    return xs - denoise(process.alpha(tu) * xs, tu)

  return field


def dopri5(process: Process, rtol: float = 1e-6, atol: float = 1e-6, max_steps: int = 10_000) -> Solver:
  """Adaptive reference solver of the probability-flow ODE (Dormand-Prince 5(4)).

  Each grid step t -> t_next integrates, in u = log(sigma / alpha) and x~ = x / alpha
  (the variance-exploding view, where the ODE is dx~/ds = (x~ - D) / s, Karras et al.
  2022, eq. 4, with s = e^u):

    dx~/du = x~ - D(alpha(t(u)) x~, t(u)),    t(u) = process.t_from_edm_sigma(e^u),

  to ``rtol``/``atol`` with ``odeint`` and returns alpha(t_next) x~. Needs alpha(t) > 0
  (u is infinite at alpha = 0). The state accumulates ``Stats`` over the steps.
  nfe_per_step is None (adaptive); order 5.
  """

  def init(x, ts):
    zero = jnp.zeros((), jnp.int32)
    return Stats(zero, zero, zero)

  def step(denoise, x, t, t_next, state, key):
    u0, u1 = jnp.log(process.edm_sigma(t)), jnp.log(process.edm_sigma(t_next))
    xs, stats = odeint(flow_field(process, denoise), x / process.alpha(t), u0, u1, rtol=rtol, atol=atol,
                       max_steps=max_steps)
    return (process.alpha(t_next) * xs).astype(x.dtype), jax.tree.map(jnp.add, state, stats)

  return Solver(init=init, step=step, order=5, nfe_per_step=None)


ADAPTIVE_SOLVERS = {"dopri5": dopri5}

