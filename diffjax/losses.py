"""Per-example denoising losses, their weightings, and training-time samplers of t.

Every weighting is a weight w(t) on the squared error of the implied data estimate,
|x0_hat - x0|^2 (Kingma & Gao 2023 write all diffusion losses this way). The loss is
computed in the network's own target space, where it is numerically benign:

  loss(x0, eps, t) = w(t) / k(t)^2 * mean |target_hat - target|^2,

with k(t) = ``parameterization.x0_error_scale`` (|target error| = k |x0 error|), so
the same weighting gives the same objective whatever the network predicts.

Weightings (on x0 errors):
  "uniform"   k(t)^2: the plain MSE in the target's space (e.g. DDPM's "simple" loss for eps)
  "snr"       SNR(t) = alpha^2 / sigma^2 (equals the eps MSE)
  "min_snr"   min(SNR(t), gamma) (Hang et al. 2023, eq. 9; gamma = 5)
  "edm"       (s^2 + sigma_data^2) / (s sigma_data)^2, s = sigma / alpha (Karras et al. 2022, eq. 8)
  "elbo"      -1/2 dSNR/dt: the continuous-time ELBO for t ~ uniform (Kingma et al. 2021,
              eq. 17), equal to Song et al.'s (2021) likelihood weighting g^2 up to a factor 2
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from diffjax import parameterization
from diffjax.processes import Process

WEIGHTINGS = ("uniform", "snr", "min_snr", "edm", "elbo")


def x0_weight(weighting: str, t, process: Process, *, target: str = "eps", gamma: float = 5.0,
              sigma_data: float = 0.5):
  """w(t), the weight on |x0_hat - x0|^2 of ``weighting`` (see module docstring)."""
  t = jnp.asarray(t, jnp.result_type(t, float))
  if weighting == "uniform":
    return parameterization.x0_error_scale(target, t, process) ** 2
  if weighting == "snr":
    return jnp.exp(process.log_snr(t))
  if weighting == "min_snr":
    return jnp.minimum(jnp.exp(process.log_snr(t)), gamma)
  if weighting == "edm":
    s = process.edm_sigma(t)
    return (s**2 + sigma_data**2) / (s * sigma_data) ** 2
  if weighting == "elbo":
    snr = lambda u: jnp.exp(process.log_snr(u))
    return -0.5 * jax.jvp(snr, (t,), (jnp.ones_like(t),))[1]
  raise ValueError(f"unknown loss weighting {weighting!r}; choose from {WEIGHTINGS}")


def denoising_loss(predict, x0, eps, t, process: Process, *, target: str = "eps", weighting: str = "uniform",
                   **weighting_options):
  """Per-example weighted denoising loss.

  Args:
    predict: ``(x_t, t) -> prediction`` of ``target``, x_t (B, ...), t (B,).
    x0: (B, ...) clean data. eps: (B, ...) standard normal noise. t: (B,) times.
    process: the noise process; x_t = alpha(t) x0 + sigma(t) eps.
    target: what ``predict`` outputs (``parameterization.TARGETS``).
    weighting: one of ``WEIGHTINGS``; ``weighting_options``: gamma, sigma_data.

  Returns:
    (B,) losses: w(t) / k(t)^2 times the mean over elements of the squared target error.
  """
  bcast = lambda c: c.reshape(c.shape + (1,) * (x0.ndim - 1))
  x_t = bcast(process.alpha(t)) * x0 + bcast(process.sigma(t)) * eps
  regression_target = parameterization.target_from_clean(target, x0, eps, t, process)
  diff = predict(x_t, t) - regression_target
  diff = diff.astype(jnp.promote_types(diff.dtype, jnp.float32))  # bf16 predictions: reduce in f32
  err = jnp.mean(diff**2, axis=tuple(range(1, x0.ndim)))
  w = x0_weight(weighting, t, process, target=target, **weighting_options)
  return w / parameterization.x0_error_scale(target, t, process) ** 2 * err


# ----------------------------------------------------------------------------------
# Training-time samplers of t, each (key, shape, process, ...) -> times in [t_min, t_max].
# ----------------------------------------------------------------------------------
def uniform_time(key, shape, process: Process, t_min=None, t_max=None):
  """t ~ U[t_min, t_max] (defaults: the process's range)."""
  t_min = process.t_min if t_min is None else t_min
  t_max = process.t_max if t_max is None else t_max
  return jax.random.uniform(key, shape, minval=t_min, maxval=t_max)


def log_normal_time(key, shape, process: Process, p_mean=-1.2, p_std=1.2):
  """EDM's ln(sigma / alpha) ~ N(p_mean, p_std^2) (Karras et al. 2022, Table 1), as times.

  Noise levels outside the process's range are clipped to [t_min, t_max].
  """
  s = jnp.exp(p_mean + p_std * jax.random.normal(key, shape))
  return jnp.clip(process.t_from_edm_sigma(s), process.t_min, process.t_max)


def logit_normal_time(key, shape, process: Process, mean=0.0, std=1.0):
  """SD3's logit-normal: u = sigmoid(N(mean, std^2)), t = t_min + u (t_max - t_min) (Esser et al. 2024)."""
  u = jax.nn.sigmoid(mean + std * jax.random.normal(key, shape))
  return process.t_min + u * (process.t_max - process.t_min)


TIME_SAMPLERS = {"uniform": uniform_time, "log_normal": log_normal_time, "logit_normal": logit_normal_time}
