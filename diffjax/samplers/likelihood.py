"""Exact log-likelihood through the probability-flow ODE, and bits per dimension.

The probability-flow ODE (Song et al. 2021, eq. 13) in process coordinates,

  dx/dt = F(x, t) = f(t) x - g(t)^2 / 2 * score(x, t),   score = (alpha D - x) / sigma^2,

maps the marginal at t_min to the marginal at t_max, and along a trajectory
d log p_t(x(t)) / dt = -div F (instantaneous change of variables; Chen et al. 2018,
Grathwohl et al. 2019). Hence

  log p_{t_min}(x) = log p_prior(x(t_max)) + int_{t_min}^{t_max} div F(x(t), t) dt,

exact up to the prior's mismatch with the true marginal at t_max and the ODE solver.
With f = alpha'/alpha and g^2 = 2 sigma sigma' - 2 f sigma^2 the field is
F = alpha' D + (sigma'/sigma) (x - alpha D), and its divergence needs only the trace of
the denoiser's Jacobian: div F = d sigma'/sigma + (alpha' - alpha sigma'/sigma) tr(dD/dx).
This form stays finite where alpha = 0 (rectified flow at t = 1), where f x and g^2 score
are separately infinite. Unlike score_sde's scipy loop the whole computation, ODE
included, is one jitted function (``adaptive.odeint``, a lax.while_loop).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from diffjax.processes import Process
from diffjax.samplers.adaptive import odeint
from diffjax.samplers.base import Denoiser

EXACT_TRACE_MAX_DIM = 32


def _derivative(fn, t):
  return jax.jvp(fn, (t,), (jnp.ones_like(t),))[1]


def _schedule_derivatives(process, t):
  """(alpha, d alpha/dt, d log sigma/dt); alpha' from the left where alpha(t) = 0 (the end of a flow)."""
  alpha = process.alpha(t)
  t_safe = jnp.where(alpha > 0, t, jnp.nextafter(t, jnp.asarray(-jnp.inf, t.dtype)))
  return alpha, _derivative(process.alpha, t_safe), _derivative(process.log_sigma, t)


def _probes(x, key, exact, num_probes):
  """Tangents (P, B, ...) and weights: the d basis vectors (exact trace) or Rademacher probes."""
  d = math.prod(x.shape[1:])
  if exact:
    basis = jnp.eye(d, dtype=x.dtype).reshape((d, 1) + x.shape[1:])
    return jnp.broadcast_to(basis, (d,) + x.shape), 1.0
  if key is None:
    raise ValueError("Hutchinson's trace estimator needs key=jax.random.key(seed) (or exact_trace=True)")
  return jax.random.rademacher(key, (num_probes,) + x.shape, x.dtype), 1.0 / num_probes


