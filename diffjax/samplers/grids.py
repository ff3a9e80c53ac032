"""Time grids: (N,) arrays of process times with decreasing noise.

A grid lists the noise levels a sampler visits; ``sample`` adds the final jump to
clean data. Every function is pure jnp, so its numeric arguments (sigma_min,
sigma_max, rho, ...) may be traced: sweeping them inside ``jax.jit`` never
recompiles. Ranges default to the process's ``t_max`` .. ``t_min``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from diffjax.processes import Process


def _range(process, t_start, t_end):
  return (process.t_max if t_start is None else t_start,
          process.t_min if t_end is None else t_end)


def _needs_signal(process, t_start, grid: str) -> None:
  """ValueError if ``t_start`` is pure noise (alpha = 0, as rectified flow's t = 1): a grid spaced in log-SNR or
  in sigma / alpha cannot start there (-inf, inf). Checked where the values are concrete (not under jit)."""
  alpha = process.alpha(t_start)
  if not isinstance(alpha, jax.core.Tracer) and float(alpha) <= 0.0:
    raise ValueError(f"the {grid} grid is spaced in log-SNR (sigma / alpha), which is infinite at t_start = "
                     f"{float(t_start):g}, where this process is pure noise (alpha = 0): use uniform_t or "
                     f"quadratic_t, or start below it")


def uniform_t(process: Process, n: int, t_start=None, t_end=None):
  """Uniform in process time t from t_start (default t_max) to t_end (default t_min)."""
  t_start, t_end = _range(process, t_start, t_end)
  return jnp.linspace(t_start, t_end, n)


def quadratic_t(process: Process, n: int, t_start=None, t_end=None):
  """Quadratic in t (DDIM's "quad"): dense near t_end, t = t_end + (t_start - t_end) u^2."""
  t_start, t_end = _range(process, t_start, t_end)
  u = jnp.linspace(1.0, 0.0, n)
  return t_end + (t_start - t_end) * u**2


def log_snr_uniform(process: Process, n: int, t_start=None, t_end=None):
  """Uniform in log-SNR (DPM-Solver's "logSNR" spacing). Needs alpha(t_start) > 0."""
  t_start, t_end = _range(process, t_start, t_end)
  _needs_signal(process, t_start, "log_snr")
  lam = jnp.linspace(process.log_snr(t_start), process.log_snr(t_end), n)
  return process.t_from_log_snr(lam)


def karras(process: Process, n: int, sigma_min=None, sigma_max=None, rho=7.0):
  """Karras et al. (2022, eq. 5) in the EDM noise level sigma/alpha, rho-warped.

  sigma_i = (s_max^(1/rho) + i/(n-1) (s_min^(1/rho) - s_max^(1/rho)))^rho; sigma_min
  and sigma_max default to the process's range (which must have alpha(t_max) > 0).
  """
  if sigma_min is None:
    sigma_min = process.edm_sigma(process.t_min)
  if sigma_max is None:
    _needs_signal(process, process.t_max, "karras")
    sigma_max = process.edm_sigma(process.t_max)
  u = jnp.linspace(0.0, 1.0, n)
  inv_rho = 1.0 / rho
  sigmas = (sigma_max**inv_rho + u * (sigma_min**inv_rho - sigma_max**inv_rho)) ** rho
  return process.t_from_edm_sigma(sigmas)


# Align Your Steps (Sabour, Fidler & Kreis, ICML 2024): the published 10-step schedules, in EDM sigma,
# optimised for Stable Diffusion 1.5 and SDXL (11 values; the last is the model's sigma_min, which the
# paper's samplers replace by 0: the final jump to clean data).
AYS_SIGMAS = {
    "sd15": (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029),
    "sdxl": (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029),
}


def align_your_steps(process: Process, n: int, model: str = "sd15"):
  """The Align Your Steps schedule of ``model`` ('sd15' or 'sdxl') as n points to visit.

  The published 11 sigmas are interpolated log-linearly to n + 1 values (the paper's rule for
  other step counts; n = 10 gives them exactly) and the last one is dropped: ``sample`` ends
  with the jump to sigma = 0, as the paper's samplers do. Sigmas beyond the process's range
  are clipped to it (SD's sigma_max is 14.6146, the table's 14.615 rounds it up). The
  schedules were fitted to those models: on another network or process they are only a grid.
  """
  if model not in AYS_SIGMAS:
    raise ValueError(f"no Align Your Steps schedule for {model!r}; published: {sorted(AYS_SIGMAS)}")
  log_sigmas = np.log(np.asarray(AYS_SIGMAS[model], np.float64))
  u = np.linspace(0.0, 1.0, log_sigmas.size)
  sigmas = jnp.exp(jnp.interp(jnp.linspace(0.0, 1.0, n + 1), u, log_sigmas))[:n]
  lo, hi = process.edm_sigma(process.t_min), process.edm_sigma(process.t_max)
  return process.t_from_edm_sigma(jnp.clip(sigmas, lo, hi))


def ddim_timesteps(num_train_timesteps: int, n: int, spacing: str = "leading",
                   steps_offset: int = 0) -> np.ndarray:
  """Integer timesteps of diffusers' DDIM/DDPM spacings for a DiscreteVP (host numpy).

  "linspace": round(linspace(0, T-1, n)); "leading": arange(n) * (T // n) +
  steps_offset (Stable Diffusion 1.x uses steps_offset=1); "trailing":
  round(arange(T, 0, -T/n)) - 1 (Lin et al. 2024, includes t = T - 1). All descending.
  """
  T = num_train_timesteps
  if not 1 <= n <= T:
    raise ValueError(f"need 1 <= n <= num_train_timesteps={T}, got n={n}")
  if spacing == "linspace":
    ts = np.linspace(0, T - 1, n).round()[::-1]
  elif spacing == "leading":
    ts = (np.arange(n) * (T // n)).round()[::-1] + steps_offset
  elif spacing == "trailing":
    ts = np.round(np.arange(T, 0, -T / n)) - 1
  else:
    raise ValueError(f"unknown spacing {spacing!r}: use 'linspace', 'leading' or 'trailing'")
  return ts.astype(np.float64)


def check_grid(process: Process, ts) -> np.ndarray:
  """Validates a user-supplied grid (host values): 1-D, noise strictly decreasing."""
  ts = np.asarray(ts, np.float64)
  if ts.ndim != 1 or ts.size < 1:
    raise ValueError(f"a time grid is a 1-D array of at least one time, got shape {ts.shape}")
  sig = np.asarray(process.edm_sigma(jnp.asarray(ts)))
  if ts.size > 1 and not np.all(np.diff(sig) < 0):
    raise ValueError("a time grid must have strictly decreasing noise (sigma/alpha)")
  return ts


GRIDS = {
    "uniform_t": uniform_t,
    "quadratic_t": quadratic_t,
    "log_snr": log_snr_uniform,
    "karras": karras,
    "ays_sd15": functools.partial(align_your_steps, model="sd15"),
    "ays_sdxl": functools.partial(align_your_steps, model="sdxl"),
}
