"""Tests of the fitted samplers (diffjax.samplers.optimized_grids).

Oracles: polynomial extrapolation is exact on polynomials; with zero or DPM-Solver++(2M)
coefficients the fitted solver *is* DDIM or 2M; least squares recovers coefficients that
generated the reference; for isotropic Gaussian data x~ - mu stays a fixed multiple of
its start, so one fitted coefficient per step makes the sampler exact on any fresh noise.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tolerances

from diffjax import processes
from diffjax.analytic import GaussianMixture
from diffjax.samplers import calibration, grids, make_solver, sample
from diffjax.samplers import optimized_grids as og

SD = processes.make_process("sd")
MIXTURE = GaussianMixture.create([0.4, 0.6], [[-1.0, 0.5], [0.8, -0.4]], [[0.05, 0.2], [0.1, 0.02]])


def _counting(denoise):
  calls = []

  def counted(x, t):
    jax.debug.callback(lambda: calls.append(1))
    return denoise(x, t)

  return counted, calls


@pytest.mark.parametrize("variable", ["sigma", "sigma2"])
def test_lagrange_weights_extrapolate_polynomials_exactly(x64, variable):
  ts = jnp.asarray([0.05, 0.1, 0.2, 0.35])  # t_final first, then the history (noise increasing)
  w = og.lagrange_final_weights(SD, ts[0], ts[1:], variable)
  s = SD.edm_sigma(ts)
  z = s if variable == "sigma" else s**2
  poly = lambda z: 0.3 - 1.7 * z + 0.9 * z**2 - 0.2 * z**3  # degree m - 1 = 3
  np.testing.assert_allclose(float(jnp.sum(w)), 1.0, atol=1e-12)
  np.testing.assert_allclose(float(jnp.dot(w, poly(z))), poly(0.0), atol=1e-9)


def test_zero_coefficients_are_ddim_and_final_jump():
  ts = grids.karras(SD, 6)
  x = jax.random.normal(jax.random.key(0), (64, 2)) * SD.sigma(ts[0])
  denoise = MIXTURE.denoiser(SD)
  fitted = og.FittedSampler(np.asarray(ts), beta=np.zeros((5, 2)), final=np.zeros(2))
  ours = fitted.sample(SD, denoise, x)
  ddim = sample(make_solver("euler", SD), denoise, x, ts)
  r = tolerances.sampler_rtol(len(ts) - 1)  # the same 5 DDIM steps written two ways: rounding only
  np.testing.assert_allclose(ours, ddim, rtol=r, atol=r * np.abs(ddim).max())


def test_dpmpp_2m_coefficients_reproduce_dpmpp_2m():
  n = 7
  ts = grids.log_snr_uniform(SD, n)
  x = jax.random.normal(jax.random.key(1), (64, 2)) * SD.sigma(ts[0])
  denoise = MIXTURE.denoiser(SD)
  lam = -np.log(np.asarray(SD.edm_sigma(ts), np.float64))
  h = np.diff(lam)
  beta = np.zeros((n - 1, 1))
  beta[1:, 0] = -h[1:] / (2 * h[:-1])  # (1 + 1/2r) D_i - 1/2r D_{i-1}, r = h_{i-1} / h_i
  ours = og.FittedSampler(np.asarray(ts), beta=beta, final=np.zeros(1)).sample(SD, denoise, x)
  ref = sample(make_solver("dpmpp_2m", SD, lower_order_final=False), denoise, x, ts)
  r = tolerances.sampler_rtol(n - 1)  # the same 2M recursion (beta from float64 log-SNR steps): rounding only
  np.testing.assert_allclose(ours, ref, rtol=r, atol=r * np.abs(ref).max())


def test_fit_recovers_the_coefficients_that_made_the_reference():
  """A reference produced by the solver family itself is fitted exactly (calib error ~ float32 rounding)."""
  n, history = 6, 3
  ts = grids.karras(SD, n)
  denoise = jax.jit(MIXTURE.denoiser(SD))
  x = jax.random.normal(jax.random.key(2), (512, 2)) * SD.sigma(ts[0])
  rng = np.random.default_rng(0)
  beta = rng.uniform(-0.4, 0.4, (n - 1, history - 1))
  for i in range(n - 1):
    beta[i, i:] = 0.0  # no history before the first grid point
  gamma = rng.uniform(-0.2, 0.2, n - 1)
  # Reference states: run the true coefficients, recording x~ = x / alpha at every grid point.
  solver = og.fitted_multistep(SD, jnp.asarray(beta, jnp.float32), jnp.asarray(gamma, jnp.float32))
  state, xi, states = solver.init(x, ts), x, [x / SD.alpha(ts[0])]
  for i in range(n - 1):
    xi, state = solver.step(denoise, xi, ts[i], ts[i + 1], state, None)
    states.append(xi / SD.alpha(ts[i + 1]))
  target = denoise(xi, ts[-1])
  fitted = og.fit_multistep(SD, denoise, x, ts, jnp.stack(states), target, history=history)
  # Least squares on float32 states made by the true coefficients: the residual is rounding (rms
  # ~ sampler_rtol below), the recovered coefficients err by it times the fit's conditioning (measured
  # 7.7e-7); 2e-3 leaves >1000x on that and is far below the +-0.4 range of the coefficients.
  np.testing.assert_allclose(fitted.beta, beta, atol=2e-3)
  np.testing.assert_allclose(fitted.gamma, gamma, atol=2e-3)
  # the fitted run reproduces the reference up to rounding of two 5-step runs (measured 6.2e-8)
  assert fitted.calib_rmse < tolerances.sampler_rtol(n - 1) * float(jnp.sqrt(jnp.mean(target**2)))


def test_fitted_sampler_is_exact_for_gaussian_data_on_fresh_noise():
  """Isotropic Gaussian data: x~ - mu moves by one scalar factor per step, which the fitted gamma matches,
  so a 4-point fitted sampler is exact on any noise, where 2M on the same grid is far off."""
  gauss = GaussianMixture.create([1.0], [[0.3, -0.2, 0.5]], [[0.3, 0.3, 0.3]])
  denoise = jax.jit(gauss.denoiser(SD))
  ts = grids.karras(SD, 4)
  alpha, sigma = SD.alpha(ts), SD.sigma(ts)
  exact = lambda x, i: gauss.gaussian_flow(x, alpha[0], sigma[0], alpha[i], sigma[i]) / alpha[i]
  x_fit = jax.random.normal(jax.random.key(3), (2048, 3)) * sigma[0]
  states = jnp.stack([exact(x_fit, i) for i in range(4)])
  target = gauss.gaussian_flow(x_fit, alpha[0], sigma[0], 1.0, 0.0)
  fitted = og.fit_multistep(SD, denoise, x_fit, ts, states, target, history=2)
  x_new = jax.random.normal(jax.random.key(4), (2048, 3)) * sigma[0]
  truth = gauss.gaussian_flow(x_new, alpha[0], sigma[0], 1.0, 0.0)
  counted, calls = _counting(denoise)
  ours = fitted.sample(SD, counted, x_new)
  jax.effects_barrier()
  err = float(jnp.sqrt(jnp.mean((ours - truth) ** 2)))
  err_2m = float(jnp.sqrt(jnp.mean((sample(make_solver("dpmpp_2m", SD), denoise, x_new, ts) - truth) ** 2)))
  assert len(calls) == 4  # one evaluation per grid point, the final estimate included
  # exact up to rounding: sampler_rtol(3) = 2e-5 relative to |x| <= ~2, below 1e-4 (measured 7e-8; 2M: 0.03)
  assert err < 1e-4 and err_2m > 100 * err, (err, err_2m)


def _lattice_reference(size: int, seed: int, batch: int):
  """(denoise, lattice, x, states, target) for MIXTURE: a fine 2M solve from lattice point to lattice point, 40
  substeps each (its error << a 5-point sampler's)."""
  denoise = jax.jit(MIXTURE.denoiser(SD))
  lattice = og.log_sigma_lattice(SD, size)
  x = jax.random.normal(jax.random.key(seed), (batch, 2)) * SD.sigma(lattice[0])
  segment = jax.jit(lambda x, a, b: sample(make_solver("dpmpp_2m", SD), denoise, x, jnp.linspace(a, b, 41),
                                           denoise_final=False))
  states, xi = [x / SD.alpha(lattice[0])], x
  for a, b in zip(lattice[:-1], lattice[1:], strict=True):
    xi = segment(xi, a, b)
    states.append(xi / SD.alpha(b))
  return denoise, lattice, x, jnp.stack(states), denoise(xi, lattice[-1])


def test_search_grid_improves_on_its_start_and_round_trips():
  denoise, lattice, x, states, target = _lattice_reference(24, 5, 1024)
  assert np.all(np.diff(np.asarray(lattice)) < 0)
  ends = SD.edm_sigma(jnp.asarray([SD.t_max, SD.t_min]))
  # the lattice's ends are t_max and t_min themselves (measured: equal); 1e-4 >> float32 rounding of edm_sigma
  np.testing.assert_allclose(SD.edm_sigma(lattice[jnp.asarray([0, -1])]), ends, rtol=1e-4)
  states = list(states)
  init = [og.snap_to_lattice(lattice, grids.karras(SD, 5))]
  assert init[0][0] == 0 and np.all(np.diff(init[0]) > 0)
  res = og.search_grid(SD, denoise, x, lattice, jnp.stack(states), target, 5, history=3, init=init, max_sweeps=2)
  start = og.fit_multistep(SD, denoise, x, lattice[np.asarray(init[0])], jnp.stack(states)[np.asarray(init[0])],
                           target, history=3)
  assert res.sampler.calib_rmse <= start.calib_rmse
  assert res.indices[0] == 0 and np.all(np.diff(res.indices) > 0) and res.candidates > 1
  back = og.FittedSampler.from_dict(res.sampler.to_dict())
  # the same compiled sampling from the same float64 coefficients (measured: equal); 1e-6 ~ 16 u |x|
  np.testing.assert_allclose(back.sample(SD, denoise, x), res.sampler.sample(SD, denoise, x), rtol=1e-6, atol=1e-6)


def test_search_remembers_repeated_evaluations_without_changing_its_result(monkeypatch):
  """The search's candidates repeat the best grid's first evaluations on identical inputs: remembered, they are
  not made again, and the search picks the same grid with the same coefficients and scores as without memory."""
  denoise, lattice, x, states, target = _lattice_reference(16, 12, 256)
  x_val = jax.random.normal(jax.random.key(13), (256, 2)) * SD.sigma(lattice[0])
  fine = jax.jit(lambda x: sample(make_solver("dpmpp_2m", SD), denoise, x, grids.log_snr_uniform(SD, 400)))
  args = (SD, denoise, x, lattice, states, target, 5)
  kwargs = dict(history=3, validation=(x_val, fine(x_val)), max_sweeps=2)
  remembered = og.search_grid(*args, **kwargs)
  forgetful = og._Remembered
  monkeypatch.setattr(og, "_Remembered", lambda denoise, size: forgetful(denoise, 0))
  fresh = og.search_grid(*args, **kwargs)
  assert remembered.indices == fresh.indices and remembered.candidates == fresh.candidates
  for name in ("ts", "beta", "gamma", "final", "calib_rmse"):  # the same float64 arithmetic on the same outputs
    np.testing.assert_array_equal(getattr(remembered.sampler, name), getattr(fresh.sampler, name))
  assert fresh.evaluations == 2 * 5 * fresh.candidates
  assert remembered.evaluations < 0.75 * fresh.evaluations, (remembered.evaluations, fresh.evaluations)


def test_a_search_past_its_deadline_scores_its_starts_only_and_a_late_one_matches_no_deadline():
  denoise, lattice, x, states, target = _lattice_reference(16, 12, 256)
  init = [og.snap_to_lattice(lattice, grids.karras(SD, 4, rho=rho)) for rho in (3.0, 7.0)]
  args, kwargs = (SD, denoise, x, lattice, states, target, 4), dict(history=3, init=init, max_sweeps=2)
  late = og.search_grid(*args, **kwargs, deadline=time.time() + 3600)
  free = og.search_grid(*args, **kwargs)
  assert late.indices == free.indices and late.candidates == free.candidates > 2 and not late.stopped_early
  cut = og.search_grid(*args, **kwargs, deadline=time.time() - 1)
  starts = [og.fit_multistep(SD, denoise, x, lattice[np.asarray(i)], states[np.asarray(i)], target, 3) for i in init]
  assert cut.stopped_early and cut.candidates == len(init)
  assert cut.sampler.calib_rmse == min(s.calib_rmse for s in starts)


def test_restarts_return_the_best_descent_of_all_starts():
  """Descents from different starts end in different grids; with ``restarts`` the search returns the best grid
  any of them reaches (the same float64 arithmetic as each descent alone: equal), which here is better than
  the best start's own descent."""
  denoise, lattice, x, states, target = _lattice_reference(16, 12, 256)
  starts = calibration.starting_grids(SD, np.asarray(lattice), 4)
  args, kwargs = (SD, denoise, x, lattice, states, target, 4), dict(history=3, max_sweeps=3, moves=(1, 2))
  alone = [og.search_grid(*args, **kwargs, init=[s]) for s in starts]
  one = og.search_grid(*args, **kwargs, init=starts)
  every = og.search_grid(*args, **kwargs, init=starts, restarts=len(starts))
  assert one.descents == 1 and every.descents == len(starts) and not every.stopped_early
  assert every.sampler.calib_rmse == min(r.sampler.calib_rmse for r in alone)
  assert every.indices == min(alone, key=lambda r: r.sampler.calib_rmse).indices
  assert every.sampler.calib_rmse < one.sampler.calib_rmse, (every.sampler.calib_rmse, one.sampler.calib_rmse)
  assert og.search_grid(*args, **kwargs, init=starts, restarts=None).descents == len(starts)  # None: every start
  cut = og.search_grid(*args, **kwargs, init=starts, restarts=len(starts), deadline=time.time() - 1)
  assert cut.stopped_early and cut.descents == 1 and cut.candidates == len(starts)


def test_rollout_is_the_fitted_sampler():
  """``rollout`` (the search's validation, step by step) computes what ``FittedSampler.sample`` does."""
  denoise, lattice, x, states, target = _lattice_reference(12, 14, 512)
  idx = og.snap_to_lattice(lattice, grids.karras(SD, 6))
  fitted = og.fit_multistep(SD, denoise, x, lattice[np.asarray(idx)], states[np.asarray(idx)], target, history=3)
  x_new = jax.random.normal(jax.random.key(15), (512, 2)) * SD.sigma(lattice[0])
  ours = og.rollout(SD, fitted, denoise, x_new)
  assert ours.dtype == x_new.dtype
  # The same float32 recursion, summed in another order (the scan's history vs the loop's list): 5 steps of
  # rounding relative to the state (|x~| <~ sigma_max).
  scale = float(jnp.max(jnp.abs(x_new / SD.alpha(lattice[0]))))
  tol = tolerances.sampler_rtol(len(idx)) * scale
  np.testing.assert_allclose(fitted.sample(SD, denoise, x_new), ours, rtol=0, atol=tol)
  # the fit's own (float64) error is its float32 rollout's on the fitting batch, to the same rounding
  own = np.asarray(og.rollout(SD, fitted, denoise, x), np.float64) - np.asarray(target, np.float64)
  np.testing.assert_allclose(fitted.calib_rmse, np.sqrt(np.mean(own**2)), rtol=0, atol=tol)


def test_bad_arguments_raise():
  with pytest.raises(ValueError, match="history"):
    og.final_estimate_solver(make_solver("euler", SD), SD, history=0)
  with pytest.raises(ValueError, match="beta"):
    og.fitted_multistep(SD, jnp.zeros(3))
  with pytest.raises(ValueError, match="at least 2"):
    og.fit_multistep(SD, None, jnp.zeros((2, 2)), [0.5], None, None)


def test_refine_lowers_the_validation_error_and_keeps_a_valid_grid():
  """Levenberg-Marquardt from DDIM with a final jump: every accepted iteration lowers the fitting error, the
  returned sampler is the iterate best on the validation batch (its calib_rmse is its error there), the grid
  keeps its first point and stays decreasing; chunked Jacobians give the same iterates as one block."""
  denoise = MIXTURE.denoiser(SD)
  ts = grids.karras(SD, 4)
  fine = jax.jit(lambda x: sample(make_solver("dpmpp_2m", SD), denoise, x, grids.log_snr_uniform(SD, 200)))
  x_fit, x_val = (jax.random.normal(jax.random.key(k), (256, 2)) * SD.sigma(ts[0]) for k in (6, 7))
  start = og.FittedSampler(np.asarray(ts), beta=np.zeros((3, 2)), final=np.zeros(2))  # DDIM + final jump
  start_val = float(jnp.sqrt(jnp.mean((start.sample(SD, denoise, x_val) - fine(x_val)) ** 2)))
  d3 = lambda x, t, cond: denoise(x, t)
  out, log = og.refine(SD, start, d3, x_fit, fine(x_fit), validation=(x_val, fine(x_val)), iterations=6, chunk=256)
  assert [i for i, _, _ in log] == list(range(len(log))) and len(log) >= 3
  fits = [f for _, f, _ in log]
  assert all(b < a for a, b in zip(fits, fits[1:], strict=False)), fits
  assert out.calib_rmse == min(v for _, _, v in log) and log[0][2] == pytest.approx(start_val, rel=1e-4)
  assert out.calib_rmse < 0.8 * start_val, (out.calib_rmse, start_val)
  np.testing.assert_allclose(out.calib_rmse, jnp.sqrt(jnp.mean((out.sample(SD, denoise, x_val) - fine(x_val)) ** 2)),
                             rtol=1e-4)
  assert out.ts[0] == pytest.approx(float(ts[0])) and np.all(np.diff(out.ts) < 0)
  assert out.beta[0, 0] == 0 and out.beta[1, 1] == 0  # no weight on outputs before the first point
  _, chunked = og.refine(SD, start, d3, x_fit, fine(x_fit), validation=(x_val, fine(x_val)), iterations=2, chunk=64)
  np.testing.assert_allclose([f for _, f, _ in chunked], fits[:3], rtol=1e-3)
  # Past its deadline, refinement stops after one iteration and scores the iterate it reached.
  _, cut = og.refine(SD, start, d3, x_fit, fine(x_fit), validation=(x_val, fine(x_val)), iterations=6,
                     deadline=time.time() - 1)
  assert [i for i, _, _ in cut] == [0, 1]


def test_lstsq_drops_a_zero_regressor():
  """A zero regressor gets coefficient 0 and leaves the others' fit unchanged (it used to give 0 / 0 = NaN in the
  normalisation, 1e-300 * 1e-300 underflowing, and LAPACK's "SVD did not converge")."""
  rng = np.random.default_rng(0)
  g = rng.standard_normal((512, 8))
  target = 0.3 * g + 0.01 * rng.standard_normal(g.shape)
  alone = og._lstsq([g], target)
  for regs, where in (([np.zeros_like(g), g], 1), ([g, np.zeros_like(g)], 0)):
    c = og._lstsq(regs, target)
    assert c[1 - where] == 0.0
    np.testing.assert_allclose(c[where], alone[0], rtol=1e-12)  # the same float64 solve of a 1 x 1 system
  assert np.array_equal(og._lstsq([np.zeros_like(g)], target), [0.0])


@pytest.mark.parametrize("dim", [2, 256])
def test_calibration_on_near_point_mass_data_stays_finite(dim):
  """Data with variance 1e-12: along the flow D(x, t) = mu exactly in float32, so every history regressor
  D_{i-j} - D_i of the fit is exactly zero. The search (with a validation batch, as the benchmark runs it)
  returns finite coefficients, grid and samples, and the fitted sampler is no worse than DDIM on its grid."""
  rng = np.random.default_rng(0)
  mu = rng.choice([-1.0, 1.0], dim) * rng.uniform(0.5, 1.0, dim)
  gauss = GaussianMixture.create([1.0], [mu], [np.full(dim, 1e-12)])
  denoise = jax.jit(gauss.denoiser(SD))
  lattice = og.log_sigma_lattice(SD, 12)
  alpha, sigma = SD.alpha(lattice), SD.sigma(lattice)
  flow = lambda x, i: gauss.gaussian_flow(x, alpha[0], sigma[0], alpha[i], sigma[i])
  x_fit, x_val, x_new = (jax.random.normal(jax.random.key(k), (256, dim)) * sigma[0] for k in (8, 9, 10))
  for i in range(len(lattice)):  # the premise: the regressors are exactly zero, not merely small
    assert bool(jnp.all(denoise(flow(x_fit, i), lattice[i]) == jnp.asarray(mu, jnp.float32)))
  states = jnp.stack([flow(x_fit, i) / alpha[i] for i in range(len(lattice))])
  final = lambda x: gauss.gaussian_flow(x, alpha[0], sigma[0], 1.0, 0.0)
  res = og.search_grid(SD, denoise, x_fit, lattice, states, final(x_fit), 4, history=4,
                       validation=(x_val, final(x_val)), max_sweeps=1)
  fitted = res.sampler
  for name in ("ts", "beta", "gamma", "final"):
    assert np.all(np.isfinite(getattr(fitted, name))), name
  assert np.isfinite(fitted.calib_rmse)
  ours = fitted.sample(SD, denoise, x_new)
  ddim = sample(make_solver("euler", SD), denoise, x_new, jnp.asarray(fitted.ts, jnp.float32))
  assert bool(jnp.all(jnp.isfinite(ours)))
  truth = final(x_new)
  err, err_ddim = (float(jnp.sqrt(jnp.mean((y - truth) ** 2))) for y in (ours, ddim))
  # Both end with D(x_N, t_N) = mu; allow the rounding of two 3-step runs relative to |x0| <= 1.
  assert err <= err_ddim + tolerances.sampler_rtol(3), (err, err_ddim)


def test_fit_names_a_non_finite_denoiser():
  """NaN from the denoiser stops the fit with that diagnosis instead of reaching LAPACK."""
  ts = grids.karras(SD, 4)
  x = jax.random.normal(jax.random.key(11), (16, 2)) * SD.sigma(ts[0])
  good = MIXTURE.denoiser(SD)
  bad = lambda x, t: jnp.where(t < ts[1] + 1e-3, jnp.nan, 1.0) * good(x, t)  # NaN from the second grid point on
  states = jnp.stack([x / SD.alpha(ts[0])] * 4)
  with pytest.raises(FloatingPointError, match="denoiser returned non-finite values"):
    og.fit_multistep(SD, bad, x, ts, states, jnp.zeros_like(x), history=3)
