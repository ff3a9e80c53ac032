"""Calibration of fitted samplers (diffjax.samplers.calibration) on conditional Gaussian data, whose
probability-flow map is known in closed form (tests/gaussian_oracle.py)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tolerances
from gaussian_oracle import flow_map

from diffjax import processes as P
from diffjax.samplers import calibration, grids, make_solver, points_for_budget, sample

SD = P.make_process("sd")
D = 8
VAR = np.linspace(0.05, 1.0, D)  # per-coordinate data variances
MEANS = np.stack([np.linspace(-1.0, 1.0, D), np.linspace(1.0, -1.0, D)])  # class c has mean MEANS[c]
KEY = {"model": "gaussian-test", "process": "sd", "guidance_scale": 1.0}


def denoise(x, t, cond):
  """E[x0 | x_t, c] for x0 ~ N(MEANS[c], diag(VAR)): exact, float32."""
  mu = jnp.asarray(MEANS, jnp.float32)[cond]
  var = jnp.asarray(VAR, jnp.float32)
  alpha, sigma = SD.alpha(t), SD.sigma(t)
  return mu + alpha * var / (alpha**2 * var + sigma**2) * (x - alpha * mu)


def exact_target(noise, cond):
  """D(x(t_min), t_min) with x(t_min) the exact flow of the initial state prior_std * noise (float64)."""
  x0 = float(SD.prior_std) * np.asarray(noise, np.float64)
  a0, s0 = float(SD.alpha(SD.t_max)), float(SD.sigma(SD.t_max))
  a1, s1 = float(SD.alpha(SD.t_min)), float(SD.sigma(SD.t_min))
  out = np.empty_like(x0)
  for c in (0, 1):
    rows = np.asarray(cond) == c
    x1 = flow_map(MEANS[c], np.diag(VAR), x0[rows], (a0, s0), (a1, s1))
    out[rows] = MEANS[c] + a1 * VAR / (a1**2 * VAR + s1**2) * (x1 - a1 * MEANS[c])
  return out


def _batch(seed, n):
  k1, k2 = jax.random.split(jax.random.key(seed))
  return jax.random.normal(k1, (n, D)), jax.random.bernoulli(k2, 0.5, (n,)).astype(jnp.int32)


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("calibration") / "not" / "made" / "fitted.json")  # folders made by calibrate
  (x_fit, c_fit), (x_val, c_val) = _batch(1, 256), _batch(2, 512)
  record = calibration.calibrate(SD, denoise, x_fit, x_val, (3, 5), key=KEY, path=path, cond_fit=c_fit,
                                 cond_val=c_val, lattice=24, chunk=128, progress=False, log=lambda s: None)
  return path, record, (x_fit, c_fit, x_val, c_val)


def test_the_reference_paths_are_the_exact_flow(calibrated):
  path, record, (x_fit, c_fit, _, _) = calibrated
  with np.load(path + ".reference.npz") as z:
    target, states = z["target"], z["states"]
  # dopri5 at tol 1e-5 (relative to the unit-scale states) over 23 lattice segments, then float32: a local error
  # bound of tol per segment accumulated over the segments gives 23 * 1e-5 * max|x| (8.8e-4); measured 3.3e-6.
  bound = 23 * 1e-5 * np.abs(target).max()
  np.testing.assert_allclose(target, exact_target(x_fit, c_fit), rtol=0, atol=bound)
  assert states.shape == (24, 256, D)
  assert record["reference"]["target_error_rms"] < bound


def test_fitted_sampler_beats_the_classic_ones_on_held_out_noise(calibrated):
  path, _, _ = calibrated
  x, c = _batch(3, 2048)
  want = exact_target(x, c)
  d = lambda x, t: denoise(x, t, c)
  start = SD.prior_std * x

  def rmse(out):
    return float(np.sqrt(np.mean((np.asarray(out, np.float64) - want) ** 2)))

  for k in (3, 5):
    fitted = calibration.load_fitted(path, KEY, k)
    ours = rmse(fitted.sample(SD, d, start))
    classic = []
    for name in ("dpmpp_2m", "euler", "dpmpp_3m"):
      solver = make_solver(name, SD)
      for grid in ("log_snr", "karras", "uniform_t"):
        ts = grids.GRIDS[grid](SD, points_for_budget(solver, k))
        classic.append(rmse(sample(solver, d, start, ts)))
    # the fit must win clearly: at most half the best classic error (measured 0.034x at 3, 0.026x at 5)
    assert ours < 0.5 * min(classic), (k, ours, min(classic))


def test_a_restarted_calibration_keeps_what_was_done(calibrated):
  path, record, (x_fit, c_fit, x_val, c_val) = calibrated
  messages = []
  again = calibration.calibrate(SD, denoise, x_fit, x_val, (3, 5, 4), key=KEY, path=path, cond_fit=c_fit,
                                cond_val=c_val, lattice=24, chunk=128, progress=False, log=messages.append)
  assert messages[0].startswith("resuming") and len(messages) == 2  # no reference solve; one new budget
  assert again["reference"] == record["reference"]
  assert again["samplers"]["3"] == record["samplers"]["3"] and again["samplers"]["5"] == record["samplers"]["5"]
  assert sorted(json.load(open(path))["samplers"], key=int) == ["3", "4", "5"]


def test_a_calibration_for_something_else_is_refused_in_one_line(calibrated, tmp_path):
  path, _, (x_fit, c_fit, x_val, c_val) = calibrated
  with pytest.raises(ValueError, match=r"calibrated for guidance_scale = 1.0, this run has 3.0") as e:
    calibration.load_fitted(path, KEY | {"guidance_scale": 3.0}, 5)
  assert "\n" not in str(e.value) and path in str(e.value)
  with pytest.raises(ValueError, match=r"no fitted sampler for 7 evaluations \(fitted: 3, (4, )?5\)"):
    calibration.load_fitted(path, KEY, 7)
  with pytest.raises(ValueError, match="calibrated for model"):
    calibration.calibrate(SD, denoise, x_fit, x_val, (3,), key=KEY | {"model": "other"}, path=path, cond_fit=c_fit,
                          cond_val=c_val, lattice=24, progress=False, log=lambda s: None)
  bad = tmp_path / "bad.json"
  bad.write_text("{not json")
  with pytest.raises(ValueError, match="bad.json: not a calibration file"):
    calibration.load_fitted(str(bad), KEY, 5)
  with pytest.raises(ValueError, match=r"budgets \[1\] are outside \[2, 24\]"):
    calibration.calibrate(SD, denoise, x_fit, x_val, (1,), key=KEY, path=str(tmp_path / "x.json"), lattice=24)


def test_a_calibration_it_cannot_write_fails_before_solving_anything(tmp_path):
  (tmp_path / "a_file").write_text("")
  (x_fit, c_fit), (x_val, c_val) = _batch(1, 8), _batch(2, 8)
  calls = []
  with pytest.raises(OSError):  # the folder cannot be made: a file has its name
    calibration.calibrate(SD, lambda x, t, c: calls.append(t) or denoise(x, t, c), x_fit, x_val, (3,), key=KEY,
                          path=str(tmp_path / "a_file" / "fitted.json"), cond_fit=c_fit, cond_val=c_val, lattice=24,
                          progress=False, log=lambda s: None)
  assert calls == []


def test_a_calibration_out_of_time_fits_every_budget_from_its_starting_grids(calibrated):
  """``time_budget_s``: a search whose share of the time is spent stops after its starting grids, still fitting
  every budget; the full search (the fixture's, same reference) can only improve on them."""
  path, record, (x_fit, c_fit, x_val, c_val) = calibrated
  with np.load(path + ".reference.npz") as z:
    stored = {True: (z["states"], z["target"]), False: (None, z["target_val"])}
  out = calibration.calibrate(SD, denoise, x_fit, x_val, (3, 5), key=KEY, path=None, cond_fit=c_fit, cond_val=c_val,
                              lattice=24, reference=lambda x, cond, keep_states: (*stored[keep_states], 0),
                              time_budget_s=0.0, progress=False, log=lambda s: None)
  lattice_ts = np.asarray(out["lattice"])
  for k in ("3", "5"):
    cut, full = out["samplers"][k], record["samplers"][k]
    assert cut["stopped_early"] and not full["stopped_early"]
    assert cut["candidates"] == len(calibration.starting_grids(SD, lattice_ts, int(k))) < full["candidates"]
    assert full["calib_rmse"] <= cut["calib_rmse"] and np.isfinite(cut["calib_rmse"])


def test_the_refinement_keeps_each_sample_with_its_condition(calibrated):
  """``refine_iterations``: each searched sampler is refined with the fitting batch's conditions, chunk by chunk
  (chunk < batch), and the record's calib_rmse is the refined sampler's RMSE on the validation batch with its own
  conditions, no worse than the search's (the start is one of the iterates it chooses from)."""
  path, record, (x_fit, c_fit, x_val, c_val) = calibrated
  with np.load(path + ".reference.npz") as z:
    stored = {True: (z["states"], z["target"]), False: (None, z["target_val"])}
  out = calibration.calibrate(SD, denoise, x_fit, x_val, (3,), key=KEY, path=None, cond_fit=c_fit, cond_val=c_val,
                              lattice=24, reference=lambda x, cond, keep_states: (*stored[keep_states], 0),
                              refine_iterations=3, chunk=96, progress=False, log=lambda s: None)
  entry = out["samplers"]["3"]
  assert entry["searched_rmse"] == pytest.approx(record["samplers"]["3"]["calib_rmse"], rel=1e-6)
  # no worse than the search's score, up to the rounding of two float32 runs of the sampler (rollout and sample)
  slack = tolerances.sampler_rtol(3) * np.abs(stored[False][1]).max()
  assert 1 <= entry["refine_iterations"] <= 3 and entry["calib_rmse"] <= entry["searched_rmse"] + slack
  from diffjax.samplers import optimized_grids as og

  fitted = og.FittedSampler.from_dict(entry)
  ours = fitted.sample(SD, lambda x, t: denoise(x, t, c_val), SD.prior_std * x_val)
  rmse = float(np.sqrt(np.mean((np.asarray(ours, np.float64) - stored[False][1]) ** 2)))
  np.testing.assert_allclose(entry["calib_rmse"], rmse, rtol=1e-4)


@pytest.mark.parametrize("k", [5, 8, 10])
def test_the_search_starts_from_diffusers_linspace_timesteps(k):
  """One starting grid is where diffusers' UniPC evaluates its network on "linspace" spacing (k + 1 timesteps
  from 999 to 0, rounded, the 0 dropped), snapped to the lattice; the Karras and log-SNR starts end at t_min."""
  diffusers = pytest.importorskip("diffusers")
  from diffjax.samplers import optimized_grids as og

  scheduler = diffusers.UniPCMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                                timestep_spacing="linspace")
  scheduler.set_timesteps(k)
  lattice = np.asarray(og.log_sigma_lattice(SD, 48), np.float64)
  theirs = og.snap_to_lattice(lattice, np.asarray(scheduler.timesteps, np.float64))
  assert og.snap_to_lattice(lattice, calibration.uniform_t_short(SD, k)) == theirs
  starts = calibration.starting_grids(SD, lattice, k)
  assert theirs in starts and len(theirs) == k and theirs[-1] < len(lattice) - 1
  assert og.snap_to_lattice(lattice, grids.log_snr_uniform(SD, k))[-1] == len(lattice) - 1


