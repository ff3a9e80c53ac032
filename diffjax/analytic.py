"""Diagonal Gaussian mixture data, for which every diffusion quantity is closed-form.

For data x0 ~ sum_k w_k N(mu_k, diag(v_k)) and x_t = alpha x0 + sigma eps, the
marginal is sum_k w_k N(alpha mu_k, alpha^2 v_k + sigma^2) and the exact denoiser is
the posterior mean

  E[x0 | x_t] = sum_k r_k(x_t) (mu_k + alpha v_k / (alpha^2 v_k + sigma^2) (x_t - alpha mu_k)),

with r_k the posterior component responsibilities. For one component (K = 1) the
probability-flow ODE is linear and its solution is closed-form too
(``gaussian_flow``). These are the oracles of the tests and of the sampler benchmark.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct


@struct.dataclass
class GaussianMixture:
  """weights (K,), means (K, d), variances (K, d): a diagonal Gaussian mixture in R^d."""

  weights: jax.Array
  means: jax.Array
  variances: jax.Array

  @classmethod
  def load(cls, path) -> GaussianMixture:
    """From an .npz with ``weights`` (K,), ``means`` (K, d), ``variances`` (K, d)."""
    with np.load(path) as f:
      missing = {"weights", "means", "variances"} - set(f.files)
      if missing:
        raise ValueError(f"{path}: missing arrays {sorted(missing)}")
      return cls.create(f["weights"], f["means"], f["variances"])

  @classmethod
  def create(cls, weights, means, variances) -> GaussianMixture:
    w, m, v = (np.asarray(a, np.float64) for a in (weights, means, variances))
    if w.ndim != 1 or m.ndim != 2 or v.shape != m.shape or m.shape[0] != w.size:
      raise ValueError(f"need weights (K,), means (K, d), variances (K, d); got {w.shape}, {m.shape}, {v.shape}")
    if np.any(w <= 0) or np.any(v <= 0):
      raise ValueError("weights and variances must be positive")
    return cls(jnp.asarray(w / w.sum()), jnp.asarray(m), jnp.asarray(v))

  @property
  def dim(self) -> int:
    return self.means.shape[1]

  def sample(self, key, n: int) -> jax.Array:
    """(n, d) samples of the data distribution."""
    k_comp, k_eps = jax.random.split(key)
    comp = jax.random.choice(k_comp, self.weights.shape[0], (n,), p=self.weights)
    eps = jax.random.normal(k_eps, (n, self.dim), self.means.dtype)
    return self.means[comp] + jnp.sqrt(self.variances[comp]) * eps

  def _log_joint(self, x, alpha, sigma):
    """(n, K) log w_k N(x; alpha mu_k, alpha^2 v_k + sigma^2) and the variances."""
    var = alpha**2 * self.variances + sigma**2  # (K, d)
    diff = x[:, None, :] - alpha * self.means[None]
    logn = -0.5 * jnp.sum(diff**2 / var + jnp.log(2 * math.pi * var), axis=-1)
    return jnp.log(self.weights) + logn, var

  def marginal_logpdf(self, x, alpha, sigma) -> jax.Array:
    """(n,) log-density of x_t = alpha x0 + sigma eps at x (n, d)."""
    return jax.nn.logsumexp(self._log_joint(x, alpha, sigma)[0], axis=-1)

  def posterior_mean(self, x, alpha, sigma) -> jax.Array:
    """(n, d) E[x0 | x_t = x]."""
    log_joint, var = self._log_joint(x, alpha, sigma)
    r = jax.nn.softmax(log_joint, axis=-1)  # (n, K)
    comp_mean = self.means[None] + (alpha * self.variances / var)[None] * (x[:, None, :] - alpha * self.means[None])
    return jnp.einsum("nk,nkd->nd", r, comp_mean)

  def denoiser(self, process):
    """The exact denoiser ``(x, t) -> E[x0 | x_t]`` of this data under ``process``."""

    def denoise(x, t):
      shape = x.shape
      x0 = self.posterior_mean(x.reshape(shape[0], -1), process.alpha(t), process.sigma(t))
      return x0.reshape(shape).astype(x.dtype)

    return denoise

  def gaussian_flow(self, x, alpha, sigma, alpha_next, sigma_next) -> jax.Array:
    """Exact probability-flow ODE map from (alpha, sigma) to (alpha', sigma'), K = 1 only.

    Each coordinate stays standardized: (x' - alpha' mu) / s' = (x - alpha mu) / s
    with s^2 = alpha^2 v + sigma^2. With sigma' = 0 this is the ODE's clean sample.
    """
    if self.weights.shape[0] != 1:
      raise ValueError("the closed-form flow exists for a single Gaussian (K = 1)")
    mu, v = self.means[0], self.variances[0]
    scale = jnp.sqrt(alpha_next**2 * v + sigma_next**2) / jnp.sqrt(alpha**2 * v + sigma**2)
    return alpha_next * mu + (x - alpha * mu) * scale
