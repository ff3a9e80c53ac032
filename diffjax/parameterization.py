"""Prediction targets and the conversions between them; EDM preconditioning.

A network predicts one of these targets from (x_t, t); for x_t = alpha x0 + sigma eps
(alpha, sigma, and their time derivatives alpha', sigma' from the process):

  "eps"      eps                                   (Ho et al. 2020)
  "x0"       x0
  "v"        alpha eps - sigma x0                  (Salimans & Ho 2022)
  "score"    grad log p(x_t) = -eps / sigma        (Song et al. 2021)
  "velocity" dx_t/dt = alpha' x0 + sigma' eps      (flow matching; Lipman et al. 2023)

``to_x0`` and ``from_x0`` are exact inverses of each other at fixed (x_t, t), for any
process (the "v" formula uses alpha^2 + sigma^2 and so holds beyond VP).
``as_denoiser`` turns a raw network into the ``denoise(x, t) -> x0`` of the samplers.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from diffjax.processes import Process

TARGETS = ("eps", "x0", "v", "score", "velocity")


def _rates(process: Process, t):
  """alpha, sigma, alpha' = d alpha/dt, sigma' = d sigma/dt at t."""
  t = jnp.asarray(t, jnp.result_type(t, float))
  alpha, d_alpha = jax.jvp(process.alpha, (t,), (jnp.ones_like(t),))
  sigma, d_sigma = jax.jvp(process.sigma, (t,), (jnp.ones_like(t),))
  return alpha, sigma, d_alpha, d_sigma


def _bcast(c, x):
  """Broadcasts per-example (B,) or scalar coefficients against x (B, ...)."""
  c = jnp.asarray(c)
  return c.reshape(c.shape + (1,) * (x.ndim - c.ndim)).astype(x.dtype)


def _check(target):
  if target not in TARGETS:
    raise ValueError(f"unknown prediction target {target!r}; choose from {TARGETS}")


def to_x0(target: str, prediction, x, t, process: Process):
  """The data estimate x0 implied by ``prediction`` of ``target`` at (x, t).

  Args:
    prediction, x: (B, ...). t: scalar or (B,) process times.
  """
  _check(target)
  alpha, sigma, d_alpha, d_sigma = (_bcast(c, x) for c in _rates(process, t))
  if target == "x0":
    return prediction
  if target == "eps":
    return (x - sigma * prediction) / alpha
  if target == "v":
    return (alpha * x - sigma * prediction) / (alpha**2 + sigma**2)
  if target == "score":
    return (x + sigma**2 * prediction) / alpha
  # velocity u = alpha' x0 + sigma' (x - alpha x0) / sigma
  return (sigma * prediction - d_sigma * x) / (sigma * d_alpha - d_sigma * alpha)


def from_x0(target: str, x0, x, t, process: Process):
  """The value of ``target`` implied by the data estimate ``x0`` at (x, t); inverse of ``to_x0``."""
  alpha, sigma = (_bcast(c, x) for c in (process.alpha(t), process.sigma(t)))
  return target_from_clean(target, x0, (x - alpha * x0) / sigma, t, process)


def target_from_clean(target: str, x0, eps, t, process: Process):
  """The regression target for a training pair (x0, eps) at t (no division by sigma)."""
  _check(target)
  alpha, sigma, d_alpha, d_sigma = (_bcast(c, x0) for c in _rates(process, t))
  return {
      "x0": x0,
      "eps": eps,
      "v": alpha * eps - sigma * x0,
      "score": -eps / sigma,
      "velocity": d_alpha * x0 + d_sigma * eps,
  }[target]


def x0_error_scale(target: str, t, process: Process):
  """k(t) with |target_hat - target| = k(t) |x0_hat - x0| at fixed x_t (per element).

  Used by the losses to express any weighting on x0-space errors in the target's space.
  """
  _check(target)
  alpha, sigma, d_alpha, d_sigma = _rates(process, t)
  return {
      "x0": jnp.ones_like(alpha),
      "eps": alpha / sigma,
      "v": (alpha**2 + sigma**2) / sigma,
      "score": alpha / sigma**2,
      "velocity": jnp.abs(d_alpha - d_sigma * alpha / sigma),
  }[target]


def as_denoiser(net: Callable, target: str, process: Process):
  """Wraps ``net(x, t) -> prediction of target`` into ``denoise(x, t) -> x0``.

  ``t`` may be a scalar (as the samplers pass it); it is broadcast to (B,) for the net.
  """
  _check(target)

  def denoise(x, t):
    t_batch = jnp.broadcast_to(jnp.asarray(t), x.shape[:1])
    return to_x0(target, net(x, t_batch), x, t_batch, process)

  return denoise


def edm_preconditioning(sigma, sigma_data=0.5):
  """Karras et al. (2022), Table 1: (c_skip, c_out, c_in, c_noise) at EDM noise level sigma."""
  var = sigma**2 + sigma_data**2
  return sigma_data**2 / var, sigma * sigma_data / jnp.sqrt(var), 1.0 / jnp.sqrt(var), 0.25 * jnp.log(sigma)


def edm_denoiser(net: Callable, process: Process, sigma_data=0.5):
  """EDM preconditioning as a wrapper: raw ``net(x_in, c_noise) -> F`` becomes a denoiser.

  In the variance-exploding view x~ = x / alpha with s = sigma / alpha,
  D(x, t) = c_skip(s) x~ + c_out(s) F(c_in(s) x~, c_noise(s)) (Karras et al. 2022, eq. 7),
  for any process. ``net`` receives x_in (B, ...) and c_noise (B,).
  """

  def denoise(x, t):
    t_batch = jnp.broadcast_to(jnp.asarray(t), x.shape[:1])
    alpha, s = process.alpha(t_batch), process.edm_sigma(t_batch)
    c_skip, c_out, c_in, c_noise = edm_preconditioning(s, sigma_data)
    xs = x / _bcast(alpha, x)
    return _bcast(c_skip, x) * xs + _bcast(c_out, x) * net(_bcast(c_in, x) * xs, c_noise)

  return denoise
