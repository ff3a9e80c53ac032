"""Mathematical tests of the stochastic samplers (diffjax.samplers.sde).

Data: one Gaussian N(mu, diag(v)), mu = (1, -2), v = (0.25, 4), whose exact denoiser is
affine, so every sampler's output is Gaussian and its mean and variance are the whole
story. Chains start from the exact marginal at ts[0] (for a VP at t_max the prior
N(0, 1) differs from it by alpha(t_max) mu, which is a property of the process, not of
the solver; for rectified flow at t = 1 the two coincide). The target is the law of
D(x, ts[-1]) for exact x: mean mu, variance alpha^2 v^2 / (alpha^2 v + sigma^2).

Tolerances: 5 standard errors (n samples: se(mean) = sqrt(v/n), se(var)/var = sqrt(2/n))
plus a discretization allowance C / N^p from the weak order p, with C bounding the
constants measured by ``test_weak_order`` (first order: bias ~ 3-6 / N).
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
from diffjax.samplers import ode
from diffjax.samplers.base import sample
from diffjax.samplers.sde import SDE_SOLVERS

MU, VAR = np.array([1.0, -2.0]), np.array([0.25, 4.0])
GM = GaussianMixture.create([1.0], [MU], [VAR])
N_SAMPLES = 2**15

# id -> (registry name, options, weak order, discretization constant C of the bias C / N^p)
CONFIGS = {
    "ddpm": ("ddpm", {}, 1, 10.0),
    "ddim_eta0.5": ("ddim", {"eta": 0.5}, 1, 10.0),
    "euler_maruyama": ("euler_maruyama", {}, 1, 10.0),
    "edm_stochastic": ("edm_stochastic", {"S_churn": 10.0}, 2, 150.0),
    "dpmpp_2m_sde": ("dpmpp_2m_sde", {}, 2, 150.0),
    "dpmpp_2m_sde_heun": ("dpmpp_2m_sde", {"solver_type": "heun"}, 2, 150.0),
    "dpmpp_3m_sde": ("dpmpp_3m_sde", {}, 3, 1000.0),
    "pc": ("pc", {"snr": 0.1}, 1, 10.0),
    "pc_em": ("pc", {"predictor": "euler_maruyama", "snr": 0.1}, 1, 10.0),
}


def _denoiser(process):
  """Exact affine denoiser of the Gaussian (== GM.denoiser for K = 1, cheaper)."""

  def denoise(x, t):
    a, s = process.alpha(t), process.sigma(t)
    gain = a * GM.variances[0] / (a**2 * GM.variances[0] + s**2)
    return (GM.means[0] + gain * (x - a * GM.means[0])).astype(x.dtype)

  return denoise


@functools.cache
def _setup(config, process_name):
  """(process, solver): built once per config and process, so tests share the compiled step."""
  name, options, _, _ = CONFIGS[config]
  process = make_process(process_name)
  return process, SDE_SOLVERS[name](process, **options)


@functools.cache
def _jit_step(solver, denoise):
  return jax.jit(functools.partial(solver.step, denoise))


_MAX_POINTS = 1024
_T_FROM_LOG_SNR = jax.jit(lambda process, lam: process.t_from_log_snr(lam))
_T_FROM_EDM_SIGMA = jax.jit(lambda process, s: process.t_from_edm_sigma(s))
_RANGE = jax.jit(lambda process: (process.log_snr(process.t_max), process.log_snr(process.t_min),
                                  process.edm_sigma(process.t_max), process.edm_sigma(process.t_min)))


def _grid(process_name, process, n, kind=None):
  """Host (numpy) grid as in ``grids`` (log_snr_uniform, karras, quadratic_t), compiled once per process.

  (The maps run on a fixed-size padded array, so new grid sizes do not recompile.) Rectified
  flow gets a quadratic-in-t grid from t = 1 (alpha = 0), dense near t_min.
  """
  kind = kind or ("quadratic_t" if process_name == "rectified_flow" else "log_snr")
  if kind == "quadratic_t":
    return process.t_min + (process.t_max - process.t_min) * np.linspace(1.0, 0.0, n) ** 2
  lam_max, lam_min, s_max, s_min = (float(v) for v in _RANGE(process))
  if kind == "log_snr":
    fn, values = _T_FROM_LOG_SNR, np.linspace(lam_max, lam_min, n)
  else:  # karras, rho = 7
    u, r = np.linspace(0.0, 1.0, n), 1.0 / 7.0
    fn, values = _T_FROM_EDM_SIGMA, (s_max**r + u * (s_min**r - s_max**r)) ** 7
  padded = np.concatenate([values, np.full(_MAX_POINTS - n, values[-1])])
  return np.asarray(fn(process, jnp.asarray(padded)))[:n]


@functools.partial(jax.jit, static_argnums=3)
def _marginal(process, t, key, n):
  """(n, 2) exact samples of x_t."""
  a, s = process.alpha(t), process.sigma(t)
  eps = jax.random.normal(key, (n, MU.size))
  return a * GM.means[0] + jnp.sqrt(a**2 * GM.variances[0] + s**2) * eps


def _loop(solver, denoise, x, ts, key, split=False):
  """``sample``'s step loop on the host, so one compiled step serves every grid.

  Step i gets fold_in(key, i), or with ``split`` the keys of ``sample`` (split(key, N - 1)).
  Returns the trajectory (N - 1, B, ...) at ts[1:].
  """
  step = _jit_step(solver, denoise)
  keys = jax.random.split(key, len(ts) - 1) if split else None
  state, traj = solver.init(x, jnp.asarray(ts)), []
  for i in range(len(ts) - 1):
    x, state = step(x, ts[i], ts[i + 1], state, keys[i] if split else jax.random.fold_in(key, i))
    traj.append(x)
  return jnp.stack(traj)


@functools.cache
def _denoiser_for(config, process_name):
  return _denoiser(_setup(config, process_name)[0])


def _run(config, process_name, num_points, seed=0):
  """Samples (n, 2) at sigma = 0 and the target variance, from the exact marginal at ts[0]."""
  process, solver = _setup(config, process_name)
  denoise = _denoiser_for(config, process_name)
  ts = _grid(process_name, process, num_points)
  k_init, k_steps = jax.random.split(jax.random.key(seed))
  x = _marginal(process, ts[0], k_init, N_SAMPLES)
  x = _loop(solver, denoise, x, ts, k_steps)[-1]
  out = np.asarray(denoise(x, ts[-1]), np.float64)
  a, s = float(process.alpha(ts[-1])), float(process.sigma(ts[-1]))
  return out, a**2 * VAR**2 / (a**2 * VAR + s**2)


def _moment_errors(out, var_target):
  """Mean error in units of sqrt(v) and relative variance error, per coordinate."""
  return (out.mean(0) - MU) / np.sqrt(VAR), out.var(0) / var_target - 1.0


def _check_moments(out, var_target, config, steps):
  _, options, order, c = CONFIGS[config]
  mean_err, var_err = _moment_errors(out, var_target)
  disc = c / steps**order + 2.5 * options.get("snr", 0.0) ** 2  # pc: unadjusted Langevin's O(snr^2) bias
  tol_mean = 5.0 / math.sqrt(N_SAMPLES) + disc
  tol_var = 5.0 * math.sqrt(2.0 / N_SAMPLES) + disc
  assert np.all(np.isfinite(out))
  assert np.all(np.abs(mean_err) < tol_mean), (mean_err, tol_mean)
  assert np.all(np.abs(var_err) < tol_var), (var_err, tol_var)
  return var_err


# Steps at which each bias is >> its standard error (0.8 % at n = 2^15) and near-asymptotic.
ORDER_STEPS = {
    "ddpm": (16, 32, 64),
    "ddim_eta0.5": (16, 32, 64),
    "euler_maruyama": (8, 16, 32),
    "edm_stochastic": (8, 16, 32),
    "dpmpp_2m_sde_heun": (16, 24, 32),
    "dpmpp_3m_sde": (6, 12, 24),
}
# Every solver on 'sd' or on the continuous VPLinear (test_weak_order checks the moments on
# VPLinear at every N), most on both; rectified flow from t = 1 (alpha = 0) for those that
# allow it (ddpm from alpha = 0: test_ddim_eta0_is_euler_and_eta1_is_ddpm).
MOMENT_CASES = [(c, "sd") for c in ("ddpm", "ddim_eta0.5", "edm_stochastic", "dpmpp_2m_sde", "dpmpp_3m_sde", "pc")]
MOMENT_CASES += [(c, "vp_linear") for c in ("dpmpp_2m_sde", "pc_em")]
MOMENT_CASES += [(c, "rectified_flow") for c in ("ddim_eta0.5", "dpmpp_3m_sde")]


@pytest.mark.parametrize("config,process_name", MOMENT_CASES)
def test_moments(config, process_name):
  """Sample mean and variance match the data within statistical + discretization tolerance."""
  steps = {1: 300, 2: 100, 3: 50}[CONFIGS[config][2]]
  _check_moments(*_run(config, process_name, steps + 1), config, steps)


@pytest.mark.parametrize("config", list(ORDER_STEPS))
def test_weak_order(config):
  """On VPLinear the variance bias of the low-variance coordinate shrinks like N^-p (log-log slope).

  The moments are checked at every N as in ``test_moments``. dpmpp_2m_sde's midpoint
  variant is not here: its bias changes sign near 16 steps, so no slope is measurable.
  """
  order = CONFIGS[config][2]
  steps = np.array(ORDER_STEPS[config])
  bias = np.array([_check_moments(*_run(config, "vp_linear", int(k) + 1), config, int(k))[0] for k in steps])
  slope = -np.polyfit(np.log(steps), np.log(np.abs(bias)), 1)[0]
  assert np.all(np.abs(bias) > 0.025), bias  # > 3 standard errors
  assert order - 0.5 < slope < order + 1.0, (bias, slope)


@pytest.mark.parametrize("name,order", [("dpmpp_2m_sde", 2), ("dpmpp_3m_sde", 3)])
def test_deterministic_limit_order(x64, name, order):
  """eta = 0 is a deterministic multistep solver: pathwise error vs the exact flow ~ N^-order.

  (With k-diffusion's / diffusers' d2 weight -phi3 instead of -2 phi3 the 3M slope is 2.)
  """
  process = make_process("vp_linear")
  solver, denoise = SDE_SOLVERS[name](process, eta=0.0), _denoiser(process)
  x = _marginal(process, process.t_max, jax.random.key(1), 16)
  errors, steps = [], np.array([32, 64, 128])
  for k in steps:
    ts = _grid("vp_linear", process, int(k) + 1, "karras")
    y = _loop(solver, denoise, x, ts, jax.random.key(0))[-1]
    exact = GM.gaussian_flow(x, process.alpha(ts[0]), process.sigma(ts[0]), process.alpha(ts[-1]),
                             process.sigma(ts[-1]))
    errors.append(float(jnp.max(jnp.abs(y - exact)) / process.sigma(ts[-1])))
  slope = -np.polyfit(np.log(steps), np.log(errors), 1)[0]
  assert order - 0.2 < slope < order + 0.3, (errors, slope)


def test_affine_denoiser_is_the_exact_one():
  process = make_process("sd")
  x = _marginal(process, 500.0, jax.random.key(0), 8)
  r = tolerances.sampler_rtol(1)  # one evaluation of each closed form: rounding only
  exact = GM.denoiser(process)(x, 500.0)
  np.testing.assert_allclose(_denoiser(process)(x, 500.0), exact, rtol=r, atol=r * np.abs(exact).max())


# ----------------------------------------------------------------------------------
# Identities between solvers.
# ----------------------------------------------------------------------------------
def _step_pair(process, solver_a, solver_b, ts, x, seed=3):
  """Trajectories of two solvers over ts with the same per-step keys."""
  denoise = _denoiser(process)
  return [_loop(solver, denoise, x, ts, jax.random.key(seed)) for solver in (solver_a, solver_b)]


@pytest.mark.parametrize("process_name", ["sd", "rectified_flow"])
def test_ddim_eta0_is_euler_and_eta1_is_ddpm(process_name):
  """eta = 0 is ode.euler (bitwise op by op, from alpha = 0 on rectified flow; jit may fuse
  differently), eta = 1 is ddpm (rectified flow: its first step is from alpha = 0)."""
  process = make_process(process_name)
  ts = _grid(process_name, process, 8)
  x = _marginal(process, ts[0], jax.random.key(0), 64)
  ddim0, euler, denoise = SDE_SOLVERS["ddim"](process, eta=0.0), ode.euler(process), _denoiser(process)
  if process_name == "sd":
    a, b = _step_pair(process, ddim0, euler, ts, x)
    r = tolerances.sampler_rtol(len(ts) - 1)  # jit fuses the two differently: rounding only, 2 runs x 7 steps
    np.testing.assert_allclose(a, b, rtol=r, atol=r * np.abs(b).max())
    return
  y_ddim = y_euler = x  # op by op (slow to dispatch: one process suffices)
  for i in range(len(ts) - 1):
    y_ddim, _ = ddim0.step(denoise, y_ddim, ts[i], ts[i + 1], (), jax.random.key(i))
    y_euler, _ = euler.step(denoise, y_euler, ts[i], ts[i + 1], (), None)
    assert np.all(np.isfinite(y_ddim)) and np.array_equal(y_ddim, y_euler)
  a, b = _step_pair(process, SDE_SOLVERS["ddim"](process, eta=1.0), SDE_SOLVERS["ddpm"](process), ts, x)
  assert np.all(np.isfinite(a))
  r = tolerances.sampler_rtol(len(ts) - 1)  # same keys, algebraically equal steps: rounding only
  np.testing.assert_allclose(a, b, rtol=r, atol=r * np.abs(b).max())


def test_ddpm_is_the_ddpm_posterior(x64):
  """On SD's DiscreteVP between integer timesteps: Ho et al. (2020) eq. 7, from the betas."""
  process = make_process("sd")
  betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
  abar = np.cumprod(1.0 - betas)
  x = jax.random.normal(jax.random.key(0), (4, 3), jnp.float64)
  x0 = jax.random.normal(jax.random.key(1), (4, 3), jnp.float64)
  key = jax.random.key(2)
  z = np.asarray(jax.random.normal(key, x.shape, x.dtype))
  solver = SDE_SOLVERS["ddpm"](process)
  for t, tp in [(999, 979), (500, 499), (20, 0)]:
    beta = 1.0 - abar[t] / abar[tp]  # the step's effective beta
    mean = (np.sqrt(abar[tp]) * beta / (1 - abar[t]) * x0
            + np.sqrt(1 - beta) * (1 - abar[tp]) / (1 - abar[t]) * x)
    var = (1 - abar[tp]) / (1 - abar[t]) * beta
    got, _ = solver.step(lambda y, s: x0, x, jnp.float64(t), jnp.float64(tp), (), key)
    np.testing.assert_allclose(got, mean + np.sqrt(var) * z, rtol=1e-10, atol=1e-12)


