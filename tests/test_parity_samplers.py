"""Parity of diffjax's samplers with diffusers' schedulers and k-diffusion's samplers.

Each case runs the reference library and diffjax on the same noise levels, with the
same exact denoiser of a small Gaussian mixture (a torch model wrapping the same
mixture on the reference side) and the same initial noise, and compares the final
samples in float32 (max abs difference <= ATOL, derived at its definition).

Coordinates: diffjax works in the process's VP coordinates x = alpha x~. The Euler
family of diffusers and k-diffusion work in the variance-exploding x~ = x / alpha
with sigma~ = sigma / alpha (``process.edm_sigma``): their initial latents are
``noise * init_noise_sigma`` (resp. ``noise * sigmas[0]``), which is
``noise * init_noise_sigma * alpha(t0)`` in diffjax's coordinates, and
``scale_model_input`` divides by sqrt(sigma~^2 + 1), i.e. returns x. DDIM, DPM-Solver
and UniPC work in VP coordinates already. Final samples are clean data in every library.

The diffjax grid is built from the reference's own timesteps (integer timesteps
are process times of the DiscreteVP as they are) or sigmas (mapped by
``process.t_from_edm_sigma``); the final jump to sigma = 0 is ``denoise_final``.
Where a reference's last step is not that jump (k-diffusion's LMS, DPM-Solver steps)
both stop at the last sigma > 0; stochastic samplers get the same normals (k-diffusion's
``noise_sampler``). Both sides compute in float32; the float32 round-off of either
side is a few 1e-6 here (measured against float64 runs).
"""

from __future__ import annotations

import functools
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tolerances

from diffjax.analytic import GaussianMixture
from diffjax.processes import make_process
from diffjax.samplers import SOLVERS, grids, make_solver, sample

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

