"""Stochastic samplers of the reverse-time diffusion, each a factory returning a Solver.

Notation (per step from t to t_next, as in ``ode.py``): alpha, sigma at t and
alpha', sigma' at t_next; lam = log(alpha / sigma), h = lam' - lam > 0; D =
denoise(x, t); r = e^{-h} = s' / s, the ratio of EDM noise levels s = sigma / alpha.
In the variance-exploding view x~ = x / alpha = x0 + s eps the forward chain from s'
to s adds variance s^2 - s'^2. ddpm, ddim and the DPM-Solver++ SDE variants are
exponential integrators: exact (in law) when the denoiser is constant over a step.

Every ``step`` takes one PRNG key (``sample`` splits the root key once per step) and
draws standard normals of x's shape and dtype from it (``pc`` splits it first).
Tolerances on the weak orders below are measured by tests/test_sde_solvers.py. Updates are written with
ratios sigma'/sigma and e^{lam - lam'} so that, where the method allows it, a step
that starts at alpha = 0 (rectified flow or a VP at t = 1, lam = -inf) is finite.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from diffjax.processes import Process
from diffjax.samplers.base import Solver, schedule_at
from diffjax.samplers.ode import ddim_update


def _no_state(x, ts):
  return ()


def _normal(key, x):
  return jax.random.normal(key, x.shape, x.dtype)


def _score(process, x, x0, t):
  """Score of the marginal from the denoiser (Tweedie): (alpha D - x) / sigma^2."""
  alpha, sigma, _ = schedule_at(process, t)
  return (alpha * x0 - x) / sigma**2


def _per_example_dot(a, b):
  return jnp.sum((a * b).reshape(a.shape[0], -1), axis=-1)


def _ancestral(process, x, x0, t, t_next, eta, z):
  """DDIM with stochasticity eta (Song et al. 2021a, eq. 12 with sigma_t of eq. 16).

  x' = alpha' D + sqrt(sigma'^2 - c^2) eps_hat + c z, eps_hat = (x - alpha D) / sigma,
  c = eta sigma' sqrt(1 - r^2) (in VP terms eta sqrt((1 - a')/(1 - a)) sqrt(1 - a/a'),
  a = alpha^2). Written as k x + (alpha' - alpha k) D + c z, k = sqrt(sigma'^2 - c^2) / sigma.
  """
  alpha, sigma, lam = schedule_at(process, t)
  alpha_n, sigma_n, lam_n = schedule_at(process, t_next)
  one_m_r2 = -jnp.expm1(2.0 * (lam - lam_n))
  c = eta * sigma_n * jnp.sqrt(one_m_r2)
  k = sigma_n * jnp.sqrt(1.0 - eta**2 * one_m_r2) / sigma
  return k * x + (alpha_n - alpha * k) * x0 + c * z


def ddpm(process: Process) -> Solver:
  """Ancestral sampling from the forward chain's posterior q(x_t' | x_t, x0 = D) (Ho et al. 2020).

  For any process: in x~ = x / alpha the chain from s' to s adds variance s^2 - s'^2, so
  q(x~' | x~, x0) = N(r^2 x~ + (1 - r^2) x0, s'^2 (1 - r^2)), r = s'/s = e^{-h}. In process
  coordinates:

    x' = (sigma'/sigma) r x + alpha' (1 - r^2) D + sigma' sqrt(1 - r^2) z,

  which for VP is DDPM's posterior mean and variance (Ho et al. 2020, eq. 6-7; beta~
  "fixed_small") between any two timesteps. Finite at alpha = 0 (r = 0: x' = alpha' D +
  sigma' z). Weak order 1, 1 NFE per step; equals ``ddim(eta=1)``.
  """

  def step(denoise, x, t, t_next, state, key):
    _, sigma, lam = schedule_at(process, t)
    alpha_n, sigma_n, lam_n = schedule_at(process, t_next)
    r = jnp.exp(lam - lam_n)
    one_m_r2 = -jnp.expm1(2.0 * (lam - lam_n))
    x0 = denoise(x, t)
    x_next = (sigma_n / sigma) * r * x + alpha_n * one_m_r2 * x0 + sigma_n * jnp.sqrt(one_m_r2) * _normal(key, x)
    return x_next.astype(x.dtype), state

  return Solver(init=_no_state, step=step, order=1, nfe_per_step=1, stochastic=True)


def ddim(process: Process, eta: float = 0.0) -> Solver:
  """DDIM with stochasticity ``eta`` (Song, Meng & Ermon 2021, eq. 12 and 16).

  x' = alpha' D + sqrt(sigma'^2 - c^2) eps_hat + c z with c = eta sigma' sqrt(1 - (s'/s)^2),
  eps_hat = (x - alpha D) / sigma. eta = 0 is the deterministic DDIM (== ``ode.euler``),
  eta = 1 is ``ddpm``; eta in (0, 1) interpolates the noise (eta must lie in [0, 1]).
  With eta = 0 the solver is deterministic (stochastic=False: no key needed), so it can
  stand in for the ODE registry's "ddim". Finite at alpha = 0. Order 1, 1 NFE per step.
  """
  stochastic = bool(eta != 0)

  def step(denoise, x, t, t_next, state, key):
    if not stochastic:  # the ODE step itself: also valid towards noise (inversion), where 1 - r^2 < 0
      return ddim_update(process, x, denoise(x, t), t, t_next).astype(x.dtype), state
    return _ancestral(process, x, denoise(x, t), t, t_next, eta, _normal(key, x)).astype(x.dtype), state

  return Solver(init=_no_state, step=step, order=1, nfe_per_step=1, stochastic=stochastic)


def _euler_maruyama_update(process, x, x0, t, t_next, z):
  """x' = x + (f x - g^2 score) dt + g sqrt(|dt|) z with dt = t_next - t < 0."""
  f, g = process.drift(t), process.diffusion(t)
  dt = t_next - t
  return x + (f * x - g**2 * _score(process, x, x0, t)) * dt + g * jnp.sqrt(-dt) * z


def euler_maruyama(process: Process) -> Solver:
  """Euler-Maruyama on the reverse-time SDE (Song et al. 2021b, eq. 6; Anderson 1982).

  dx = [f(t) x - g(t)^2 score(x, t)] dt + g(t) dW-bar, integrated backwards in process
  time with f = ``process.drift``, g = ``process.diffusion`` and score = (alpha D - x) /
  sigma^2. Grid steps should be small in t (e.g. ``grids.uniform_t`` or log-SNR with many
  points). Needs alpha(t) > 0 (f and g are infinite at alpha = 0). Weak order 1,
  strong order 1/2, 1 NFE per step.
  """

  def step(denoise, x, t, t_next, state, key):
    return _euler_maruyama_update(process, x, denoise(x, t), t, t_next, _normal(key, x)).astype(x.dtype), state

  return Solver(init=_no_state, step=step, order=1, nfe_per_step=1, stochastic=True)


def edm_stochastic(process: Process, S_churn: float = 0.0, S_tmin: float = 0.0, S_tmax: float = math.inf,
                   S_noise: float = 1.0) -> Solver:
  """Stochastic Heun sampler of Karras et al. (2022, Algorithm 2) in any process.

  In the EDM noise level s = sigma/alpha and x~ = x / alpha, each step first raises the
  noise to s_hat = (1 + gamma) s by adding N(0, S_noise^2 (s_hat^2 - s^2) I) to x~ ("churn"),
  with gamma = min(S_churn / N, sqrt(2) - 1) if S_tmin <= s <= S_tmax else 0 and N the
  number of grid points (noise levels: Algorithm 2's N), then takes a Heun step from s_hat
  to s' (Algorithm 1's update, eq. 4 ODE). s_hat maps back to process time with
  ``process.t_from_edm_sigma``; where that clips (a DiscreteVP above its largest
  sigma), the added noise follows the clipped level, so the state stays consistent.
  The final jump to sigma = 0 is the driver's D(x, ts[-1]) (no churn at the last level).

  Options follow the paper (sigmas in EDM units). Needs alpha(t) > 0. Order 2 for
  S_churn = 0 (== ``ode.heun``); the churn is exact in distribution, the Heun part
  keeps weak order 2. 2 NFE per step.
  """

  def init(x, ts):
    return jnp.minimum(S_churn / ts.shape[0], math.sqrt(2.0) - 1.0)

  def step(denoise, x, t, t_next, gamma_max, key):
    alpha, sigma, _ = schedule_at(process, t)
    alpha_n, sigma_n, _ = schedule_at(process, t_next)
    s, s_n = sigma / alpha, sigma_n / alpha_n
    gamma = jnp.where((s >= S_tmin) & (s <= S_tmax), gamma_max, 0.0)
    churn = gamma > 0
    t_hat = jnp.where(churn, process.t_from_edm_sigma(s * (1.0 + gamma)), t)
    s_hat = jnp.where(churn, process.edm_sigma(t_hat), s)
    # Exactly no noise without churn (XLA may round s and s_hat differently: s_hat^2 - s^2 != 0).
    std = jnp.where(churn, S_noise * jnp.sqrt(jnp.maximum(s_hat**2 - s**2, 0.0)), 0.0)
    xs = x / alpha + std * _normal(key, x)
    d = (xs - denoise(process.alpha(t_hat) * xs, t_hat)) / s_hat
    xs_euler = xs + (s_n - s_hat) * d
    d_next = (xs_euler - denoise(alpha_n * xs_euler, t_next)) / s_n
    return (alpha_n * (xs + (s_n - s_hat) * 0.5 * (d + d_next))).astype(x.dtype), gamma_max

  return Solver(init=init, step=step, order=2, nfe_per_step=2, stochastic=True)


# -- DPM-Solver++ SDE variants ------------------------------------------------------
def _series(x, coeffs):
  """sum_j coeffs[j] x^(j+1) by Horner."""
  acc = coeffs[-1]
  for c in coeffs[-2::-1]:
    acc = c + x * acc
  return x * acc


# phi2(x) = sum_{j>=1} (-1)^(j+1) x^j / (j+1)!,  phi3(x) = sum_{j>=1} (-1)^j x^j / (j+2)!
_PHI2_SERIES = [(-1) ** j / math.factorial(j + 2) for j in range(16)]
_PHI3_SERIES = [(-1) ** (j + 1) / math.factorial(j + 3) for j in range(16)]


def _phi2(x):
  """1 + expm1(-x)/x = (x - 1 + e^{-x}) / x: weight of h D'. Series below 0.5, 1 at x = inf."""
  xs, xl = jnp.minimum(x, 0.5), jnp.maximum(x, 0.5)
  return jnp.where(x < 0.5, _series(xs, _PHI2_SERIES), 1.0 + jnp.expm1(-xl) / xl)


def _phi3(x):
  """phi2(x)/x - 1/2 = -(x^2/2 - x + 1 - e^{-x}) / x^2. Series below 0.5, -1/2 at x = inf."""
  xs, xl = jnp.minimum(x, 0.5), jnp.maximum(x, 0.5)
  return jnp.where(x < 0.5, _series(xs, _PHI3_SERIES), _phi2(xl) / xl - 0.5)


def _dpmpp_sde_base(process, x, x0, t, t_next, eta, z):
  """Exact solution of the eta-SDE for a constant denoiser (see ``dpmpp_2m_sde``).

  Returns (x', alpha', h, (1 + eta) h): x' = (sigma'/sigma) e^{-eta h} x + alpha' (1 - e^{-(1+eta)h}) D
  + sigma' sqrt(1 - e^{-2 eta h}) z, plus the quantities the multistep corrections need.
  """
  _, sigma, lam = schedule_at(process, t)
  alpha_n, sigma_n, lam_n = schedule_at(process, t_next)
  h = lam_n - lam
  eta_h = jnp.where(eta == 0, 0.0, eta * h)  # eta = 0 with h = inf (alpha = 0) is 0, not nan
  x_next = ((sigma_n / sigma) * jnp.exp(-eta_h) * x + alpha_n * -jnp.expm1(-h - eta_h) * x0
            + sigma_n * jnp.sqrt(-jnp.expm1(-2.0 * eta_h)) * z)
  return x_next, alpha_n, h, h + eta_h


def _ratio(h, h_prev, valid):
  """h / h_prev where a previous step exists, else 0 (0 also when h_prev = inf)."""
  return jnp.where(valid, h / jnp.where(valid, h_prev, 1.0), 0.0)


def dpmpp_2m_sde(process: Process, eta: float = 1.0, solver_type: str = "midpoint") -> Solver:
  """SDE-DPM-Solver++(2M) (Lu et al. 2022b, DPM-Solver++, SDE variant; k-diffusion's sample_dpmpp_2m_sde).

  In lam, x~ = x / alpha the eta-family of reverse SDEs with the same marginals is
  dx~ = -(1 + eta) (x~ - D) dlam + sqrt(2 eta) s dW (the probability-flow ODE plus eta
  times Langevin; eta = 1 is the reverse SDE of Song et al. 2021b). Its
  variation-of-constants solution over one step, with D(lam + tau) = D + tau D', is

    x~' = (s'/s) e^{-eta h} x~ + (1 - e^{-c h}) D + h phi2(c h) D'
          + s' sqrt(1 - e^{-2 eta h}) z,                    c = 1 + eta,

  exact in its noise term. D' is the backward difference (D - D_prev) / h_prev.
  ``solver_type="heun"`` uses the exact weight h phi2(c h) = h (1 + expm1(-c h)/(c h));
  ``"midpoint"`` (default, as k-diffusion) uses (1 - e^{-c h}) / 2, equal to second order.
  eta = 0 is the deterministic DPM-Solver++(2M). The first step (no history) is
  first order. Finite at alpha = 0. Order 2 (eta = 0); weak order measured in the tests.
  1 NFE per step.
  """
  if solver_type not in ("midpoint", "heun"):
    raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")

  def init(x, ts):
    return jnp.zeros_like(x), jnp.zeros((), x.dtype), jnp.zeros((), bool)

  def step(denoise, x, t, t_next, state, key):
    x0_prev, h_prev, has_prev = state
    x0 = denoise(x, t)
    x_next, alpha_n, h, ch = _dpmpp_sde_base(process, x, x0, t, t_next, eta, _normal(key, x))
    weight = 0.5 * -jnp.expm1(-ch) if solver_type == "midpoint" else _phi2(ch)
    x_next = x_next + alpha_n * weight * _ratio(h, h_prev, has_prev) * (x0 - x0_prev)
    return x_next.astype(x.dtype), (x0, h.astype(x.dtype), jnp.ones((), bool))

  return Solver(init=init, step=step, order=2, nfe_per_step=1, stochastic=True)


def dpmpp_3m_sde(process: Process, eta: float = 1.0) -> Solver:
  """SDE-DPM-Solver++(3M): ``dpmpp_2m_sde`` with a quadratic model of D in lam.

  With D = D(lam) + tau D' + tau^2 D''/2 through the last three data predictions
  (divided differences; k-diffusion's d1 = h D', d2 = h^2 D''/2) the exponential
  integrator gives, with c = 1 + eta and x = c h,

    x~' = (s'/s) e^{-eta h} x~ + (1 - e^{-x}) D + phi2(x) h D' - phi3(x) h^2 D''
          + s' sqrt(1 - e^{-2 eta h}) z,

    phi2(x) = 1 + expm1(-x)/x,  phi3(x) = phi2(x)/x - 1/2,

  since int_0^h c e^{-c(h - tau)} tau^2 dtau = -2 h^2 phi3(c h). The weight of d2 is thus
  -2 phi3, twice the -phi3 that k-diffusion's sample_dpmpp_3m_sde and DPM-Solver's
  multistep third-order update use (their d2 term is half the Taylor term, which
  lowers the deterministic order to 2); diffusers' sde-dpmsolver++ third order also has
  a wrong sign in that weight. Steps 1 and 2 are first and second order. Finite at
  alpha = 0 (the history weights vanish). Order 3 (eta = 0). 1 NFE per step.
  """

  def init(x, ts):
    zero = jnp.zeros((), x.dtype)
    return jnp.zeros_like(x), jnp.zeros_like(x), zero, zero, jnp.zeros((), jnp.int32)

  def step(denoise, x, t, t_next, state, key):
    x0_1, x0_2, h_1, h_2, n = state
    x0 = denoise(x, t)
    x_next, alpha_n, h, ch = _dpmpp_sde_base(process, x, x0, t, t_next, eta, _normal(key, x))
    r0 = _ratio(h, h_1, n >= 1)  # h / h_1
    r1 = _ratio(h, h_2, n >= 2)  # h / h_2
    d1_0 = r0 * (x0 - x0_1)  # h * first divided difference at the newest pair
    d1_1 = r1 * (x0_1 - x0_2)
    # w = h_1 / (h_1 + h_2) as r1 / (r0 + r1); 0 without a second previous step or when h_2 = inf.
    w = jnp.where(n >= 2, r1 / jnp.where(n >= 2, r0 + r1, 1.0), 0.0)
    d1 = d1_0 + w * (d1_0 - d1_1)  # h D'
    d2 = (r0 * r1 / jnp.where(n >= 2, r0 + r1, 1.0)) * (d1_0 - d1_1)  # h^2 D''/2 (0 if n < 2)
    x_next = x_next + alpha_n * (_phi2(ch) * d1 - 2.0 * _phi3(ch) * d2)
    return x_next.astype(x.dtype), (x0, x0_1, h.astype(x.dtype), h_1, jnp.minimum(n + 1, 2))

  return Solver(init=init, step=step, order=3, nfe_per_step=1, stochastic=True)


# -- predictor-corrector -------------------------------------------------------------
def _reverse_diffusion_update(process, x, x0, t, t_next, z):
  """Reverse-diffusion predictor (Song et al. 2021b, app. E, eq. 46) for any process.

  With the forward chain x_t = a x_t' + sqrt(v) z (a = alpha/alpha', v = sigma^2 - a^2
  sigma'^2), i.e. f_i = (a - 1) x, G_i^2 = v: x' = x - f_i + G_i^2 score + G_i z.
  """
  alpha, sigma, lam = schedule_at(process, t)
  alpha_n, sigma_n, lam_n = schedule_at(process, t_next)
  a = alpha / alpha_n
  v = sigma**2 * -jnp.expm1(2.0 * (lam - lam_n))  # sigma^2 - a^2 sigma'^2
  return (2.0 - a) * x + v * _score(process, x, x0, t) + jnp.sqrt(v) * z


_PREDICTORS = {"reverse_diffusion": _reverse_diffusion_update, "euler_maruyama": _euler_maruyama_update}


def pc(process: Process, predictor: str = "reverse_diffusion", snr: float = 0.16, n_corrector: int = 1) -> Solver:
  """Predictor-corrector sampler (Song et al. 2021b, sec. 4.2, Algorithms 2-3).

  Each step runs the predictor from t to t_next ("reverse_diffusion", app. E, or
  "euler_maruyama") and then ``n_corrector`` Langevin MCMC steps at t_next (Algorithm
  4): x <- x + e score + sqrt(2 e) z with e = 2 (snr ||z|| / ||score||)^2, the norms
  averaged over the batch as in the reference code (so e couples the examples of a
  batch; score_sde's extra factor 1 - beta_i for VP, -> 1 on fine grids, is left out).
  The corrector has an O(snr^2) stationary bias (unadjusted Langevin) that does not
  vanish as steps shrink. The Euler-Maruyama predictor needs alpha(t) > 0 (reverse
  diffusion is finite, but crude, from alpha = 0). Order 1 (predictor);
  1 + n_corrector NFE per step.
  """
  if predictor not in _PREDICTORS:
    raise ValueError(f"unknown predictor {predictor!r}; choose from {sorted(_PREDICTORS)}")
  predict = _PREDICTORS[predictor]

  def step(denoise, x, t, t_next, state, key):
    key, k_pred = jax.random.split(key)
    x = predict(process, x, denoise(x, t), t, t_next, _normal(k_pred, x)).astype(x.dtype)

    def langevin(x, k):
      score = _score(process, x, denoise(x, t_next), t_next)
      z = _normal(k, x)
      norm = lambda v: jnp.mean(jnp.sqrt(_per_example_dot(v, v)))
      e = 2.0 * (snr * norm(z) / norm(score)) ** 2
      return (x + e * score + jnp.sqrt(2.0 * e) * z).astype(x.dtype), None

    x, _ = jax.lax.scan(langevin, x, jax.random.split(key, n_corrector))
    return x, state

  return Solver(init=_no_state, step=step, order=1, nfe_per_step=1 + n_corrector, stochastic=True)


SDE_SOLVERS = {
    "ddpm": ddpm,
    "ddim": ddim,
    "euler_maruyama": euler_maruyama,
    "edm_stochastic": edm_stochastic,
    "dpmpp_2m_sde": dpmpp_2m_sde,
    "dpmpp_3m_sde": dpmpp_3m_sde,
    "pc": pc,
}