def test_edm_stochastic_without_churn_is_heun():
  process = make_process("vp_linear")
  ts = _grid("vp_linear", process, 6, "karras")
  x = _marginal(process, ts[0], jax.random.key(0), 32)
  a, b = _step_pair(process, SDE_SOLVERS["edm_stochastic"](process), ode.heun(process), ts, x)
  r = tolerances.sampler_rtol(len(ts) - 1, evals_per_step=2)  # Heun: 2 evaluations a step, rounding only
  np.testing.assert_allclose(a, b, rtol=r, atol=r * np.abs(b).max())


@pytest.mark.skipif("dpmpp_2m" not in ode.ODE_SOLVERS, reason="no deterministic dpmpp_2m in ode.py")
def test_dpmpp_2m_sde_eta0_is_dpmpp_2m():
  process = make_process("sd")
  ts = _grid("sd", process, 10, "karras")
  x = _marginal(process, ts[0], jax.random.key(0), 32)
  ours, theirs = _step_pair(process, SDE_SOLVERS["dpmpp_2m_sde"](process, eta=0.0),
                            ode.ODE_SOLVERS["dpmpp_2m"](process, lower_order_final=False), ts, x)
  r = tolerances.sampler_rtol(len(ts) - 1)  # eta = 0 drops the noise term: the same recursion up to rounding
  np.testing.assert_allclose(ours, theirs, rtol=r, atol=r * np.abs(theirs).max())