def log_likelihood(denoise: Denoiser, process: Process, x, *, key=None, t_min=None, t_max=None,
                   exact_trace=None, num_probes: int = 1, rtol: float = 1e-5, atol: float = 1e-5,
                   max_steps: int = 10_000):
  """Per-example log p(x) in nats by the probability-flow ODE (Song et al. 2021, sec. 4.3, app. D.2).

  Args:
    denoise: ``(x, t) -> E[x0 | x_t]`` on batches (B, ...); examples must not interact
      (the trace of each example's Jacobian is read off batched Jacobian-vector products).
    process: the noise process.
    x: (B, ...) data, taken as x at t_min (its density there is what is returned).
    key: PRNG key for Hutchinson's probes (unused with the exact trace).
    t_min, t_max: integration range, default process.t_min, process.t_max. The prior
      N(0, prior_std^2) is the process's at t_max (``dataclasses.replace(process, t_max=...)``).
    exact_trace: trace of dD/dx exactly with d Jacobian-vector products (one per basis
      vector, as jax.jacfwd) if True; Hutchinson's estimator E[v^T (dD/dx) v] with
      ``num_probes`` Rademacher probes per example if False (Hutchinson 1989;
      Grathwohl et al. 2019), the probes fixed over the whole solve (unbiased for the
      integral). Default: exact when d <= 32.
    num_probes: probes for Hutchinson's estimator; cost per ODE evaluation is
      num_probes (or d) batched JVPs of the denoiser.
    rtol, atol: tolerances of the Dormand-Prince solve of (x, log-density change).
    max_steps: step cap of the solve; exceeding it gives NaN.

  Returns:
    (B,) log p_{t_min}(x) in nats, the density of x under the model's marginal at t_min
    (= log p_prior(x(t_max)) + the divergence integral). jit-compatible, no host callbacks.
  """
  t_min = process.t_min if t_min is None else t_min
  prior = process if t_max is None else dataclasses.replace(process, t_max=t_max)
  exact = math.prod(x.shape[1:]) <= EXACT_TRACE_MAX_DIM if exact_trace is None else exact_trace
  probes, weight = _probes(x, key, exact, num_probes)
  d = math.prod(x.shape[1:])
  sum_dims = lambda a: jnp.sum(a.reshape(a.shape[0], -1), axis=-1)

  def field(t, state):
    y, _ = state
    alpha, dalpha, dlog_sigma = _schedule_derivatives(process, t)
    x0, jvps = jax.vmap(lambda v: jax.jvp(lambda z: denoise(z, t), (y,), (v,)), out_axes=(None, 0))(probes)
    trace = weight * jnp.sum(jax.vmap(sum_dims)(probes * jvps), axis=0)
    velocity = dalpha * x0 + dlog_sigma * (y - alpha * x0)
    divergence = d * dlog_sigma + (dalpha - alpha * dlog_sigma) * trace
    return velocity.astype(y.dtype), divergence.astype(y.dtype)

  delta0 = jnp.zeros(x.shape[:1], x.dtype)
  (x_t, delta), _ = odeint(field, (x, delta0), t_min, prior.t_max, rtol=rtol, atol=atol, max_steps=max_steps)
  return jax.vmap(prior.prior_logp)(x_t) + delta


def bits_per_dim(log_likelihood, num_dims: int, data_range=(-1.0, 1.0), num_bins: int = 256):
  """Bits per dimension of discrete data from a continuous log-likelihood (nats).

  Convention: ``num_bins``-level data (8-bit: 256) scaled to ``data_range`` = (lo, hi),
  e.g. (-1, 1) or (0, 1), with bins of width (hi - lo) / num_bins covering [lo, hi) and
  uniform dequantization within a bin (``dequantize``). The scaling z -> lo + (hi - lo) z /
  num_bins from the bin index space [0, num_bins)^D has log-Jacobian D log((hi - lo) /
  num_bins), so

    bpd = -(log p(x) + D log((hi - lo) / num_bins)) / (D log 2)
        = -log p(x) / (D log 2) + log2(num_bins) - log2(hi - lo),

  i.e. +7 for 8-bit data in [-1, 1] and +8 in [0, 1] (score_sde's offset); with
  dequantized x it upper-bounds the discrete model's bpd in expectation (Theis et al.
  2016). ``data_range=None``: continuous data, bpd = -log p / (D log 2).
  """
  bpd = -jnp.asarray(log_likelihood) / (num_dims * math.log(2.0))
  if data_range is None:
    return bpd
  lo, hi = data_range
  return bpd + math.log2(num_bins) - math.log2(hi - lo)


def dequantize(key, x, data_range=(-1.0, 1.0), num_bins: int = 256):
  """Uniform dequantization of ``num_bins``-level data scaled to ``data_range`` (see ``bits_per_dim``).

  x holds values lo + (hi - lo) k / (num_bins - 1), k in {0, ..., num_bins - 1} (e.g.
  pixels / 127.5 - 1); returns lo + (hi - lo) (k + u) / num_bins with u ~ U[0, 1), i.e.
  score_sde's (255 x + u) / 256 in [0, 1]. Shape and dtype of x.
  """
  lo, hi = data_range
  k = jnp.round((x - lo) / (hi - lo) * (num_bins - 1))
  u = jax.random.uniform(key, x.shape, x.dtype)
  return (lo + (hi - lo) * (k + u) / num_bins).astype(x.dtype)
