"""Guidance as denoiser wrappers: nothing guidance-specific lives inside a solver.

A conditional denoiser is ``denoise(x, t, cond) -> x0_hat`` with x (B, ...) and
``cond`` any pytree whose leaves have leading dimension B (text embeddings, class
labels, ...). The wrappers return a plain ``denoise(x, t)`` for the samplers. The
guidance scale and interval may be traced values: sweeping them never recompiles.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from diffjax import parameterization
from diffjax.processes import Process


def classifier_free(denoise, cond, uncond, scale, *, process: Process | None = None,
                    interval: tuple | None = None, rescale: float = 0.0, rescale_target: str = "eps"):
  """Classifier-free guidance (Ho & Salimans 2022): D = D_u + scale (D_c - D_u).

  Both predictions come from one network call on the batch of 2B rows (x_0, x_0, x_1, x_1, ...) with
  (cond_0, uncond_0, cond_1, uncond_1, ...).
  Negative prompts are ``uncond`` set to the negative prompt's conditioning.

  Args:
    denoise: conditional denoiser ``(x, t, cond) -> x0_hat``.
    cond, uncond: conditioning pytrees, leaves (B, ...) (``uncond`` may have batch 1).
    scale: guidance scale w (1 = no guidance); scalar, may be traced.
    process: needed for ``interval`` and ``rescale``.
    interval: (sigma_lo, sigma_hi) in EDM noise level sigma/alpha: guide only where
      sigma_lo < sigma/alpha <= sigma_hi, else return D_c (Kynkaanniemi et al. 2024).
    rescale: phi of Lin et al. (2024, eq. 15-16): the guided prediction of
      ``rescale_target`` is rescaled to the per-example std of the conditional one,
      mixed with weight phi.
    rescale_target: the prediction whose std is matched (``parameterization.TARGETS``).
      Pass the network's target to match diffusers, which rescales the raw network
      output: for a v-prediction model v, not eps (the paper's models predict v).
  """
  if (interval is not None or rescale) and process is None:
    raise ValueError("classifier_free: interval and rescale need the process")

  def interleave(c, u):  # (B, ...), (B or 1, ...) -> (2B, ...) rows c_0, u_0, c_1, u_1, ...
    u = jnp.broadcast_to(u, c.shape)
    return jnp.stack([c, u], axis=1).reshape((2 * c.shape[0],) + c.shape[1:])

  def guided(x, t):
    # Each sample's two branches are neighbours in the network's batch (not [x; x]): sharded over a batch axis,
    # a device's rows stay on it (concatenation moved rows between devices at every step).
    both = jax.tree.map(interleave, cond, uncond)
    out = denoise(interleave(x, x), t, both).reshape((x.shape[0], 2) + x.shape[1:])
    d_c, d_u = out[:, 0], out[:, 1]
    d = d_u + scale * (d_c - d_u)
    if rescale:
      pred = lambda d0: parameterization.from_x0(rescale_target, d0, x, t, process)
      axes = tuple(range(1, x.ndim))
      std = lambda e: jnp.std(e, axis=axes, keepdims=True)
      p_g = pred(d)
      p_r = p_g * std(pred(d_c)) / std(p_g)
      d = parameterization.to_x0(rescale_target, rescale * p_r + (1.0 - rescale) * p_g, x, t, process)
    if interval is not None:
      s = process.edm_sigma(t)
      d = jnp.where((s > interval[0]) & (s <= interval[1]), d, d_c)
    return d

  return guided


def conditional(denoise, cond):
  """Fixes the conditioning: ``(x, t, cond) -> x0`` becomes ``(x, t) -> x0`` (no guidance)."""
  return lambda x, t: denoise(x, t, cond)
