"""The sampler-accuracy benchmark's contract: dump files, NFE accounting and the RMSE it reports.

The RMSE is checked against an independent reference: a float64 Heun solve with 4000
steps (error ~1e-7 here) instead of the benchmark's adaptive Dormand-Prince.
"""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import tolerances

from benchmarks import sampler_accuracy as sa
from diffjax.analytic import GaussianMixture
from diffjax.processes import EDM
from diffjax.samplers import calibration, grids, make_solver, sample

GMM = pathlib.Path(sa.__file__).parent / "data" / "gmm2d.npz"


def test_dumps_nfe_and_rmse(tmp_path):
  args = sa.parse_args(["--gmm", str(GMM), "--nfe", "4,6", "--n", "48", "--no-peers", "--calibration", "off",
                        "--only", "^(euler-karras|dpmpp_2m-log_snr)$", "--dump", str(tmp_path)])
  configs = sa.build_configs(args, None)
  assert [c.name for c in configs] == ["euler-karras", "dpmpp_2m-log_snr"]
  problem = sa.Problem(GMM, "sd", args.n, args.seed, args.ref_tol)
  results, extra = sa.evaluate(problem, configs, args.nfes, tmp_path, log=lambda s: None)
  assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
      f"{c}-nfe{k}.npz" for c in ("euler-karras", "dpmpp_2m-log_snr") for k in (4, 6))

  gmm, sd = GaussianMixture.load(GMM), problem.process
  dumps = {}
  for name in ("euler-karras", "dpmpp_2m-log_snr"):
    for k in (4, 6):
      with np.load(tmp_path / f"{name}-nfe{k}.npz") as f:
        dumps[name, k] = tuple(f[key] for key in ("x_start", "sigma_start", "x_final", "nfe"))
      x_start, s_start, x_final, nfe = dumps[name, k]
      assert x_start.shape == x_final.shape == (48, 2) and int(nfe) == k == results[name][k]["nfe"]
      # The dump starts where the sampler starts: pure noise x_T at the schedule's largest noise level.
      np.testing.assert_allclose(s_start, float(sd.edm_sigma(sd.t_max)), rtol=1e-5)
      np.testing.assert_allclose(x_start / np.sqrt(1 + s_start**2), problem.noise, rtol=1e-5)  # x_T / alpha_T
      # x_final is what the solver gives on its grid (k points: k - 1 steps + the final jump).
      grid = {"euler-karras": grids.karras, "dpmpp_2m-log_snr": grids.log_snr_uniform}[name]
      direct = sample(make_solver(name.split("-")[0], sd), gmm.denoiser(sd), jnp.asarray(problem.noise), grid(sd, k))
      np.testing.assert_allclose(x_final, direct, rtol=1e-4, atol=1e-4)
  # The reported RMSE is to the exact ODE solution from x_start (the same start for every run).
  x_start, s_start = dumps["euler-karras", 4][:2]
  with jax.enable_x64(True):
    edm = EDM()
    fine = grids.karras(edm, 4000, sigma_min=1e-5, sigma_max=float(s_start))
    denoise64 = GaussianMixture.create(*problem.arrays).denoiser(edm)
    exact = np.asarray(sample(make_solver("heun", edm), denoise64, jnp.asarray(x_start, jnp.float64), fine))
  for (name, k), (_, _, x_final, _) in dumps.items():
    np.testing.assert_allclose(results[name][k]["rmse"], np.sqrt(np.mean((x_final - exact) ** 2)), rtol=1e-3)
  assert 0 < extra["floor"] < min(r["rmse"] for per_k in results.values() for r in per_k.values())


