"""Log-likelihood by the probability-flow ODE against closed forms for Gaussian data.

The ODE maps x at t_min to x(t_max) and returns log p_prior(x(t_max)) + int div F. For
Gaussian data the flow is linear and known (``GaussianMixture.gaussian_flow``: each
coordinate keeps (x - alpha mu) / s, s^2 = alpha^2 v + sigma^2), so the exact value of
what the ODE computes is the change of variables

  log p_prior(flow(x)) + sum_i log(s_i(t_max) / s_i(t_min)).

It equals the true marginal density at t_min, log N(x; alpha mu, s^2)(t_min), only when
the prior is the exact marginal at t_max (rectified flow: alpha(1) = 0, N(0, I)); for
VP/VE/EDM the prior N(0, alpha^2 + sigma^2) misses the data's mean and variance by
O(alpha(t_max)) resp. O(1 / sigma_max^2), which is no error of the solver.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tolerances

from diffjax.analytic import GaussianMixture
from diffjax.processes import make_process
from diffjax.samplers.likelihood import bits_per_dim, dequantize, log_likelihood

GM = GaussianMixture.create([1.0], [[1.0, -2.0]], [[0.25, 4.0]])


def _change_of_variables(process, x):
  """What the ODE computes, in closed form (see module docstring)."""
  a0, s0, a1, s1 = (f(t) for t in (process.t_min, process.t_max) for f in (process.alpha, process.sigma))
  v = GM.variances[0]
  x_t = GM.gaussian_flow(x, a0, s0, a1, s1)
  log_scale = 0.5 * jnp.sum(jnp.log((a1**2 * v + s1**2) / (a0**2 * v + s0**2)))
  return jax.vmap(process.prior_logp)(x_t) + log_scale


@pytest.mark.parametrize("process_name", ["vp_linear", "sub_vp", "ve", "edm", "rectified_flow"])
def test_gaussian_log_likelihood_is_exact(x64, process_name):
  process = make_process(process_name)
  x = GM.sample(jax.random.key(0), 8)
  ll = jax.jit(lambda x: log_likelihood(GM.denoiser(process), process, x, rtol=1e-6, atol=1e-6))(x)
  d = x.shape[1]
  delta_bpd = np.abs(bits_per_dim(ll, d, None) - bits_per_dim(_change_of_variables(process, x), d, None))
  # measured 2e-7 .. 5e-6; the bound of the rectified-flow case below, / (d ln 2), is ~3e-5 bits
  assert np.max(delta_bpd) < 1e-4, delta_bpd
  if process_name == "rectified_flow":  # the prior is the exact marginal at t = 1: the true density
    marginal = GM.marginal_logpdf(x, process.alpha(process.t_min), process.sigma(process.t_min))
    # GM and x are float32 (made outside x64): the solver's rtol = 1e-6 relative to |log p| (float64 run:
    # 8.6e-7) plus float32 rounding of ~32 ops relative to |log p| (the d-term log-densities, the logs and
    # the divergence accumulated over the ODE steps), both sides: 2 (1e-6 + gamma(32)) max|log p| = 4e-5.
    # Measured 4.3e-6 (0.43 x the 1e-5 once asserted); a dropped or wrong-signed term is O(1).
    np.testing.assert_allclose(ll, marginal, atol=2 * (1e-6 + tolerances.gamma(32)) * float(np.abs(marginal).max()))


# A correlated Gaussian N(mu, C) in d = 3: a non-diagonal denoiser Jacobian, so Hutchinson's
# estimator has nonzero variance (for diagonal Jacobians Rademacher probes are exact).
_Q = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))[0]
MU3, COV3 = np.array([0.5, -1.0, 2.0]), _Q @ np.diag([0.1, 1.0, 3.0]) @ _Q.T


def _correlated_denoiser(process):
  def denoise(x, t):  # E[x0 | x_t] = mu + alpha C (alpha^2 C + sigma^2 I)^-1 (x - alpha mu)
    a, s = process.alpha(t), process.sigma(t)
    cov, mu = jnp.asarray(COV3, x.dtype), jnp.asarray(MU3, x.dtype)
    gain = a * cov @ jnp.linalg.inv(a**2 * cov + s**2 * jnp.eye(3, dtype=x.dtype))
    return mu + (x - a * mu) @ gain.T

  return denoise


def _correlated_logpdf(x, alpha, sigma):
  cov = alpha**2 * COV3 + sigma**2 * np.eye(3)
  diff = np.asarray(x) - alpha * MU3
  return -0.5 * (np.einsum("bi,ij,bj->b", diff, np.linalg.inv(cov), diff) + np.log(np.linalg.det(2 * np.pi * cov)))


def test_hutchinson_averages_to_the_exact_trace(x64):
  process = make_process("rectified_flow")  # exact prior: the closed form is the marginal density
  denoise = _correlated_denoiser(process)
  x = jnp.asarray(MU3 + np.random.default_rng(1).normal(size=(4, 3)) @ np.linalg.cholesky(COV3).T)
  run = jax.jit(lambda x, key, exact: log_likelihood(denoise, process, x, key=key, exact_trace=exact,
                                                     rtol=1e-7, atol=1e-7), static_argnums=2)
  exact = run(x, None, True)
  closed = _correlated_logpdf(x, float(process.alpha(process.t_min)), float(process.sigma(process.t_min)))
  np.testing.assert_allclose(exact, closed, atol=1e-5)
  # one Rademacher probe per example and seed: unbiased, with visible spread
  estimates = jax.vmap(lambda key: run(x, key, False))(jax.random.split(jax.random.key(0), 256))
  mean, std = estimates.mean(0), estimates.std(0)
  assert np.all(std > 1e-3), std
  assert np.all(np.abs(mean - exact) < 5 * std / math.sqrt(estimates.shape[0])), (mean - exact, std)


def test_one_jit_without_host_callbacks():
  process = make_process("vp_linear")
  traces = []

  def denoise(x, t):
    traces.append(None)  # runs at trace time only
    return GM.denoiser(process)(x, t)

  fn = jax.jit(functools.partial(log_likelihood, denoise, process, exact_trace=False))
  x = GM.sample(jax.random.key(0), 4).astype(jnp.float32)
  jaxpr = str(jax.make_jaxpr(fn)(x, key=jax.random.key(1)))
  assert "while" in jaxpr and "callback" not in jaxpr
  n_traces = len(traces)
  a = fn(x, key=jax.random.key(1))
  b = fn(x + 0.1, key=jax.random.key(2))
  assert len(traces) == n_traces and np.all(np.isfinite(a)) and np.all(np.isfinite(b))  # no retrace


@pytest.mark.parametrize("data_range", [(-1.0, 1.0), (0.0, 1.0)])
def test_bits_per_dim_convention(data_range):
  lo, hi = data_range
  d = 12
  # float32 results near 8: ~3 roundings of the O(1) term -log p / (D log 2) (3.6e-7) plus the result's own
  # rounding to float32 (ulp(8) = 9.5e-7) stay within 2 ulp(8) = 1.9e-6 (measured: exact); an offset bug is >= 1
  tol = 2 * float(np.spacing(np.float32(8.0)))
  # A uniform density on [lo, hi)^d is the uniform distribution over 256 levels: 8 bits.
  assert math.isclose(float(bits_per_dim(-d * math.log(hi - lo), d, data_range)), 8.0, abs_tol=tol)
  # the offset is log2(256 / (hi - lo)): 7 for [-1, 1], 8 for [0, 1]; None: continuous bpd
  assert math.isclose(float(bits_per_dim(0.0, d, data_range)), 8.0 - math.log2(hi - lo), abs_tol=tol)
  assert math.isclose(float(bits_per_dim(-d * math.log(2.0), d, None)), 1.0, abs_tol=tol)
  # dequantization: pixel k lands uniformly in its bin [k, k + 1) / 256 of the range
  k = jnp.arange(256.0)
  x = lo + (hi - lo) * k / 255.0
  y = jax.vmap(lambda key: dequantize(key, x, data_range))(jax.random.split(jax.random.key(0), 200))
  z = (y - lo) / (hi - lo) * 256.0
  assert np.all(np.floor(z) == k)
  np.testing.assert_allclose(z.mean(0) - k, 0.5, atol=0.1)