def test_a_configs_calibration_section_names_the_search_settings():
  """``pipelines.calibrate.settings_from``: what the jobs pass to ``calibrate`` (minutes -> seconds; 0: no bound)."""
  from configs import default
  from diffjax.pipelines.calibrate import settings_from

  cal = default.get_config("tiny").calibration
  base = dict(lattice=cal.lattice, tol=cal.tol, chunk=cal.chunk)
  assert settings_from(cal) == base | dict(restarts=1, refine_iterations=0, time_budget_s=None)
  cal.update(dict(restarts=3, refine=5, minutes=2.5))
  assert settings_from(cal) == base | dict(restarts=3, refine_iterations=5, time_budget_s=150.0)


# -- from pure noise: rectified flow starts at t = 1, where alpha = 0 and x / alpha is infinite ---------------------
RF = P.make_process("rectified_flow", shift=3.0)  # SD3's shift: most of the lattice's levels near t = 1


def rf_denoise(x, t, cond):
  """E[x0 | x_t] for x0 ~ N(MEANS[cond], diag(VAR)) under rectified flow (finite at alpha = 0)."""
  mu, var = jnp.asarray(MEANS, jnp.float32)[cond], jnp.asarray(VAR, jnp.float32)
  alpha, sigma = RF.alpha(t), RF.sigma(t)
  return mu + alpha * var / (alpha**2 * var + sigma**2) * (x - alpha * mu)


