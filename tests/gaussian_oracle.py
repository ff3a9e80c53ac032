"""Gaussian data as an oracle for pipelines: its exact denoiser and its exact probability-flow map.

For data x0 ~ N(mu, C) with C = U diag(l) U^T and x_t = alpha x0 + sigma eps, the denoiser is
E[x0 | x_t] = mu + U diag(alpha l / (alpha^2 l + sigma^2)) U^T (x_t - alpha mu), and along the
probability-flow ODE each eigen-coordinate of (x_t - alpha mu) / sqrt(alpha^2 l + sigma^2) is
constant, so the flow from (alpha0, sigma0) to (alpha1, sigma1) is an affine map in closed form.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from diffjax import pipelines


def gaussian_pipeline(process, mu: np.ndarray, cov: np.ndarray, latent_channels: int = 1) -> pipelines.Pipeline:
  """A Pipeline whose network is the exact denoiser of N(mu, cov) (target x0), with a dummy text side.

  x (B, h, w, c) is flattened to (B, D), D = len(mu) = h w c.
  """
  lam, u = np.linalg.eigh(cov)
  mu_j, lam_j, u_j = (jnp.asarray(a, jnp.float32) for a in (mu, lam, u))
  d = len(mu)

  def predict(params, x, t, context):
    alpha, sigma = process.alpha(t[0]), process.sigma(t[0])
    flat = x.reshape(x.shape[0], d) - alpha * mu_j
    x0 = mu_j + ((flat @ u_j) * (alpha * lam_j / (alpha**2 * lam_j + sigma**2))) @ u_j.T
    return x0.reshape(x.shape)

  def tokenize(prompts):
    ids = np.zeros((len(prompts), 1), np.int32)
    return ids, ids

  return pipelines.Pipeline(tokenize=tokenize, encode_text=lambda p, ids, m: jnp.zeros((ids.shape[0], 1, 1)),
                            predict=predict, process=process, target="x0", latent_channels=latent_channels)


def flow_map(mu: np.ndarray, cov: np.ndarray, x: np.ndarray, start: tuple, end: tuple) -> np.ndarray:
  """The probability-flow ODE's exact map of x (B, D) from (alpha, sigma) = ``start`` to ``end`` (float64)."""
  lam, u = np.linalg.eigh(cov)
  (a0, s0), (a1, s1) = start, end
  scale = np.sqrt((a1**2 * lam + s1**2) / (a0**2 * lam + s0**2))
  return a1 * mu + ((x - a0 * mu) @ u * scale) @ u.T
