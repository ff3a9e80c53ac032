"""Distances between sample sets."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sliced_wasserstein(x, y, key, num_projections: int = 256):
  """Sliced 2-Wasserstein distance between equal-size sample sets x, y (n, d).

  SW2 = sqrt(E_theta W2^2(theta.x, theta.y)) over random unit directions theta, each
  1-D W2 computed exactly by sorting (Rabin et al. 2011).
  """
  if x.shape != y.shape or x.ndim != 2:
    raise ValueError(f"need two (n, d) arrays of equal shape, got {x.shape} and {y.shape}")
  theta = jax.random.normal(key, (x.shape[1], num_projections), x.dtype)
  theta = theta / jnp.linalg.norm(theta, axis=0, keepdims=True)
  px, py = jnp.sort(x @ theta, axis=0), jnp.sort(y @ theta, axis=0)
  return jnp.sqrt(jnp.mean((px - py) ** 2))