def _mixture_denoiser_error_bound(weights, means, variances, x, alpha, sigma):
  """Float64 E[x0 | x_t = x] of a diagonal mixture and a bound on any float32 evaluation's error.

  Both float32 forms compute, in the scaled coordinates y = x / alpha, s = sigma / alpha,
    logit_k = log w_k - 1/2 sum_i [(y_i - m_ki)^2 / var_ki + log(2 pi var_ki)],  var = v + s^2,
    D = sum_k softmax(logit)_k mu_k,  mu_k = m_k + v_k / var_k (y - m_k).
  ``GaussianMixture`` forms (y - m)^2; the calibration's matrix-product form expands
  ||y - m||^2 = ||y||^2 - 2 y.m + ||m||^2, which cancels badly next to a component at small
  noise. Either way every summed term is at most (|y_i| + |m_ki|)^2 / var_ki in magnitude
  and carries a few roundings, so rounding in any summation order (Higham's gamma_n)
  perturbs logit_k by at most
    E_k = gamma(d + c) (1/2 sum_i (|y_i| + |m_ki|)^2 / var_ki + |log w_k| + 1/2 sum_i |log(2 pi var_ki)|),
  ``c`` counting the roundings before the sum (y = x / alpha, s, s^2, var, 1 / var, the
  square or products, the log, and a few ulp between alpha(t) computed eagerly here and
  inside the jitted denoiser). A logit perturbation dl moves D_j by
  sum_k r_k (dl_k - sum_l r_l dl_l)(mu_kj - D_j), at most sum_k r_k (E_k + E_bar) |mu_kj - D_j|;
  forming mu_k and the weighted sum adds gamma(2K + c) sum_k r_k (|m_kj| + |y_j|).
  Returns (D, bound), both (n, d). The bound is worst-case: large only in rows where
  components compete at low noise (their logits are differences of large numbers).
  """
  w, m, v = (np.asarray(a, np.float64) for a in (weights, means, variances))
  y, s = np.asarray(x, np.float64) / alpha, sigma / alpha
  var = v + s**2  # (K, d)
  d, k = y.shape[1], w.shape[0]
  c = 24 + 2 * tolerances.TRANSCENDENTAL_OPS
  diff = y[:, None, :] - m[None]  # (n, K, d)
  logits = np.log(w) - 0.5 * np.sum(diff**2 / var + np.log(2 * np.pi * var), -1)
  r = np.exp(logits - logits.max(-1, keepdims=True))
  r /= r.sum(-1, keepdims=True)  # (n, K)
  mu = m[None] + (v / var)[None] * diff  # (n, K, d)
  denoised = np.einsum("nk,nkd->nd", r, mu)
  magnitude = np.abs(y)[:, None, :] + np.abs(m)[None]  # (n, K, d)
  size = 0.5 * np.sum(magnitude**2 / var, -1) + np.abs(np.log(w)) + 0.5 * np.sum(np.abs(np.log(2 * np.pi * var)), -1)
  e = tolerances.gamma(d + c) * size  # (n, K)
  e_bar = np.sum(r * e, -1, keepdims=True)
  bound = np.einsum("nk,nkd->nd", r * (e + e_bar), np.abs(mu - denoised[:, None, :]))
  bound += tolerances.gamma(2 * k + c) * np.einsum("nk,nkd->nd", r, magnitude)
  return denoised, bound


def test_calibration_helpers():
  """The calibration's fast denoiser is the mixture's denoiser; its starts are valid lattice grids.

  Both float32 denoisers are compared with a float64 evaluation of the same function,
  element by element within a rounding-error bound derived from the computation
  (``_mixture_denoiser_error_bound``), not with each other at a tolerance that one CPU met
  (the two differed by 2.8e-5 on one machine, more than the 2e-5 once asserted).
  """
  from diffjax.samplers import optimized_grids as og

  problem = sa.Problem(pathlib.Path(sa.__file__).parent / "data" / "gmm64.npz", "sd", 8, 0, 1e-8)
  fast, sd = problem.fast_denoiser(), problem.process
  w, m, v = problem.arrays
  x = jax.random.normal(jax.random.key(3), (32, problem.dim))
  for t in (0.0, 100.0, 999.0):
    t = jnp.float32(t)
    xt = x * jnp.sqrt(1.0 + sd.edm_sigma(t) ** 2) * sd.alpha(t)
    exact, bound = _mixture_denoiser_error_bound(w / w.sum(), m, v, xt, float(sd.alpha(t)), float(sd.sigma(t)))
    # Most elements' bounds are small next to the signal: a wrong coefficient cannot hide in them.
    assert np.median(bound) < 1e-2 * np.median(np.abs(exact)), (float(t), np.median(bound))
    for name, out in (("fast", fast(xt, t)), ("mixture", problem.denoise(xt, t))):
      err = np.abs(np.asarray(out, np.float64) - exact)
      worst = np.unravel_index(np.argmax(err - bound), err.shape)
      assert np.all(err <= bound), (name, float(t), worst, err[worst], bound[worst])
  fit, val = sa.calibration_batch_sizes(256, 48)
  assert 48 * fit * 256 * 4 <= 2**29 and fit >= 1024 and val >= fit
  lattice = np.asarray(og.log_sigma_lattice(sd, 48))
  for k in (5, 8):
    starts = calibration.starting_grids(sd, lattice, k)
    assert len(starts) >= 3 and len({tuple(s) for s in starts}) == len(starts)
    assert all(len(s) == k and s[0] == 0 and all(np.diff(s) > 0) and s[-1] < 48 for s in starts)