def rf_exact(noise, cond, t):
  """The exact flow at time t of pure noise x(1) = noise (float64): (x(t), D(x(t), t))."""
  a, s = float(RF.alpha(t)), float(RF.sigma(t))
  xt, out = np.empty_like(noise), np.empty_like(noise)
  for c in (0, 1):
    rows = np.asarray(cond) == c
    xt[rows] = flow_map(MEANS[c], np.diag(VAR), noise[rows], (0.0, 1.0), (a, s))
    out[rows] = MEANS[c] + a * VAR / (a**2 * VAR + s**2) * (xt[rows] - a * MEANS[c])
  return xt, out


def test_a_calibration_from_pure_noise_solves_the_flow_and_fits_a_finite_sampler(tmp_path):
  """Rectified flow from t = 1: the lattice starts there, the reference's first segment (dy/dq = D in y = x / sigma,
  q = alpha / sigma) and the rest agree with the closed-form flow, and the fitted samplers (first step DDIM's from
  pure noise) are finite and beat every classic sampler that can start at pure noise."""
  from diffjax.samplers import optimized_grids as og

  (x_fit, c_fit), (x_val, c_val) = _batch(1, 256), _batch(2, 512)
  key = KEY | {"process": "rectified_flow"}
  record = calibration.calibrate(RF, rf_denoise, x_fit, x_val, (3, 5), key=key, path=str(tmp_path / "rf.json"),
                                 cond_fit=c_fit, cond_val=c_val, lattice=24, chunk=128, progress=False,
                                 log=lambda s: None)
  lattice = np.asarray(record["lattice"])
  assert lattice[0] == 1.0 and np.all(np.diff(lattice) < 0) and np.isclose(lattice[-1], RF.t_min, rtol=1e-5)
  with np.load(tmp_path / "rf.json.reference.npz") as z:
    states, target = z["states"], z["target"]
  x64 = np.asarray(x_fit, np.float64)
  np.testing.assert_array_equal(states[0], np.asarray(x_fit))  # x / sigma(1) = x
  # dopri5 at tol 1e-5 per segment, 23 segments (as the VP test): 23 * 1e-5 * max|x~| at each lattice point
  for j in (1, 2, 12, 23):
    xt, _ = rf_exact(x64, c_fit, lattice[j])
    want = xt / float(RF.alpha(lattice[j]))
    np.testing.assert_allclose(states[j], want, rtol=0, atol=23 * 1e-5 * np.abs(want).max(), err_msg=f"lattice {j}")
  _, want = rf_exact(x64, c_fit, lattice[-1])
  np.testing.assert_allclose(target, want, rtol=0, atol=23 * 1e-5 * np.abs(want).max())

  x, c = _batch(3, 2048)
  _, exact = rf_exact(np.asarray(x, np.float64), c, RF.t_min)
  d = lambda x, t: rf_denoise(x, t, c)
  rmse = lambda out: float(np.sqrt(np.mean((np.asarray(out, np.float64) - exact) ** 2)))
  for k in (3, 5):
    fitted = calibration.load_fitted(str(tmp_path / "rf.json"), key, k)
    assert fitted.ts[0] == 1.0 and fitted.gamma[0] == 0.0
    ours = fitted.sample(RF, d, x)
    assert np.all(np.isfinite(np.asarray(ours)))
    # the step-by-step rollout is the jitted sampler's computation (float32 rounding of unit-scale data)
    np.testing.assert_allclose(ours, og.rollout(RF, fitted, d, x), rtol=0, atol=1e-4)
    classic = []
    for name in ("euler", "dpmpp_2m", "dpmpp_3m", "unipc"):
      solver = make_solver(name, RF)
      classic.append(rmse(sample(solver, d, x, grids.uniform_t(RF, points_for_budget(solver, k)))))
    assert np.all(np.isfinite(classic))
    assert rmse(ours) < 0.5 * min(classic), (k, rmse(ours), classic)


