"""The sampler-accuracy benchmark's contract: dump files, NFE accounting and the RMSE it reports.

The RMSE is checked against an independent reference: a float64 Heun solve with 4000
steps (error ~1e-7 here) instead of the benchmark's adaptive Dormand-Prince.
"""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import sampler_accuracy as sa
from diffjax.analytic import GaussianMixture
from diffjax.processes import EDM
from diffjax.samplers import grids, make_solver, sample

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


def test_calibration_helpers():
  """The calibration's fast denoiser is the mixture's denoiser; its starts are valid lattice grids."""
  from diffjax.samplers import optimized_grids as og

  problem = sa.Problem(pathlib.Path(sa.__file__).parent / "data" / "gmm64.npz", "sd", 8, 0, 1e-8)
  fast, sd = problem.fast_denoiser(), problem.process
  x = jax.random.normal(jax.random.key(3), (32, problem.dim))
  for t in (0.0, 100.0, 999.0):
    xt = x * jnp.sqrt(1.0 + sd.edm_sigma(t) ** 2) * sd.alpha(t)
    np.testing.assert_allclose(fast(xt, jnp.float32(t)), problem.denoise(xt, jnp.float32(t)), atol=2e-5)
  fit, val = sa.calibration_batch_sizes(256, 48)
  assert 48 * fit * 256 * 4 <= 2**29 and fit >= 1024 and val >= fit
  lattice = np.asarray(og.log_sigma_lattice(sd, 48))
  for k in (5, 8):
    starts = sa.calibration_starts(sd, lattice, k)
    assert len(starts) >= 3 and len({tuple(s) for s in starts}) == len(starts)
    assert all(len(s) == k and s[0] == 0 and all(np.diff(s) > 0) and s[-1] < 48 for s in starts)


def test_calibration_record_scores_on_the_requested_validation_batch():
  """``calibrate`` with ``val_batch``: the record says so, and each fit's score is its RMSE on that batch."""
  from diffjax.samplers import optimized_grids as og

  problem = sa.Problem(GMM, "sd", 8, 0, 1e-6)
  rec = sa.calibrate(problem, [3], calib_seed=7, refine_steps=0, log=lambda s: None, lattice_size=12, val_batch=512)
  assert rec["val_batch"] == 512 and list(rec["samplers"]) == ["3"]
  fitted = og.FittedSampler.from_dict(rec["samplers"]["3"])
  p = problem.process
  x_val = jax.random.normal(jax.random.key(8), (512, problem.dim), jnp.float32)  # calib_seed + 1
  target = problem.reference(np.asarray(x_val) / float(p.alpha(fitted.ts[0])), float(p.edm_sigma(fitted.ts[0])))
  out = fitted.sample(p, problem.fast_denoiser(), x_val)
  np.testing.assert_allclose(rec["samplers"]["3"]["calib_rmse"], np.sqrt(np.mean((out - target) ** 2)), rtol=1e-3)