def test_calibration_record_scores_on_the_requested_validation_batch():
  """``calibrate`` with ``val_batch``: the record says so, and each fit's score is its RMSE on that batch, the
  refinement's no worse than the search's (the start is one of the iterates it chooses from)."""
  from diffjax.samplers import optimized_grids as og

  problem = sa.Problem(GMM, "sd", 8, 0, 1e-6)
  rec = sa.calibrate(problem, [3], calib_seed=7, refine_iterations=2, log=lambda s: None, lattice_size=12,
                     val_batch=512)
  assert rec["val_batch"] == 512 and list(rec["samplers"]) == ["3"]
  fitted = og.FittedSampler.from_dict(rec["samplers"]["3"])
  p = problem.process
  x_val = jax.random.normal(jax.random.key(8), (512, problem.dim), jnp.float32)  # calib_seed + 1
  target = problem.reference(np.asarray(x_val) / float(p.alpha(fitted.ts[0])), float(p.edm_sigma(fitted.ts[0])))
  out = fitted.sample(p, problem.fast_denoiser(), x_val)
  np.testing.assert_allclose(rec["samplers"]["3"]["calib_rmse"], np.sqrt(np.mean((out - target) ** 2)), rtol=1e-3)
  # the refinement's choice is no worse than the search's, up to the rounding of two float32 runs of the sampler
  entry = rec["samplers"]["3"]
  slack = tolerances.sampler_rtol(3) * np.abs(target).max()
  assert 1 <= entry["refine_iterations"] <= 2 and entry["calib_rmse"] <= entry["searched_rmse"] + slack


def test_random_mixtures_span_the_family_and_the_robustness_table_reads_the_benchmark_json(tmp_path):
  """``make_mixtures.random_mixture`` draws valid mixtures over the whole family (d in [2, 256], sharp and broad,
  isotropic and not, smooth-field means at square d); ``sampler_robustness`` reads fitted / best-peer ratios."""
  from benchmarks import make_mixtures, sampler_robustness

  kinds, dims = set(), []
  for seed in range(60):
    (w, m, v), what = make_mixtures.random_draw(seed)
    d = m.shape[1]
    assert w.shape == (m.shape[0],) and v.shape == m.shape and 2 <= m.shape[0] <= 32 and 2 <= d <= 256
    np.testing.assert_allclose(w.sum(), 1.0, rtol=1e-12)
    assert np.all(w > 0) and np.all(v > 0) and np.all(np.isfinite(m))
    iso = "isotropic" in what.split()
    assert iso == bool(np.all(v == v[:, :1]))
    if "smooth-field" in what:
      assert round(np.sqrt(d)) ** 2 == d
    kinds.add(tuple(what.split()[2:5]))
    dims.append(d)
  assert len(kinds) >= 6 and min(dims) <= 4 and max(dims) >= 128, (kinds, min(dims), max(dims))
  path, what = make_mixtures.write_random(3, tmp_path)
  assert sa.Problem(path, "sd", 4, 0, 1e-6).dim == int(what.split()[0][2:])

  entry = {"families": {"fitted_ms4-searched": "diffjax", "euler-karras": "diffjax", "dpm": "k-diffusion",
                        "unipc": "diffusers"},
           "results": {"fitted_ms4-searched": {"5": {"rmse": 0.02}}, "euler-karras": {"5": {"rmse": 0.01}},
                       "dpm": {"5": {"rmse": 0.08}}, "unipc": {"5": {"rmse": 0.05}}}}
  assert sampler_robustness.fitted_over_peer(entry, 5) == (0.02, 0.05, "unipc")
  assert sampler_robustness.parse_seeds("1,4,7-9") == [1, 4, 7, 8, 9]