def test_a_fitted_step_from_pure_noise_is_ddim_and_refinement_keeps_the_start():
  """beta = gamma = 0 from t = 1 is DDIM: x(t1) = alpha_1 D_0 + sigma_1 x / sigma_0 (the solver's limit r -> 0);
  ``refine`` moves the grid's later points and keeps both t = 1 and its first finite level."""
  from diffjax.samplers import optimized_grids as og

  x, c = _batch(4, 64)
  d = lambda x, t: rf_denoise(x, t, c)
  ts = np.array([1.0, 0.8, 0.3])
  fitted = og.FittedSampler(ts, np.zeros((2, 1)), np.zeros(1), np.zeros(2))
  ddim = sample(make_solver("euler", RF), d, x, jnp.asarray(ts, jnp.float32))
  np.testing.assert_allclose(fitted.sample(RF, d, x), ddim, rtol=0, atol=1e-5)
  refined, _ = og.refine(RF, fitted, lambda x, t, cond: d(x, t), x,
                         jnp.asarray(rf_exact(np.asarray(x, np.float64), c, RF.t_min)[1]), iterations=3)
  assert refined.ts[0] == 1.0 and np.isclose(refined.ts[1], 0.8) and refined.ts[2] != 0.3
  assert np.all(np.isfinite(refined.beta)) and np.all(np.isfinite(refined.gamma))