def test_sample_driver_matches_step_loop():
  """``sample`` (lax.scan, keys split once per step) runs exactly the loop used above."""
  process, solver = _setup("dpmpp_3m_sde", "vp_linear")
  denoise = _denoiser_for("dpmpp_3m_sde", "vp_linear")
  ts = _grid("vp_linear", process, 6)
  x = _marginal(process, ts[0], jax.random.key(0), N_SAMPLES)  # the shape of test_weak_order: same compiled step
  traj = _loop(solver, denoise, x, ts, jax.random.key(5), split=True)
  out = sample(solver, denoise, x, jnp.asarray(ts), key=jax.random.key(5), denoise_final=False)
  r = tolerances.sampler_rtol(len(ts) - 1)  # lax.scan vs the loop: the same ops, fused differently at most
  np.testing.assert_allclose(out, traj[-1], rtol=r, atol=r * np.abs(traj[-1]).max())


# ----------------------------------------------------------------------------------
# Pinned against k-diffusion (same sigmas, same noise): sample_dpmpp_2m_sde / 3m_sde.
# ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name,options,num_points", [
    ("dpmpp_2m_sde", {"solver_type": "midpoint"}, 12),
    ("dpmpp_2m_sde", {"solver_type": "heun", "eta": 0.5}, 12),
    ("dpmpp_3m_sde", {}, 3),  # the first two steps; from step 3 on k-diffusion's d2 weight is half ours
])
def test_k_diffusion_parity(x64, ksampling, name, options, num_points):
  import torch

  process = make_process("edm")  # alpha = 1, t = sigma: k-diffusion's coordinates
  sigmas = (20.0 ** (1 / 7) + np.linspace(0, 1, num_points) * (0.02 ** (1 / 7) - 20.0 ** (1 / 7))) ** 7
  ts = sigmas  # EDM: t = sigma
  denoise = _denoiser(process)
  x = _marginal(process, ts[0], jax.random.key(0), 8)
  keys = jax.random.split(jax.random.key(1), num_points - 1)  # as ``_loop(split=True)`` and ``sample``
  noises = iter([torch.from_numpy(np.array(jax.random.normal(k, x.shape, x.dtype))) for k in keys])

  def model(xt, sigma):  # the same exact denoiser, in numpy (alpha = 1)
    v = np.asarray(VAR)
    return torch.from_numpy(MU + v / (v + float(sigma[0]) ** 2) * (xt.numpy() - MU))

  sigmas = torch.from_numpy(np.append(ts, 0.0))
  ref = getattr(ksampling, "sample_" + name)(model, torch.from_numpy(np.array(x)), sigmas, disable=True,
                                              noise_sampler=lambda s, s_next: next(noises), **options)
  solver = SDE_SOLVERS[name](process, **options)
  y = _loop(solver, denoise, x, ts, jax.random.key(1), split=True)[-1]
  np.testing.assert_allclose(denoise(y, ts[-1]), ref.numpy(), rtol=1e-9, atol=1e-9)