pytestmark = [pytest.mark.reference, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

# Rounding model for the final samples (each side float32; the torch denoiser rounds its float64
# result once): per step ~ SAMPLER_STEP_OPS = 56 roundings, relative to the data scale M = 3.95
# (max |mean| + 3 sd of the mixture: the flows contract errors made at high noise to it), over at
# most 25 steps. The worst-case bound 2 gamma(25 * 56) M = 6.6e-4 exceeds what one wrong timestep
# does (moving one middle timestep of 25-step DDIM by 1 changes the samples by 4.5e-5), so the
# probabilistic bound is used (Higham & Mary 2019: lambda sqrt(n) u, violated with probability
# < 2 exp(-lambda^2 / 2) per element and far less for the max of correlated elements), lambda = 3,
# n = 2 sides x 25 x 56: ATOL = 4.0e-5 (measured worst: 7.9e-6, k-diffusion's dpmpp_2m).
ATOL = 3.0 * math.sqrt(2 * 25 * tolerances.SAMPLER_STEP_OPS) * tolerances.U32 * 3.95
N_SAMPLES, DIM = 64, 3
SD_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


# ------------------------------------------------------------------------------------
# Shared data: the mixture, its torch denoiser, the initial noise.
# ------------------------------------------------------------------------------------
def _mixture_arrays():
  rng = np.random.default_rng(0)
  k = 5
  weights = rng.uniform(0.5, 1.5, k)
  means = rng.normal(0.0, 1.0, (k, DIM))
  variances = rng.uniform(0.02, 0.3, (k, DIM))
  return weights / weights.sum(), means, variances


class TorchMixtureDenoiser:
  """E[x0 | x~ = x0 + s eps] of the same diagonal mixture, in torch float64 (the reference's model)."""

  def __init__(self, weights, means, variances):
    self.logw = torch.tensor(np.log(weights), dtype=torch.float64)
    self.means = torch.tensor(means, dtype=torch.float64)
    self.variances = torch.tensor(variances, dtype=torch.float64)

  def __call__(self, x_ve, s):
    x = x_ve.to(torch.float64)[:, None, :]
    var = self.variances + torch.as_tensor(s, dtype=torch.float64) ** 2
    diff = x - self.means
    log_joint = self.logw - 0.5 * torch.sum(diff**2 / var + torch.log(2 * np.pi * var), dim=-1)
    r = torch.softmax(log_joint, dim=-1)
    comp = self.means + self.variances / var * diff
    return torch.einsum("nk,nkd->nd", r, comp)


@pytest.fixture(scope="module")
def setup():
  w, m, v = _mixture_arrays()
  process = make_process("sd")
  gmm = GaussianMixture.create(w, m, v)
  noise = np.random.default_rng(1).standard_normal((N_SAMPLES, DIM)).astype(np.float32)
  return types.SimpleNamespace(process=process, denoise=gmm.denoiser(process), torch_d=TorchMixtureDenoiser(w, m, v),
                               noise=noise)


@functools.cache
def _sampler(solver_name, denoise_final, options):
  """jit(sample) for one solver configuration; grids of one length share a compilation."""
  process = make_process("sd")
  denoise = GaussianMixture.create(*_mixture_arrays()).denoiser(process)
  solver = make_solver(solver_name, process, **dict(options))
  return jax.jit(lambda x, ts: sample(solver, denoise, x, ts, denoise_final=denoise_final))


def _diffjax(solver_name, ts, x_init, denoise_final=True, **options):
  """diffjax's sample from x_init (VP coordinates at ts[0]) along ts, float32 numpy."""
  ts = jnp.asarray(np.asarray(ts, np.float32))
  out = _sampler(solver_name, denoise_final, tuple(sorted(options.items())))(jnp.asarray(x_init, jnp.float32), ts)
  assert out.dtype == jnp.float32
  return np.asarray(out)


def _t_from_sigmas(process, sigmas):
  """Process times of the EDM sigmas (sigma / alpha) of a reference grid."""
  return np.asarray(process.t_from_edm_sigma(jnp.asarray(np.asarray(sigmas, np.float32))))


def _max_diff(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert np.all(np.isfinite(a)) and np.all(np.isfinite(b))
  return float(np.max(np.abs(a - b)))


def _requires(*names):
  missing = [n for n in names if n not in SOLVERS]
  if missing:
    pytest.skip(f"diffjax has no solver {missing} yet")


# ------------------------------------------------------------------------------------
# diffusers
# ------------------------------------------------------------------------------------
def _run_diffusers(scheduler, setup, num_steps, stop_before_last=False):
  """The standard diffusers denoising loop with the mixture as the model.

  The model sees the scheduler's input x (VP coordinates) and timestep; its noise
  level is the scheduler's own sigma at that timestep (looked up), and it returns
  eps or x0 as ``prediction_type`` asks. Returns (final sample, number of model calls).
  ``stop_before_last``: the last step (to sigma = 0) returns the model's x0 instead.
  """
  scheduler.set_timesteps(num_steps)
  timesteps = scheduler.timesteps
  if hasattr(scheduler, "sigmas") and scheduler.sigmas is not None and len(scheduler.sigmas) > len(timesteps):
    table_t, table_s = timesteps.double(), scheduler.sigmas[: len(timesteps)].double()
  else:  # DDIM: sigma from alphas_cumprod at the integer timestep
    ac = scheduler.alphas_cumprod.double()
    table_t = timesteps.double()
    table_s = torch.sqrt((1 - ac[timesteps]) / ac[timesteps])
  calls = 0

  def model(x, t):
    nonlocal calls
    calls += 1
    s = table_s[torch.argmin(torch.abs(table_t - float(t)))]
    x_ve = x.double() * torch.sqrt(1 + s**2)
    d = setup.torch_d(x_ve, s)
    if scheduler.config.prediction_type == "sample":
      return d.float()
    return ((x_ve - d) / s).float()

  x = torch.from_numpy(setup.noise) * scheduler.init_noise_sigma
  for i, t in enumerate(timesteps):
    out = model(scheduler.scale_model_input(x, t), t)
    if stop_before_last and i == len(timesteps) - 1:
      s = table_s[-1]
      return setup.torch_d(x.double() * torch.sqrt(1 + s**2), s).float().numpy(), calls
    x = scheduler.step(out, t, x).prev_sample
  return x.numpy(), calls


def _sigma0(scheduler):
  return float(scheduler.sigmas[0]) if getattr(scheduler, "sigmas", None) is not None else None


@pytest.mark.parametrize("spacing,num_steps", [("leading", 10), ("trailing", 10), ("leading", 25), ("trailing", 8)])
def test_ddim(setup, spacing, num_steps):
  """DDIM eta = 0, set_alpha_to_one: the final step is x0 = D(x, t_last), diffjax's denoise_final."""
  s = diffusers.DDIMScheduler(**SD_BETAS, set_alpha_to_one=True, steps_offset=1 if spacing == "leading" else 0,
                              timestep_spacing=spacing, clip_sample=False)
  ref, calls = _run_diffusers(s, setup, num_steps)
  ts = s.timesteps.numpy().astype(np.float64)
  np.testing.assert_array_equal(ts, grids.ddim_timesteps(1000, num_steps, spacing, 1 if spacing == "leading" else 0))
  ours = _diffjax("ddim", ts, setup.noise)
  assert calls == num_steps
  assert _max_diff(ours, ref) <= ATOL


@pytest.mark.parametrize("num_steps", [4, 10, 25])
def test_pndm(setup, num_steps):
  """PNDMScheduler as Stable Diffusion configures it (PLMS: skip_prk_steps, leading + 1, alpha_bar_0 at the end).

  Its N + 1 timesteps repeat the second one (the Heun start); diffjax's pndm runs on the
  N distinct ones and the final t = 0 (alpha_bar_0, set_alpha_to_one=False), without the
  jump to sigma = 0; the result is in VP coordinates on both sides.
  """
  s = diffusers.PNDMScheduler(**SD_BETAS, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)
  ref, calls = _run_diffusers(s, setup, num_steps)
  distinct = grids.ddim_timesteps(1000, num_steps, "leading", 1)
  timesteps = s.timesteps.numpy()
  np.testing.assert_array_equal(timesteps, np.concatenate([distinct[:1], distinct[1:2], distinct[1:]]))
  ours = _diffjax("pndm", np.concatenate([distinct, [0.0]]), setup.noise, denoise_final=False)
  assert calls == num_steps + 1
  assert _max_diff(ours, ref) <= ATOL


def _euler_family_init(setup, scheduler, ts):
  alpha0 = float(setup.process.alpha(jnp.float32(ts[0])))
  return setup.noise * float(scheduler.init_noise_sigma) * alpha0


@pytest.mark.parametrize("karras", [False, True])
@pytest.mark.parametrize("solver", ["euler", "heun"])
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_euler_heun_discrete(setup, solver, karras):
  """EulerDiscreteScheduler / HeunDiscreteScheduler on their sigmas (linspace or Karras)."""
  cls = diffusers.EulerDiscreteScheduler if solver == "euler" else diffusers.HeunDiscreteScheduler
  num_steps = 10
  s = cls(**SD_BETAS, use_karras_sigmas=karras)
  ref, calls = _run_diffusers(s, setup, num_steps)
  sigmas = s.sigmas.numpy()
  if solver == "heun":  # interleaved s0, s1, s1, s2, s2, ..., 0
    sigmas = np.concatenate([sigmas[:1], sigmas[1:-1:2], sigmas[-1:]])
  assert sigmas[-1] == 0 and sigmas.size == num_steps + 1
  ts = _t_from_sigmas(setup.process, sigmas[:-1])
  ours = _diffjax(solver, ts, _euler_family_init(setup, s, ts))
  assert calls == (num_steps if solver == "euler" else 2 * num_steps - 1)
  assert _max_diff(ours, ref) <= ATOL


def _multistep_grid(setup, scheduler):
  """diffjax grid of a VP multistep scheduler: its sigmas (mapped to times), without the final 0."""
  sigmas = scheduler.sigmas.numpy()
  assert sigmas[-1] == 0 and sigmas.size == len(scheduler.timesteps) + 1
  return _t_from_sigmas(setup.process, sigmas[:-1])


@pytest.mark.parametrize("order,num_steps,karras", [(2, 10, False), (2, 10, True), (2, 20, False), (3, 10, False),
                                                    (3, 10, True), (3, 20, False)])
def test_dpmsolver_multistep(setup, order, num_steps, karras):
  """DPMSolverMultistepScheduler (dpmsolver++, midpoint, final sigma 0) == dpmpp_2m / dpmpp_3m.

  diffusers lowers the order of the last two steps only when there are fewer than 15
  (lower_order_final), diffjax's lower_order_final=True always: n = 20 uses False for 3M.
  """
  name = f"dpmpp_{order}m"
  _requires(name)
  s = diffusers.DPMSolverMultistepScheduler(**SD_BETAS, algorithm_type="dpmsolver++", solver_order=order,
                                            use_karras_sigmas=karras)
  ref, calls = _run_diffusers(s, setup, num_steps)
  ts = _multistep_grid(setup, s)
  if not karras:  # integer timesteps: the grid is the timesteps themselves
    # t = t_from_edm_sigma(float32 sigma): ~20 roundings in log sigma over its smallest slope (0.0033 per
    # unit t, at t = 421) plus ulp(999): 20 u / 0.0033 + 999 u = 4.2e-4 < 2e-3 << 1, an off-by-one timestep.
    np.testing.assert_allclose(ts, s.timesteps.numpy(), atol=2e-3)
  ours = _diffjax(name, ts, setup.noise, lower_order_final=num_steps < 15 or order == 2)
  assert calls == num_steps
  assert _max_diff(ours, ref) <= ATOL


@pytest.mark.parametrize("variant,order,karras", [("bh2", 2, False), ("bh2", 2, True), ("bh2", 3, False),
                                                  ("bh1", 2, False)])
def test_unipc_multistep(setup, variant, order, karras):
  """UniPCMultistepScheduler (predict_x0, corrector on, lower_order_final) == unipc_bh1 / unipc_bh2.

  diffusers' bh1 last step to sigma = 0 returns NaN (B(h) = -h = -inf times a zero
  residual); its result would be the data prediction it has just computed, D at the
  last uncorrected x, which the bh1 case takes directly (``stop_before_last``).
  """
  name = f"unipc_{variant}"
  _requires(name)
  num_steps = 10
  s = diffusers.UniPCMultistepScheduler(**SD_BETAS, solver_type=variant, solver_order=order, use_karras_sigmas=karras)
  ref, calls = _run_diffusers(s, setup, num_steps, stop_before_last=variant == "bh1")
  ours = _diffjax(name, _multistep_grid(setup, s), setup.noise, order=order)
  assert calls == num_steps
  assert _max_diff(ours, ref) <= ATOL


# ------------------------------------------------------------------------------------
# k-diffusion (the ``ksampling`` fixture of conftest.py)
# ------------------------------------------------------------------------------------
def _karras_sigmas(setup, ksampling, n):
  p = setup.process
  s_min, s_max = float(p.edm_sigma(p.t_min)), float(p.edm_sigma(p.t_max))
  return ksampling.get_sigmas_karras(n, s_min, s_max).numpy()


def test_karras_grid(setup, ksampling):
  """grids.karras in EDM sigma == k-diffusion's get_sigmas_karras (without its appended 0)."""
  for n in (2, 5, 10, 40):
    ref = _karras_sigmas(setup, ksampling, n)
    assert ref[-1] == 0
    ours = np.asarray(setup.process.edm_sigma(grids.karras(setup.process, n)))
    # sigma = (a + i / (n - 1) (b - a))^7: rho = 7 multiplies the base's ~4 roundings, pow adds
    # TRANSCENDENTAL_OPS; both sides: 2 (7 * 4 + 4) u = 3.8e-6 relative, 5x below 2e-5.
    np.testing.assert_allclose(ours, ref[:-1], rtol=2e-5)


def _run_k(setup, fn, sigmas, **kwargs):
  calls = 0

  def model(x, sigma):
    nonlocal calls
    calls += 1
    return setup.torch_d(x, sigma[0].double()).float()

  x = torch.from_numpy(setup.noise) * float(sigmas[0])
  out = fn(model, x, torch.from_numpy(np.asarray(sigmas, np.float32)), disable=True, **kwargs)
  return out.numpy(), calls


K_CASES = {  # k-diffusion sampler -> (diffjax solver, calls for n grid points)
    "sample_euler": ("euler", lambda n: n),
    "sample_heun": ("heun", lambda n: 2 * n - 1),
    "sample_dpmpp_2m": ("dpmpp_2m", lambda n: n),
}


@pytest.mark.parametrize("name", sorted(K_CASES))
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_k_diffusion(setup, ksampling, name):
  """k-diffusion's sample_* on get_sigmas_karras == diffjax on grids.karras (same sigmas)."""
  solver, expected_calls = K_CASES[name]
  _requires(solver)
  n = 10
  sigmas = _karras_sigmas(setup, ksampling, n)
  ref, calls = _run_k(setup, getattr(ksampling, name), sigmas)
  ts = _t_from_sigmas(setup.process, sigmas[:-1])
  x_init = setup.noise * float(sigmas[0]) * float(setup.process.alpha(jnp.float32(ts[0])))
  ours = _diffjax(solver, ts, x_init)
  assert calls == expected_calls(n)
  assert _max_diff(ours, ref) <= ATOL


def test_k_diffusion_lms(setup, ksampling):
  """sample_lms (order 4) == diffjax lms on the same sigmas.

  k-diffusion's last LMS step integrates its polynomial to sigma = 0, which diffjax's
  driver replaces by the jump D(x, ts[-1]); so both stop at the last sigma > 0 here
  (k-diffusion on the sigmas without the appended 0, diffjax with denoise_final=False).
  """
  _requires("lms")
  n = 10
  sigmas = _karras_sigmas(setup, ksampling, n)[:-1]
  ref, calls = _run_k(setup, ksampling.sample_lms, sigmas)
  ts = _t_from_sigmas(setup.process, sigmas)
  alpha = setup.process.alpha(jnp.asarray(ts, jnp.float32))
  x_init = setup.noise * float(sigmas[0]) * float(alpha[0])
  ours = _diffjax("lms", ts, x_init, denoise_final=False)
  assert calls == n - 1
  assert _max_diff(np.asarray(ours) / float(alpha[-1]), ref) <= ATOL


@pytest.mark.parametrize("order", [1, 2, 3])
def test_k_diffusion_dpm_solver(setup, ksampling, order):
  """k-diffusion's DPMSolver.dpm_solver_{1,2,3}_step (noise prediction, r = 1/2; 1/3, 2/3) == dpm_solver.

  Steps uniform in -log sigma (diffjax's log_snr grid), stopping at sigma_min (no jump to 0).
  """
  _requires("dpm_solver")
  n = 6
  p = setup.process
  ts = np.asarray(grids.log_snr_uniform(p, n))
  sigmas = np.asarray(p.edm_sigma(jnp.asarray(ts)), np.float32)
  calls = 0

  def model(x, sigma):
    nonlocal calls
    calls += 1
    return setup.torch_d(x, sigma[0].double()).float()

  dpm = ksampling.DPMSolver(model)
  step = getattr(dpm, f"dpm_solver_{order}_step")
  lam = -torch.log(torch.tensor(sigmas))
  x = torch.from_numpy(setup.noise) * float(sigmas[0])
  for i in range(n - 1):
    x, _ = step(x, lam[i], lam[i + 1])
  alpha = p.alpha(jnp.asarray(ts, jnp.float32))
  ours = _diffjax("dpm_solver", ts, setup.noise * float(sigmas[0]) * float(alpha[0]), denoise_final=False, order=order)
  assert calls == order * (n - 1)
  assert _max_diff(np.asarray(ours) / float(alpha[-1]), x.numpy()) <= ATOL


@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
def test_k_diffusion_dpmpp_2m_sde(setup, ksampling, solver_type):
  """sample_dpmpp_2m_sde (eta = 1) == diffjax's dpmpp_2m_sde with the same noise.

  k-diffusion's ``noise_sampler`` is handed the standard normals diffjax's ``sample``
  draws (one key per step from ``jax.random.split(key, n - 1)``), so both runs see the
  same Brownian increments; the last step (to sigma = 0) is noise-free in both.
  """
  try:
    from diffjax.samplers import sde
  except ImportError:
    pytest.skip("diffjax.samplers.sde is not there yet")
  n = 10
  sigmas = _karras_sigmas(setup, ksampling, n)
  ts = _t_from_sigmas(setup.process, sigmas[:-1])
  key = jax.random.key(3)
  zs = iter([torch.tensor(np.asarray(jax.random.normal(k, setup.noise.shape, jnp.float32)))
             for k in jax.random.split(key, n - 1)])
  ref, calls = _run_k(setup, ksampling.sample_dpmpp_2m_sde, sigmas, eta=1.0, solver_type=solver_type,
                      noise_sampler=lambda sigma, sigma_next: next(zs))
  solver = sde.dpmpp_2m_sde(setup.process, eta=1.0, solver_type=solver_type)
  x_init = setup.noise * float(sigmas[0]) * float(setup.process.alpha(jnp.float32(ts[0])))
  ours = jax.jit(lambda x, ts, key: sample(solver, setup.denoise, x, ts, key=key))(
      jnp.asarray(x_init), jnp.asarray(ts, jnp.float32), key)
  assert calls == n
  assert _max_diff(ours, ref) <= ATOL
