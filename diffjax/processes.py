"""Forward noise processes x_t = alpha(t) x0 + sigma(t) eps, eps ~ N(0, I).

A process knows only its schedule alpha(t), sigma(t) and what follows from them:

* ``log_snr(t)``      = log(alpha^2 / sigma^2), and its inverse ``t_from_log_snr``;
* ``edm_sigma(t)``    = sigma / alpha, the noise level of the equivalent
  variance-exploding view x_t / alpha = x0 + (sigma / alpha) eps (EDM's and
  k-diffusion's "sigma"), and its inverse ``t_from_edm_sigma``;
* ``drift(t)`` f(t) = d log alpha / dt and ``diffusion(t)`` g(t) with
  g^2 = d sigma^2 / dt - 2 f sigma^2: the forward SDE dx = f x dt + g dW that has
  these marginals (Song et al. 2021; Kingma et al. 2021, eq. 33). They are derived
  by automatic differentiation of the schedule, so a new process needs only
  alpha, sigma and the inverse of its log-SNR;
* the prior N(0, prior_std^2 I) at ``t_max``.

Times are floats in each process's own units (documented per class); ``t_min`` and
``t_max`` give the default sampling range. All methods take scalars or arrays of
times and act elementwise. Processes are frozen pytree dataclasses: numeric fields
are leaves, so a process can be a ``jax.jit`` argument and sweeping its parameters
does not recompile.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

Array = jax.Array


class Process:
  """Base class: subclasses define ``log_alpha``, ``log_sigma`` and ``t_from_log_snr``."""

  t_min: float
  t_max: float

  # -- schedule ------------------------------------------------------------------
  def log_alpha(self, t) -> Array:
    raise NotImplementedError

  def log_sigma(self, t) -> Array:
    raise NotImplementedError

  def t_from_log_snr(self, log_snr) -> Array:
    """Inverse of ``log_snr``: the time whose log(alpha^2/sigma^2) is ``log_snr``."""
    raise NotImplementedError

  def alpha(self, t) -> Array:
    return jnp.exp(self.log_alpha(t))

  def sigma(self, t) -> Array:
    return jnp.exp(self.log_sigma(t))

  def log_snr(self, t) -> Array:
    return 2.0 * (self.log_alpha(t) - self.log_sigma(t))

  def edm_sigma(self, t) -> Array:
    """sigma(t) / alpha(t): noise level of x_t / alpha(t) = x0 + edm_sigma * eps."""
    return jnp.exp(self.log_sigma(t) - self.log_alpha(t))

  def t_from_edm_sigma(self, edm_sigma) -> Array:
    return self.t_from_log_snr(-2.0 * jnp.log(edm_sigma))

  # -- forward SDE dx = f(t) x dt + g(t) dW --------------------------------------
  def drift(self, t) -> Array:
    """f(t) = d log alpha / dt (the SDE drift is f(t) x)."""
    return _elementwise_derivative(self.log_alpha, t)

  def diffusion(self, t) -> Array:
    """g(t) = sqrt(d sigma^2/dt - 2 f(t) sigma^2) = sigma * sqrt(-d log_snr / dt)."""
    return self.sigma(t) * jnp.sqrt(jnp.maximum(-_elementwise_derivative(self.log_snr, t), 0.0))

  # -- prior -----------------------------------------------------------------------
  @property
  def prior_std(self) -> Array:
    """Std of the prior at t_max: sqrt(alpha^2 + sigma^2), exact for unit-variance data."""
    return jnp.sqrt(self.alpha(self.t_max) ** 2 + self.sigma(self.t_max) ** 2)

  def prior_sample(self, key, shape, dtype=jnp.float32) -> Array:
    return self.prior_std.astype(dtype) * jax.random.normal(key, shape, dtype)

  def prior_logp(self, x) -> Array:
    """Log-density of the prior, summed over all elements of ``x`` (one example)."""
    var = self.prior_std**2
    return -0.5 * jnp.sum(x**2) / var - 0.5 * x.size * jnp.log(2 * math.pi * var)


def _elementwise_derivative(fn, t):
  t = jnp.asarray(t, jnp.result_type(t, float))
  return jax.jvp(fn, (t,), (jnp.ones_like(t),))[1]


def _log1mexp(x):
  """log(1 - exp(x)) for x <= 0, accurate near 0 and -inf."""
  return jnp.where(x > -0.6931, jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def _vp_log_sigma(log_alpha):
  """Variance preserving: sigma^2 = 1 - alpha^2."""
  return 0.5 * _log1mexp(2.0 * log_alpha)


def _vp_log_alpha_from_log_snr(log_snr):
  """alpha^2 = sigmoid(log_snr) when alpha^2 + sigma^2 = 1."""
  return -0.5 * jax.nn.softplus(-log_snr)


# ----------------------------------------------------------------------------------
# Variance preserving (DDPM), continuous time t in [0, 1].
# ----------------------------------------------------------------------------------
@struct.dataclass
class VPLinear(Process):
  """VP SDE with linear beta(t) = beta_min + t (beta_max - beta_min), t in [0, 1].

  log alpha(t) = -t^2 (beta_max - beta_min) / 4 - t beta_min / 2 (Song et al. 2021).
  """

  beta_min: float = 0.1
  beta_max: float = 20.0
  t_min: float = struct.field(pytree_node=False, default=1e-3)
  t_max: float = struct.field(pytree_node=False, default=1.0)

  def log_alpha(self, t):
    t = jnp.asarray(t)
    return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

  def log_sigma(self, t):
    return _vp_log_sigma(self.log_alpha(t))

  def t_from_log_snr(self, log_snr):
    return _vp_linear_t(-_vp_log_alpha_from_log_snr(log_snr), self.beta_min, self.beta_max)


def _vp_linear_t(c, beta_min, beta_max):
  """Solve t^2 (b1 - b0)/4 + t b0/2 = c for t >= 0 (rationalized, stable as b1 -> b0)."""
  return 4.0 * c / (beta_min + jnp.sqrt(beta_min**2 + 4.0 * (beta_max - beta_min) * c))


@struct.dataclass
class VPCosine(Process):
  """VP with the cosine schedule of improved DDPM (Nichol & Dhariwal 2021), t in [0, 1].

  alpha(t)^2 = cos^2(phi(t)) / cos^2(phi(0)), phi(t) = (t + s) / (1 + s) * pi / 2.
  alpha(1) = 0, so the default sampling range stops at t_max = 0.9946 (as DPM-Solver).
  """

  s: float = 0.008
  t_min: float = struct.field(pytree_node=False, default=1e-3)
  t_max: float = struct.field(pytree_node=False, default=0.9946)

  def _phi(self, t):
    return (jnp.asarray(t) + self.s) / (1.0 + self.s) * (math.pi / 2)

  def log_alpha(self, t):
    return jnp.log(jnp.cos(self._phi(t))) - jnp.log(jnp.cos(self._phi(0.0)))

  def log_sigma(self, t):
    return _vp_log_sigma(self.log_alpha(t))

  def t_from_log_snr(self, log_snr):
    log_alpha = _vp_log_alpha_from_log_snr(log_snr)
    phi = jnp.arccos(jnp.exp(log_alpha) * jnp.cos(self._phi(0.0)))
    return phi * 2.0 * (1.0 + self.s) / math.pi - self.s


@struct.dataclass
class VPScaledLinear(Process):
  """Continuous-time form of Stable Diffusion's ``scaled_linear`` schedule, t in [0, 1].

  beta(t) = N (b0 + t (b1 - b0))^2 with b = sqrt(beta_start), sqrt(beta_end): the
  discrete betas of ``DiscreteVP.scaled_linear`` at t = k / (N - 1), as a rate.
  log alpha(t) = -N ((b0 + t db)^3 - b0^3) / (6 db).
  """

  beta_start: float = 0.00085
  beta_end: float = 0.012
  num_train_timesteps: int = struct.field(pytree_node=False, default=1000)
  t_min: float = struct.field(pytree_node=False, default=1e-3)
  t_max: float = struct.field(pytree_node=False, default=1.0)

  def _b(self):
    return jnp.sqrt(self.beta_start), jnp.sqrt(self.beta_end)

  def log_alpha(self, t):
    b0, b1 = self._b()
    db = b1 - b0
    return -self.num_train_timesteps * ((b0 + jnp.asarray(t) * db) ** 3 - b0**3) / (6.0 * db)

  def log_sigma(self, t):
    return _vp_log_sigma(self.log_alpha(t))

  def t_from_log_snr(self, log_snr):
    b0, b1 = self._b()
    c = -_vp_log_alpha_from_log_snr(log_snr)
    return (jnp.cbrt(b0**3 + 6.0 * (b1 - b0) * c / self.num_train_timesteps) - b0) / (b1 - b0)


@struct.dataclass
class SubVP(Process):
  """sub-VP SDE (Song et al. 2021): alpha as VPLinear, sigma(t) = 1 - alpha(t)^2."""

  beta_min: float = 0.1
  beta_max: float = 20.0
  t_min: float = struct.field(pytree_node=False, default=1e-3)
  t_max: float = struct.field(pytree_node=False, default=1.0)

  def log_alpha(self, t):
    return VPLinear.log_alpha(self, t)

  def log_sigma(self, t):
    return _log1mexp(2.0 * self.log_alpha(t))

  def t_from_log_snr(self, log_snr):
    # alpha^2 = a solves e^l (1 - a)^2 = a; the root in (0, 1), rationalized.
    e = jnp.exp(log_snr)
    a = 2.0 * e / (2.0 * e + 1.0 + jnp.sqrt(4.0 * e + 1.0))
    return _vp_linear_t(-0.5 * jnp.log(a), self.beta_min, self.beta_max)


# ----------------------------------------------------------------------------------
# Discrete N-step VP (DDPM / Stable Diffusion), t in [0, N - 1] (timestep index).
# ----------------------------------------------------------------------------------
BETA_SCHEDULES = ("linear", "scaled_linear", "cosine")  # DiscreteVP.from_schedule's names (process discrete_<name>)


def _betas(schedule: str, n: int, beta_start: float, beta_end: float) -> np.ndarray:
  if schedule == "linear":
    return np.linspace(beta_start, beta_end, n, dtype=np.float64)
  if schedule == "scaled_linear":
    return np.linspace(beta_start**0.5, beta_end**0.5, n, dtype=np.float64) ** 2
  if schedule == "cosine":  # improved DDPM, betas clipped at 0.999
    f = lambda u: np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2
    u = np.arange(n + 1, dtype=np.float64) / n
    return np.minimum(1.0 - f(u[1:]) / f(u[:-1]), 0.999)
  raise ValueError(f"unknown beta schedule {schedule!r}: use one of {BETA_SCHEDULES}")


@struct.dataclass
class DiscreteVP(Process):
  """The N-step VP of DDPM and Stable Diffusion: alpha_bar_k = prod_{j<=k} (1 - beta_j).

  Time is the (fractional) timestep t in [0, N - 1]. Between integer timesteps
  log(sigma/alpha) is interpolated linearly, as diffusers' and k-diffusion's
  sigma <-> timestep conversions do, so any solver can visit any noise level in range.
  Build with ``DiscreteVP.from_schedule('scaled_linear')`` (Stable Diffusion's),
  ``'linear'`` (DDPM's) or ``'cosine'``.
  """

  log_edm_sigmas: Array  # (N,) log(sigma_k / alpha_k), increasing in k
  t_min: float = struct.field(pytree_node=False, default=0.0)
  t_max: float = struct.field(pytree_node=False, default=999.0)

  @classmethod
  def from_betas(cls, betas) -> DiscreteVP:
    betas = np.asarray(betas, np.float64)
    if betas.ndim != 1 or betas.size < 2 or not np.all((betas > 0) & (betas < 1)):
      raise ValueError("betas must be a 1-D array of at least 2 values in (0, 1)")
    alpha_bar = np.cumprod(1.0 - betas)
    log_edm = 0.5 * (np.log1p(-alpha_bar) - np.log(alpha_bar))
    # Kept as float64 numpy: it takes the precision of the computation that uses it.
    return cls(log_edm_sigmas=log_edm, t_max=float(betas.size - 1))

  @classmethod
  def from_schedule(cls, schedule="scaled_linear", num_train_timesteps=1000,
                    beta_start=0.00085, beta_end=0.012) -> DiscreteVP:
    return cls.from_betas(_betas(schedule, num_train_timesteps, beta_start, beta_end))

  @property
  def num_train_timesteps(self) -> int:
    return int(self.t_max) + 1

  def _table(self):
    table = jnp.asarray(self.log_edm_sigmas)
    return jnp.arange(table.shape[0], dtype=table.dtype), table

  def _log_edm_sigma(self, t):
    return jnp.interp(t, *self._table())

  def log_snr(self, t):
    return -2.0 * self._log_edm_sigma(t)

  def log_alpha(self, t):
    return _vp_log_alpha_from_log_snr(self.log_snr(t))

  def log_sigma(self, t):
    return _vp_log_alpha_from_log_snr(-self.log_snr(t))

  def t_from_log_snr(self, log_snr):
    grid, table = self._table()
    return jnp.interp(-0.5 * jnp.asarray(log_snr), table, grid)


# ----------------------------------------------------------------------------------
# Variance exploding: alpha = 1.
# ----------------------------------------------------------------------------------
@struct.dataclass
class VE(Process):
  """VE SDE of NCSN (Song & Ermon; Song et al. 2021): sigma(t) = s_min (s_max/s_min)^t, t in [0, 1]."""

  sigma_min: float = 0.01
  sigma_max: float = 50.0
  t_min: float = struct.field(pytree_node=False, default=0.0)
  t_max: float = struct.field(pytree_node=False, default=1.0)

  def log_alpha(self, t):
    return jnp.zeros(jnp.shape(t), jnp.result_type(t, float))

  def log_sigma(self, t):
    return jnp.log(self.sigma_min) + jnp.asarray(t) * jnp.log(self.sigma_max / self.sigma_min)

  def t_from_log_snr(self, log_snr):
    return (-0.5 * jnp.asarray(log_snr) - jnp.log(self.sigma_min)) / jnp.log(self.sigma_max / self.sigma_min)


@struct.dataclass
class EDM(Process):
  """EDM (Karras et al. 2022): alpha = 1, sigma(t) = t; t is the noise level itself."""

  sigma_data: float = 0.5
  t_min: float = struct.field(pytree_node=False, default=0.002)
  t_max: float = struct.field(pytree_node=False, default=80.0)

  def log_alpha(self, t):
    return jnp.zeros(jnp.shape(t), jnp.result_type(t, float))

  def log_sigma(self, t):
    return jnp.log(jnp.asarray(t))

  def t_from_log_snr(self, log_snr):
    return jnp.exp(-0.5 * jnp.asarray(log_snr))


# ----------------------------------------------------------------------------------
# Rectified flow / flow matching: alpha = 1 - t, sigma = t.
# ----------------------------------------------------------------------------------
@struct.dataclass
class RectifiedFlow(Process):
  """Rectified flow (Liu et al. 2022; SD3, Flux): x_t = (1 - s(t)) x0 + s(t) eps, t in [0, 1].

  s(t) = shift t / (1 + (shift - 1) t) is the time shift of SD3 (Esser et al. 2024,
  sec. 5.3.2); shift = 1 is plain flow matching. ``resolution_shift`` gives the
  resolution-dependent value. alpha(1) = 0: samplers can start from pure noise.
  """

  shift: float = 1.0
  t_min: float = struct.field(pytree_node=False, default=1e-3)
  t_max: float = struct.field(pytree_node=False, default=1.0)

  def shifted(self, t):
    t = jnp.asarray(t)
    return self.shift * t / (1.0 + (self.shift - 1.0) * t)

  def log_alpha(self, t):
    return jnp.log1p(-self.shifted(t))

  def log_sigma(self, t):
    return jnp.log(self.shifted(t))

  # alpha and sigma directly rather than exp(log ...): their derivatives stay finite at t = 1 (alpha = 0),
  # where the flow samplers of SD3 and Flux start (exp(-inf) * -inf would be nan).
  def alpha(self, t):
    return 1.0 - self.shifted(t)

  def sigma(self, t):
    return self.shifted(t)

  def t_from_log_snr(self, log_snr):
    s = jax.nn.sigmoid(-0.5 * jnp.asarray(log_snr))  # sigma/alpha = s/(1-s)
    return s / (self.shift - (self.shift - 1.0) * s)


def resolution_mu(num_tokens, base_tokens=256, max_tokens=4096, base_shift=0.5, max_shift=1.15) -> float:
  """Flux's mu, linear in the number of latent tokens: ``base_shift`` at ``base_tokens``, ``max_shift`` at
  ``max_tokens`` (evaluated as diffusers' ``calculate_shift`` does: tokens * slope + intercept)."""
  slope = (max_shift - base_shift) / (max_tokens - base_tokens)
  return num_tokens * slope + (base_shift - slope * base_tokens)


def resolution_shift(num_tokens, base_tokens=256, max_tokens=4096, base_shift=0.5,
                     max_shift=1.15) -> float:
  """Flux's resolution-dependent shift exp(mu) (``resolution_mu``).

  SD3 instead uses shift = sqrt(num_pixels / 256**2) (``shift=3.0`` at 1024^2).
  """
  return float(math.exp(resolution_mu(num_tokens, base_tokens, max_tokens, base_shift, max_shift)))


PROCESSES = {
    "vp_linear": VPLinear,
    "vp_cosine": VPCosine,
    "vp_scaled_linear": VPScaledLinear,
    "sub_vp": SubVP,
    "ve": VE,
    "edm": EDM,
    "rectified_flow": RectifiedFlow,
}


def make_process(name: str, **kwargs) -> Process:
  """A process by name: the keys of ``PROCESSES``, or ``discrete_<schedule>`` / ``sd``.

  ``sd`` is Stable Diffusion's 1000-step ``scaled_linear`` DiscreteVP.
  """
  if name == "sd":
    return DiscreteVP.from_schedule("scaled_linear", **kwargs)
  if name.startswith("discrete_"):
    return DiscreteVP.from_schedule(name[len("discrete_"):], **kwargs)
  if name not in PROCESSES:
    raise ValueError(f"unknown process {name!r}; choose from {sorted(PROCESSES) + ['sd', 'discrete_<schedule>']}")
  return PROCESSES[name](**kwargs)
