"""Sampler accuracy on exact Gaussian-mixture denoisers: diffjax vs diffusers and k-diffusion.

  python -m benchmarks.sampler_accuracy --gmm FILE.npz --process sd --nfe 5,8,10,20 \
      --n 2000 --seed 0 --dump DIR

The model is the exact denoiser E[x0 | x_t] of a diagonal Gaussian mixture
(``GaussianMixture.load``), so the only error left is the sampler's. Every sampler
starts from pure Gaussian noise on the process (``--process sd``: Stable Diffusion's
1000-step scaled_linear DiscreteVP, sigma/alpha from 0.0292 at t = 0 to 14.61 at
t = 999), from the same standard-normal draw (``--seed``), and returns clean samples.

Metrics, for every sampler configuration (solver + grid + options) and NFE budget k:

* ``RMSE``: root mean square over all n x d coordinates of x_final - x_ref, where
  x_ref is the exact probability-flow ODE solution from the sampler's *own* start
  (x_start = x_t / alpha_t, sigma_start = sigma_t / alpha_t) all the way to sigma = 0:
  diffjax's adaptive ``dopri5`` in float64 (rtol = atol = ``--ref_tol``) in the
  variance-exploding coordinates, where the ODE dx/ds = (x - D(x, s)) / s does not
  depend on the process, down to s = 1e-5, then x_ref = D(x, 1e-5) (error ~1e-10).
  Below the process's smallest noise level (0.0292) the mixture's posterior mean is
  still exact, so x_ref is the true noise-to-data map; a sampler that ends with the
  usual jump D(x, sigma_min) is off by the "final-jump floor" printed per mixture.
* ``SW2``: sliced 2-Wasserstein distance (256 random directions) between the n final
  samples and n fresh data samples; its sampling-noise floor (two data draws) is printed.
* ``nfe``: denoiser evaluations actually made (counted at run time), at most k. Each
  configuration uses the largest grid whose evaluation count fits the budget.

Configurations: diffjax's registered ODE solvers on standard grids; ``fitted_ms4-searched``,
diffjax's model-specific sampler of ``diffjax.samplers.optimized_grids`` (grid and multistep
coefficients fitted on calibration batches drawn with other seeds, cached in
``benchmarks/data/calibrated_samplers.json``; see ``calibrate``); and the peers.

Samplers run in float32: diffjax with ``GaussianMixture.denoiser``; the peers in torch
with the same mixture's posterior mean (responsibilities in float64, output float32).
The reference runs in float64 with the posterior mean in matrix-product form (checked
against ``GaussianMixture.posterior_mean`` at startup).
With ``--dump DIR`` each run is written to ``DIR/<config>-nfe<k>.npz`` (``DIR/<mixture>/``
when several mixtures are given) with ``x_start``, ``sigma_start``, ``x_final``, ``nfe``.
Peers (diffusers' schedulers and k-diffusion's samplers, each with its own grid
options) run when torch/diffusers/k-diffusion are installed (``reference`` extra).
A PNG of RMSE vs NFE goes to ``--plot``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import importlib.util
import json
import math
import pathlib
import re
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import k_diffusion_loader
from benchmarks.results import output_path
from diffjax.analytic import GaussianMixture
from diffjax.convert.files import write_json
from diffjax.processes import EDM, make_process
from diffjax.samplers import SOLVERS, grids, make_solver, num_evaluations, sample

DATA_DIR = pathlib.Path(__file__).resolve().parent / "data"
DEFAULT_GMMS = [DATA_DIR / f"{name}.npz" for name in ("gmm2d", "gmm64", "gmm256")]
REF_SIGMA_END = 1e-5
SW_DIRECTIONS = 256


# ------------------------------------------------------------------------------------
# The problem: mixture, process, initial noise, reference solutions.
# ------------------------------------------------------------------------------------
@dataclasses.dataclass
class Run:
  """One sampler run: start in sigma-space (x_t / alpha_t, sigma_t / alpha_t), final samples, NFE used."""

  x_start: np.ndarray
  sigma_start: float
  x_final: np.ndarray
  nfe: int


def fast_posterior_mean(weights, means, variances):
  """E[x0 | x0 + s eps = x] of a diagonal mixture with matrix products (O(n (K + d)) memory).

  Equal to ``GaussianMixture.posterior_mean(x, 1, s)``; used by the float64 reference,
  which needs thousands of evaluations.
  """
  logw = jnp.log(weights)

  def posterior_mean(x, s):
    var = variances + s**2
    inv = 1.0 / var
    quad = (x**2) @ inv.T - 2.0 * x @ (means * inv).T + jnp.sum(means**2 * inv, -1)
    logits = logw - 0.5 * quad - 0.5 * jnp.sum(jnp.log(2.0 * math.pi * var), -1)
    r = jax.nn.softmax(logits, axis=-1)
    shrink = variances * inv
    return r @ (means * (1.0 - shrink)) + x * (r @ shrink)

  return posterior_mean


class Problem:
  """A mixture on a process, the shared initial noise and cached float64 reference solves."""

  def __init__(self, path, process_name: str, n: int, seed: int, ref_tol: float):
    self.path = pathlib.Path(path)
    self.name = self.path.stem
    with np.load(self.path) as f:
      missing = {"weights", "means", "variances"} - set(f.files)
      if missing:
        raise ValueError(f"{path}: missing arrays {sorted(missing)}; need weights (K,), means (K, d), variances (K, d)")
      self.arrays = tuple(np.asarray(f[k], np.float64) for k in ("weights", "means", "variances"))
    self.gmm = GaussianMixture.load(self.path)  # float32 (JAX default)
    self.process = make_process(process_name)
    self.process_name = process_name
    self.denoise = self.gmm.denoiser(self.process)
    self.dim = self.gmm.dim
    self.n = n
    self.seed = seed
    self.noise = np.asarray(jax.random.normal(jax.random.key(seed), (n, self.dim), jnp.float32))
    self.ref_tol = ref_tol
    self._refs = {}
    self._segment = None
    self._jit_cache = {}
    self.ref_time = 0.0
    self.ref_nfe = 0

  # -- diffjax solvers ---------------------------------------------------------------
  def compiled(self, solver_name, options):
    """A ``Driver`` for a registered solver on this mixture (cached: one compilation per solver)."""
    key = (solver_name, tuple(sorted(options.items())))
    if key not in self._jit_cache:
      self._jit_cache[key] = Driver(make_solver(solver_name, self.process, **options), self.denoise)
    return self._jit_cache[key]

  def fast_denoiser(self):
    """jit((x, t) -> E[x0 | x_t = x]) in float32 with ``fast_posterior_mean``: ``denoise``'s function
    in matrix-product form (O(n (K + d)) memory instead of O(n K d)); used by the calibration,
    whose batches are large. Checked against ``denoise`` on a test batch."""
    w, m, v = (jnp.asarray(a / (a.sum() if i == 0 else 1.0), jnp.float32) for i, a in enumerate(self.arrays))
    pm, p = fast_posterior_mean(w, m, v), self.process

    def denoise(x, t):
      a = p.alpha(t)
      return pm(x.reshape(x.shape[0], -1) / a, p.sigma(t) / a).reshape(x.shape).astype(x.dtype)

    denoise = jax.jit(denoise)
    x = jax.random.normal(jax.random.key(2), (256, self.dim), jnp.float32) * 3.0
    for t in (self.process.t_min, 0.5 * (self.process.t_min + self.process.t_max), self.process.t_max):
      t = jnp.float32(t)
      err = float(jnp.max(jnp.abs(denoise(x * self.process.alpha(t), t) - self.denoise(x * self.process.alpha(t), t))))
      if err > 1e-3:
        raise AssertionError(f"fast float32 denoiser differs from the mixture's by {err} at t = {float(t)}")
    return denoise

  # -- reference -------------------------------------------------------------------
  def _segment_fn(self):
    """jit((x, s_a, s_b) -> (x at s_b, nfe)): the float64 exact-ODE map between two sigma-space noise levels."""
    if self._segment is None:
      with jax.enable_x64(True):
        w, m, v = (jnp.asarray(a / (a.sum() if i == 0 else 1.0)) for i, a in enumerate(self.arrays))
        pm = fast_posterior_mean(w, m, v)
        gmm64 = GaussianMixture.create(*self.arrays)
        x = jax.random.normal(jax.random.key(1), (64, self.dim), jnp.float64) * 2.0
        for s in (0.02, 0.5, 10.0):  # the fast form is the same function
          err = float(jnp.max(jnp.abs(pm(x, s) - gmm64.posterior_mean(x, 1.0, s))))
          if err > 1e-8:
            raise AssertionError(f"fast posterior mean differs from GaussianMixture's by {err}")
        self._pm64 = jax.jit(pm)
        self._segment = jax.jit(functools.partial(_reference_segment, pm, self.ref_tol))
    return self._segment

  def _solve(self, x_start, sigmas):
    """States at sigmas[1:] (float64 numpy) from x_start at sigmas[0], one segment after the other."""
    seg = self._segment_fn()
    t0 = time.time()
    states = []
    with jax.enable_x64(True):
      x = jnp.asarray(x_start, jnp.float64)
      for a, b in zip(sigmas[:-1], sigmas[1:], strict=True):
        x, nfe = seg(x, jnp.float64(a), jnp.float64(b))
        self.ref_nfe += int(nfe)
        states.append(x)
      states = [np.asarray(x) for x in states]
      final = np.asarray(self._pm64(states[-1], sigmas[-1]))
      self.ref_nfe += 1
    if not all(np.all(np.isfinite(a)) for a in states + [final]):
      raise RuntimeError(f"reference solve from sigma {sigmas[0]} failed (non-finite)")
    self.ref_time += time.time() - t0
    return states, final

  def reference(self, x_start, sigma_start, sigma_end=REF_SIGMA_END):
    """float64 exact-ODE solution from (x_start, sigma_start) in sigma-space to sigma_end, then D there (cached)."""
    key = (float(sigma_start), float(sigma_end), np.asarray(x_start, np.float64).tobytes())
    if key not in self._refs:
      self._refs[key] = self._solve(x_start, [float(sigma_start), float(sigma_end)])[1]
    return self._refs[key]

  def reference_path(self, x_start, sigmas):
    """Reference states (len(sigmas), n, d) (float32) at sigma-space noise levels ``sigmas`` and the clean target.

    x_start is at sigmas[0]; the path continues to REF_SIGMA_END for the target (float64).
    """
    states, target = self._solve(x_start, [float(v) for v in sigmas] + [REF_SIGMA_END])
    path = np.stack([np.asarray(x_start, np.float32)] + [np.asarray(a, np.float32) for a in states[:-1]])
    return path, target

  def floor(self):
    """RMSE of 'exact ODE to the process's sigma_min, then D(x, sigma_min)' vs the exact map to 0."""
    s0 = float(self.process.edm_sigma(self.process.t_max))
    s_min = float(self.process.edm_sigma(self.process.t_min))
    x0 = self.noise * float(np.sqrt(1.0 + s0**2))
    return rmse(self.reference(x0, s0, s_min), self.reference(x0, s0))

  # -- data ------------------------------------------------------------------------
  def data_samples(self, key):
    with jax.enable_x64(True):
      return np.asarray(GaussianMixture.create(*self.arrays).sample(jax.random.key(key), self.n))


class Driver:
  """``diffjax.samplers.sample`` for a deterministic solver, with its scan unrolled into a Python loop.

  Runs exactly ``sample``'s sequence (``init``, ``step`` over consecutive grid points,
  then the final ``denoise`` at ts[-1]), but with one jitted ``step`` shared by grids of
  every length, so that an NFE sweep compiles once per solver instead of once per grid
  size. Denoiser calls are counted at run time (``counter``).
  """

  def __init__(self, solver, denoise, denoise_final=True):
    if solver.stochastic:
      raise ValueError("the accuracy benchmark runs deterministic (ODE) solvers only")
    self.solver = solver
    self.denoise_final = denoise_final
    self.counter = [0]

    def counted(x, t):
      jax.debug.callback(self._count)
      return denoise(x, t)

    self._init = jax.jit(solver.init)
    self._step = jax.jit(lambda x, t, t_next, state: solver.step(counted, x, t, t_next, state, None))
    self._final = jax.jit(counted)

  def _count(self):
    self.counter[0] += 1

  def sample(self, x, ts):
    state = self._init(x, ts)
    for i in range(ts.shape[0] - 1):
      x, state = self._step(x, ts[i], ts[i + 1], state)
    return self._final(x, ts[-1]) if self.denoise_final else x


def _reference_segment(posterior_mean, tol, x, s_a, s_b):
  """(x at s_b, nfe): the probability-flow ODE dx/ds = (x - D(x, s)) / s from s_a to s_b, float64.

  diffjax's adaptive ``dopri5`` (rtol = atol = tol) on the EDM process (alpha = 1, t = s);
  without ``diffjax.samplers.adaptive``, 2000 Heun steps on a Karras grid.
  """
  edm = EDM()
  denoise = lambda x, t: posterior_mean(x, t)
  try:
    from diffjax.samplers.adaptive import dopri5
  except ImportError:  # pragma: no cover - a tree without adaptive.py
    fine = grids.karras(edm, 2000, sigma_min=s_b, sigma_max=s_a)
    return sample(make_solver("heun", edm), denoise, x, fine, denoise_final=False), jnp.asarray(2 * 1999)
  solver = dopri5(edm, rtol=tol, atol=tol)
  ts = jnp.stack([s_a, s_b])
  x_b, stats = solver.step(denoise, x, s_a, s_b, solver.init(x, ts), None)
  return x_b, stats.nfe


def rmse(a, b) -> float:
  return float(np.sqrt(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)))


def sliced_w2(a, b, directions) -> float:
  """Sliced 2-Wasserstein distance between two equal-size samples (n, d) over unit directions (L, d)."""
  pa = np.sort(np.asarray(a, np.float64) @ directions.T, axis=0)
  pb = np.sort(np.asarray(b, np.float64) @ directions.T, axis=0)
  return float(np.sqrt(np.mean((pa - pb) ** 2)))


# ------------------------------------------------------------------------------------
# Sampler configurations.
# ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Config:
  """A sampler configuration: ``run(problem, k)`` returns a Run with at most k NFE, or None."""

  name: str
  family: str  # "diffjax", "diffusers" or "k-diffusion"
  run: Callable[[Problem, int], Run | None]


def _largest_grid(solver, k, min_points=2):
  """Largest N with num_evaluations(solver, N) <= k (None if even min_points does not fit)."""
  n = None
  for points in range(min_points, k + 2):
    if num_evaluations(solver, points) <= k:
      n = points
  return n


GRID_FNS = {
    "karras": lambda p, n: grids.karras(p, n),
    "log_snr": lambda p, n: grids.log_snr_uniform(p, n),
    "uniform_t": lambda p, n: grids.uniform_t(p, n),
}


def diffjax_config(solver_name: str, grid: str, label: str | None = None, **options) -> Config:
  """A registered diffjax solver (factory ``options``) on ``GRID_FNS[grid]`` with the largest grid that fits."""
  name = f"{label or solver_name}-{grid}"

  def run(problem: Problem, k: int) -> Run | None:
    solver = make_solver(solver_name, problem.process, **options)
    points = _largest_grid(solver, k)
    if points is None:
      return None
    ts = jnp.asarray(GRID_FNS[grid](problem.process, points), jnp.float32)
    fns = problem.compiled(solver_name, options)
    fns.counter[0] = 0
    x_final = np.asarray(fns.sample(jnp.asarray(problem.noise), ts))
    jax.effects_barrier()
    nfe = fns.counter[0]
    alpha0, s0 = float(problem.process.alpha(ts[0])), float(problem.process.edm_sigma(ts[0]))
    return Run(problem.noise / alpha0, s0, x_final, nfe)

  return Config(name, "diffjax", run)


def default_diffjax_configs(extended=False):
  """The diffjax configurations run (those whose solver is registered); ``extended`` adds more grids."""
  specs = [
      ("euler", "karras", None, {}), ("euler", "uniform_t", None, {}), ("heun", "karras", None, {}),
      ("dpm_solver", "log_snr", "dpm_solver3", {"order": 3}),
      ("dpmpp_2m", "karras", None, {}), ("dpmpp_2m", "log_snr", None, {}),
      ("dpmpp_3m", "karras", None, {}), ("dpmpp_3m", "log_snr", None, {}),
      ("unipc_bh2", "karras", None, {}), ("unipc_bh2", "log_snr", None, {}),
      ("unipc_bh2", "karras", "unipc_bh2_o3", {"order": 3}), ("unipc_bh2", "log_snr", "unipc_bh2_o3", {"order": 3}),
      ("ipndm", "karras", None, {}), ("lms", "karras", None, {}),
  ]
  if extended:
    specs += [("euler", "log_snr", None, {}), ("dpmpp_2m", "uniform_t", None, {}), ("dpmpp_3m", "uniform_t", None, {}),
              ("unipc_bh2", "uniform_t", None, {}), ("unipc_bh1", "log_snr", None, {}),
              ("dpm_solver", "log_snr", "dpm_solver2", {"order": 2}), ("ipndm_v", "karras", None, {})]
  return [diffjax_config(s, g, label, **o) for s, g, label, o in specs if s in SOLVERS]


# -- calibrated (fitted multistep on a searched grid) ---------------------------------
CALIBRATION_FILE = DATA_DIR / "calibrated_samplers.json"
CALIB_LATTICE = 48
CALIB_HISTORY = 4


def _sha256(path) -> str:
  return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


def calibration_batch_sizes(dim: int, lattice: int = CALIB_LATTICE) -> tuple[int, int]:
  """(fitting, validation) batch sizes: the stored lattice of fitting states (float32) stays
  <= 512 MiB, at most 8192 samples; validation 2^23 / d in [16384, 32768] (a few samples that
  end in another mixture component than the reference dominate the error: scores need many)."""
  fit = int(np.clip(2**27 // (lattice * dim), 1024, 8192))
  return fit, int(np.clip(2**23 // dim, 16384, 32768))


CALIB_END = 0.95  # of --calib_minutes: a candidate or an iteration running at a deadline ends after it
REFINE_CHUNK = 2048  # samples per Jacobian block of the refinement


def calibrate(problem: Problem, nfes, calib_seed: int, max_nfe: int = 10, refine_iterations: int = 0,
              log=print, lattice_size: int = CALIB_LATTICE, val_batch: int | None = None,
              time_budget_s: float | None = None) -> dict:
  """Fits ``optimized_grids`` samplers to ``problem``'s model for every budget k <= ``max_nfe`` with the library's
  ``calibration.calibrate``, the reference being the mixture's own float64 flow (``Problem.reference_path``).

  Protocol: a fitting batch (seed calib_seed) and a larger validation batch (calib_seed + 1)
  of pure noise at t_max, never the evaluation seed (sizes: ``calibration_batch_sizes``, or
  ``val_batch`` validation samples); states kept at ``lattice_size`` noise levels uniform in log
  sigma; history CALIB_HISTORY; the library's grid search (moves of 1, 2 and 4 lattice points, descending
  from each of its ``starting_grids`` in turn, best first, while the time allows; candidates scored on the
  validation batch), then at most ``refine_iterations`` Levenberg-Marquardt iterations of the library's
  refinement (coefficients and grid jointly, the iterate best on the validation batch kept). The model is
  evaluated with ``Problem.fast_denoiser``. ``time_budget_s`` bounds the whole calibration (the library's,
  CALIB_END of it: the work running at a deadline finishes). Returns the JSON-able record, costs included.
  """
  from diffjax.samplers import calibration
  from diffjax.samplers import optimized_grids as og

  p = problem.process
  t0 = time.time()
  batch, default_val = calibration_batch_sizes(problem.dim, lattice_size)
  val_batch = val_batch or default_val
  x_fit = jax.random.normal(jax.random.key(calib_seed), (batch, problem.dim), jnp.float32)
  x_val = jax.random.normal(jax.random.key(calib_seed + 1), (val_batch, problem.dim), jnp.float32)
  lattice = np.asarray(og.log_sigma_lattice(p, lattice_size), np.float64)
  sig = np.asarray(p.edm_sigma(jnp.asarray(lattice, jnp.float32)), np.float64)
  alpha0 = float(p.alpha(jnp.float32(lattice[0])))

  def exact(x, cond, keep_states):
    """The mixture's float64 flow from x (at t_max) in the library's reference contract."""
    del cond
    start, nfe0 = np.asarray(x, np.float64) / alpha0, problem.ref_nfe
    if keep_states:
      states, target = problem.reference_path(start, sig)
    else:
      states, target = None, problem.reference(start, float(sig[0]))
    return states, np.asarray(target, np.float32), problem.ref_nfe - nfe0

  fast = problem.fast_denoiser()
  budgets = [k for k in nfes if 2 <= k <= min(lattice_size, max_nfe)]
  lib = calibration.calibrate(p, lambda x, t, cond: fast(x, t), x_fit, x_val, budgets, key={}, path=None,
                              lattice=lattice_size, history=CALIB_HISTORY, restarts=None, reference=exact,
                              refine_iterations=refine_iterations, chunk=REFINE_CHUNK, progress=False,
                              time_budget_s=None if time_budget_s is None else CALIB_END * time_budget_s,
                              log=lambda s: log(f"  {s}"))
  record = dict(sha256=_sha256(problem.path), process=problem.process_name, calib_seed=calib_seed, batch=batch,
                val_batch=val_batch, lattice=lattice_size, history=CALIB_HISTORY, time_budget_s=time_budget_s,
                reference_cost=dict(seconds=lib["reference"]["seconds"], evaluations=lib["reference"]["evaluations"]),
                samplers=lib["samplers"], device=jax.devices()[0].device_kind)
  record["seconds"] = time.time() - t0
  return record


def load_calibration(path, problem: Problem, calib_seed: int):
  """The cached record for this mixture file (same content, process and seed), or None."""
  path = pathlib.Path(path)
  if not path.is_file():
    return None
  rec = json.loads(path.read_text()).get(problem.name)
  if (rec is None or rec.get("sha256") != _sha256(problem.path) or rec.get("process") != problem.process_name
      or rec.get("calib_seed") != calib_seed):
    return None
  return rec


def calibrated_config(args) -> Config:
  """diffjax's fitted multistep sampler on its searched grid (``optimized_grids``), one fit per budget.

  With ``--calibration cached`` the fits come from ``--calibration_file`` when it holds
  this mixture (same file content, process and calibration seed; else the configuration
  is skipped with a note); with ``live`` they are computed now (``calibrate``). Either
  way their cost is reported.
  """
  from diffjax.samplers import optimized_grids as og

  name = f"fitted_ms{CALIB_HISTORY}-searched"

  def run(problem: Problem, k: int) -> Run | None:
    if not hasattr(problem, "calibration"):
      rec = None
      if args.calibration == "cached":
        rec = load_calibration(args.calibration_file, problem, args.calib_seed)
        if rec is None:
          print(f"  note: no calibration of {problem.name} (this file, process, --calib_seed) in "
                f"{args.calibration_file}: {name} skipped (fit it with --calibration live)", flush=True)
      else:
        print(f"  [{problem.name}] calibrating {name} (seed {args.calib_seed}) ...", flush=True)
        rec = calibrate(problem, args.nfes, args.calib_seed, args.calib_max_nfe, args.refine_iterations,
                        log=lambda s: print(s, flush=True), val_batch=args.calib_val_batch,
                        time_budget_s=60.0 * args.calib_minutes if args.calib_minutes > 0 else None)
        rec["computed_now"] = True
      problem.calibration = rec
    if problem.calibration is None:
      return None
    entry = problem.calibration["samplers"].get(str(k))
    if entry is None:
      return None
    fitted = og.FittedSampler.from_dict(entry)
    key = ("fitted", k)
    if key not in problem._jit_cache:
      problem._jit_cache[key] = Driver(fitted.solver(problem.process), problem.denoise, denoise_final=False)
    drv = problem._jit_cache[key]
    drv.counter[0] = 0
    ts = jnp.asarray(fitted.ts, jnp.float32)
    x_final = np.asarray(drv.sample(jnp.asarray(problem.noise), ts))
    jax.effects_barrier()
    alpha0, s0 = float(problem.process.alpha(ts[0])), float(problem.process.edm_sigma(ts[0]))
    return Run(problem.noise / alpha0, s0, x_final, drv.counter[0])

  return Config(name, "diffjax", run)


# -- peers: diffusers -----------------------------------------------------------------
SD_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


class TorchMixture:
  """The mixture's posterior mean in torch: responsibilities in float64 (matrix-product form), result float32."""

  def __init__(self, arrays):
    import torch

    w, m, v = arrays
    self.torch = torch
    self.logw = torch.tensor(np.log(w / w.sum()), dtype=torch.float64)
    self.means = torch.tensor(m, dtype=torch.float64)
    self.variances = torch.tensor(v, dtype=torch.float64)

  def __call__(self, x, s):
    """E[x0 | x0 + s eps = x] for x (n, d) float32, s a scalar."""
    torch = self.torch
    x64 = x.double()
    var = self.variances + float(s) ** 2
    inv = 1.0 / var
    quad = (x64**2) @ inv.T - 2.0 * x64 @ (self.means * inv).T + torch.sum(self.means**2 * inv, -1)
    r = torch.softmax(self.logw - 0.5 * quad - 0.5 * torch.sum(torch.log(2 * math.pi * var), -1), dim=-1)
    shrink = self.variances * inv
    return (r @ (self.means * (1.0 - shrink)) + x64 * (r @ shrink)).float()


def _torch_mixture(problem):
  if not hasattr(problem, "_torch_mixture"):
    problem._torch_mixture = TorchMixture(problem.arrays)
  return problem._torch_mixture


def diffusers_config(label: str, cls_name: str, calls_per_step: Callable[[int], int] = lambda n: n,
                     **kwargs) -> Config:
  """A diffusers scheduler with SD's betas in its standard loop; steps chosen to fit the budget.

  The model gets the scheduler's input (VP coordinates) and timestep, evaluates the
  mixture at the scheduler's own noise level for that timestep and returns eps.
  """
  name = f"diffusers.{label}"

  def run(problem: Problem, k: int) -> Run | None:
    import diffusers
    import torch

    steps = max((n for n in range(1, k + 1) if calls_per_step(n) <= k), default=None)
    if steps is None:
      return None
    sched = getattr(diffusers, cls_name)(**SD_BETAS, **kwargs)
    sched.set_timesteps(steps)
    timesteps = sched.timesteps.double()
    sigmas = getattr(sched, "sigmas", None)
    if sigmas is not None and len(sigmas) > len(timesteps):
      table_s = sigmas[: len(timesteps)].double()
    else:  # DDIM: no sigmas, the noise level is alphas_cumprod at the integer timestep
      ac = sched.alphas_cumprod.double()[sched.timesteps.long()]
      table_s = torch.sqrt((1 - ac) / ac)
    mixture = _torch_mixture(problem)
    calls = [0]

    def model(x, t):
      calls[0] += 1
      s = table_s[torch.argmin(torch.abs(timesteps - float(t)))]
      x_ve = x * torch.sqrt(1 + s.float() ** 2)
      return (x_ve - mixture(x_ve, s)) / s.float()

    init = float(sched.init_noise_sigma)
    x = torch.tensor(problem.noise) * init
    s0 = float(table_s[0])
    x_start = x.numpy().copy() if init > 1.0 else problem.noise * float(np.sqrt(1.0 + s0**2))
    with torch.no_grad():
      for t in sched.timesteps:
        x = sched.step(model(sched.scale_model_input(x, t), t), t, x).prev_sample
    return Run(x_start, s0, x.numpy(), calls[0])

  return Config(name, "diffusers", run)


def default_diffusers_configs(extended=False):
  """diffusers' schedulers with SD's betas: default spacing and Karras sigmas; ``extended`` adds more."""
  heun_calls = lambda n: 2 * n - 1
  configs = [
      diffusers_config("DDIM-leading", "DDIMScheduler", set_alpha_to_one=True, steps_offset=1,
                       timestep_spacing="leading", clip_sample=False),
      diffusers_config("DDIM-trailing", "DDIMScheduler", set_alpha_to_one=True, timestep_spacing="trailing",
                       clip_sample=False),
      diffusers_config("Euler", "EulerDiscreteScheduler"),
      diffusers_config("Euler-karras", "EulerDiscreteScheduler", use_karras_sigmas=True),
      diffusers_config("Heun-karras", "HeunDiscreteScheduler", heun_calls, use_karras_sigmas=True),
      diffusers_config("LMS-karras", "LMSDiscreteScheduler", use_karras_sigmas=True),
      diffusers_config("DPM++2M", "DPMSolverMultistepScheduler"),
      diffusers_config("DPM++2M-karras", "DPMSolverMultistepScheduler", use_karras_sigmas=True),
      diffusers_config("DPM++3M", "DPMSolverMultistepScheduler", solver_order=3),
      diffusers_config("DPM++3M-karras", "DPMSolverMultistepScheduler", solver_order=3, use_karras_sigmas=True),
      diffusers_config("UniPC-bh2", "UniPCMultistepScheduler"),
      diffusers_config("UniPC-bh2-karras", "UniPCMultistepScheduler", use_karras_sigmas=True),
      diffusers_config("UniPC-bh2-o3", "UniPCMultistepScheduler", solver_order=3),
      diffusers_config("DEIS-karras", "DEISMultistepScheduler", use_karras_sigmas=True),
  ]
  if extended:
    configs += [
        diffusers_config("Heun", "HeunDiscreteScheduler", heun_calls),
        diffusers_config("LMS", "LMSDiscreteScheduler"),
        diffusers_config("DPM++2S", "DPMSolverSinglestepScheduler"),
        diffusers_config("UniPC-bh2-o3-karras", "UniPCMultistepScheduler", solver_order=3, use_karras_sigmas=True),
        diffusers_config("DEIS", "DEISMultistepScheduler"),
    ]
  return configs


# -- peers: k-diffusion -----------------------------------------------------------------
def kdiff_config(sampler: str, sigmas_kind: str, ksampling, calls_per_step: Callable[[int], int] = lambda n: n,
                 ) -> Config:
  """A k-diffusion sampler on get_sigmas_<kind>(n, sigma_min, sigma_max) of the process, x = noise * sigmas[0].

  ``calls_per_step(n)``: model calls on n sigmas (plus the appended 0). ``sample_dpm_fast``
  stops at sigma_min, so it gets k - 1 evaluations and the final jump D(x, sigma_min).
  """
  name = f"k-diffusion.{sampler.removeprefix('sample_')}-{sigmas_kind}"

  def run(problem: Problem, k: int) -> Run | None:
    import torch

    p = problem.process
    s_min, s_max = float(p.edm_sigma(p.t_min)), float(p.edm_sigma(p.t_max))
    mixture = _torch_mixture(problem)
    calls = [0]

    def model(x, sigma):
      calls[0] += 1
      return mixture(x, float(sigma.reshape(-1)[0]))

    x = torch.tensor(problem.noise) * s_max
    x_start = x.numpy().copy()
    with torch.no_grad():
      if sampler == "sample_dpm_fast":
        if k < 4:
          return None
        x = ksampling.sample_dpm_fast(model, x, s_min, s_max, k - 1, disable=True)
        x = model(x, torch.tensor([s_min]))
      else:
        n = max((m for m in range(2, k + 2) if calls_per_step(m) <= k), default=None)
        if n is None:
          return None
        sigmas = getattr(ksampling, f"get_sigmas_{sigmas_kind}")(n, s_min, s_max)
        x = getattr(ksampling, sampler)(model, x, sigmas, disable=True)
    return Run(x_start, s_max, x.numpy(), calls[0])

  return Config(name, "k-diffusion", run)


def default_kdiff_configs(ksampling, extended=False):
  """k-diffusion's samplers on Karras sigmas (and exponential = log-SNR uniform), dpm_fast; ``extended`` adds more."""
  if ksampling is None:
    return []
  two = lambda n: 2 * n - 1
  configs = [kdiff_config("sample_euler", "karras", ksampling), kdiff_config("sample_heun", "karras", ksampling, two),
             kdiff_config("sample_dpm_2", "karras", ksampling, two), kdiff_config("sample_lms", "karras", ksampling),
             kdiff_config("sample_dpmpp_2m", "karras", ksampling),
             kdiff_config("sample_dpmpp_2m", "exponential", ksampling),
             kdiff_config("sample_dpm_fast", "logsnr", ksampling)]
  if extended:
    configs += [kdiff_config("sample_euler", "exponential", ksampling),
                kdiff_config("sample_heun", "exponential", ksampling, two),
                kdiff_config("sample_dpm_2", "exponential", ksampling, two),
                kdiff_config("sample_lms", "exponential", ksampling)]
  return configs


def peers_available():
  return all(importlib.util.find_spec(m) is not None for m in ("torch", "diffusers"))


# ------------------------------------------------------------------------------------
# Driver.
# ------------------------------------------------------------------------------------
def evaluate(problem: Problem, configs, nfes, dump_dir=None, log=print):
  """{config name: {k: dict(rmse, sw2, nfe)}} for every configuration and budget."""
  data = problem.data_samples(problem.seed + 1000)
  directions = np.random.default_rng(problem.seed + 2000).standard_normal((SW_DIRECTIONS, problem.dim))
  directions /= np.linalg.norm(directions, axis=1, keepdims=True)
  results = {}
  for cfg in configs:
    t0 = time.time()
    results[cfg.name] = {}
    for k in nfes:
      run = cfg.run(problem, k)
      if run is None:
        continue
      if run.nfe > k:
        raise AssertionError(f"{cfg.name}: used {run.nfe} evaluations with a budget of {k}")
      ref = problem.reference(run.x_start, run.sigma_start)
      results[cfg.name][k] = dict(rmse=rmse(run.x_final, ref), sw2=sliced_w2(run.x_final, data, directions),
                                  nfe=run.nfe, finite=bool(np.all(np.isfinite(run.x_final))))
      if dump_dir is not None:
        dump_dir.mkdir(parents=True, exist_ok=True)
        np.savez(dump_dir / f"{cfg.name}-nfe{k}.npz", x_start=np.asarray(run.x_start, np.float32),
                 sigma_start=np.float32(run.sigma_start), x_final=np.asarray(run.x_final, np.float32),
                 nfe=np.int32(run.nfe))
    log(f"  {cfg.name:36s} {time.time() - t0:6.1f}s")
  extra = dict(floor=problem.floor(), sw2_floor=sliced_w2(problem.data_samples(problem.seed + 1001), data, directions),
               header=f"{problem.name}: d={problem.dim}, K={problem.arrays[0].size}, n={problem.n}, "
                      f"process={problem.process_name}")
  return results, extra


def calibration_summary(rec) -> str:
  """One line: what the fitted samplers cost to calibrate."""
  entries = rec["samplers"].values()
  search_ev = sum(e["evaluations"] for e in entries)
  fit_s = sum(e["seconds"] + e.get("refine_seconds", 0.0) for e in entries)
  ref = rec["reference_cost"]
  return (f"calibration of fitted_ms{rec['history']}-searched (seed {rec['calib_seed']}, batches {rec['batch']} + "
          f"{rec['val_batch']}, "
          f"lattice {rec['lattice']}): references {ref['evaluations']} float64 evaluations / {ref['seconds']:.0f}s, "
          f"search {search_ev} float32 evaluations + {sum(e.get('refine_iterations', 0) for e in entries)} "
          f"Levenberg-Marquardt iterations / {fit_s:.0f}s (all budgets), total {rec['seconds']:.0f}s on "
          f"{rec.get('device', 'cpu')}"
          + (f" (time budget {rec['time_budget_s']:.0f}s)" if rec.get("time_budget_s") else ""))


def format_table(results, extra, nfes):
  """The per-mixture table: RMSE and SW2 per configuration and NFE budget."""
  lines = [f"== {extra['header']}"
           f" | final-jump floor (exact ODE to sigma_min, then D) RMSE {extra['floor']:.2e}"
           f" | SW2 floor (two data draws) {extra['sw2_floor']:.2e}"]
  head = f"{'config':38s}" + "".join(f"{'RMSE@' + str(k):>11s}" for k in nfes) + "".join(
      f"{'SW2@' + str(k):>10s}" for k in nfes)
  lines.append(head)
  for name, per_k in results.items():
    row = f"{name:38s}"
    for k in nfes:
      r = per_k.get(k)
      row += f"{r['rmse']:>9.2e}{'*' if r['nfe'] < k else ' '} " if r else f"{'-':>10s} "
    for k in nfes:
      r = per_k.get(k)
      row += f"{r['sw2']:>10.3e}" if r else f"{'-':>10s}"
    lines.append(row)
  lines.append("(* = fewer evaluations than the budget: the largest grid that fits)")
  if "calibration" in extra:
    lines.append(extra["calibration"])
  return "\n".join(lines)


def best(results, family_of, pred, k):
  cands = [(r[k]["rmse"], name) for name, r in results.items() if pred(family_of[name]) and k in r]
  return min(cands) if cands else (math.nan, None)


def summary(all_results, nfes, family_of):
  """Best diffjax configuration vs best peer per mixture and budget (and the best standard, uncalibrated one)."""
  lines = ["== best diffjax configuration vs best peer (RMSE to the exact ODE solution; ratio = diffjax / peer)",
           f"{'mixture':8s} {'NFE':>4s}  {'best diffjax':38s} {'best standard diffjax':38s} "
           f"{'best peer':44s} {'ratio':>6s} {'std':>5s}"]
  ratios = {}
  for mix, (results, _) in all_results.items():
    for k in nfes:
      ours = best(results, family_of, lambda f: f == "diffjax", k)
      std = best({n: r for n, r in results.items() if not n.startswith("fitted")}, family_of,
                 lambda f: f == "diffjax", k)
      peer = best(results, family_of, lambda f: f != "diffjax", k)
      ratio = ours[0] / peer[0] if peer[1] else math.nan
      ratios[(mix, k)] = ratio
      lines.append(f"{mix:8s} {k:4d}  {ours[0]:.2e} {str(ours[1]):29s} {std[0]:.2e} {str(std[1]):29s} "
                   f"{peer[0]:.2e} {str(peer[1]):35s} {ratio:6.2f} {std[0] / peer[0] if peer[1] else math.nan:5.2f}")
  return "\n".join(lines), ratios


def plot(all_results, nfes, family_of, path):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import matplotlib.ticker

  fig, axes = plt.subplots(1, len(all_results), figsize=(6 * len(all_results), 5), squeeze=False)
  for ax, (mix, (results, extra)) in zip(axes[0], all_results.items(), strict=True):
    for family, color in (("diffjax", "tab:blue"), ("diffusers", "tab:orange"), ("k-diffusion", "tab:green")):
      names = [n for n in results if family_of[n] == family]
      for name in names:
        ks = sorted(results[name])
        ax.plot(ks, [results[name][k]["rmse"] for k in ks], color=color, alpha=0.25, lw=0.8)
      env = [min((results[n][k]["rmse"] for n in names if k in results[n]), default=np.nan) for k in nfes]
      if names:
        ax.plot(nfes, env, color=color, lw=2.5, marker="o", label=f"best {family}")
      standard = [n for n in names if not n.startswith("fitted")]
      if family == "diffjax" and len(standard) < len(names):
        env = [min((results[n][k]["rmse"] for n in standard if k in results[n]), default=np.nan) for k in nfes]
        ax.plot(nfes, env, color=color, lw=1.8, ls="--", marker="s", label="best standard diffjax (no calibration)")
    ax.axhline(extra["floor"], color="gray", ls="--", lw=1, label="final-jump floor")
    ax.set(xscale="log", yscale="log", xlabel="NFE", ylabel="RMSE to exact ODE solution", title=mix)
    ax.set_xticks(nfes, [str(k) for k in nfes])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def build_configs(args, ksampling):
  configs = default_diffjax_configs(args.extended)
  if args.calibration != "off":
    configs.append(calibrated_config(args))
  if args.peers and peers_available():
    configs += default_diffusers_configs(args.extended) + default_kdiff_configs(ksampling, args.extended)
  if args.only:
    configs = [c for c in configs if re.search(args.only, c.name)]
  return configs


def parse_args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--gmm", default=",".join(str(p) for p in DEFAULT_GMMS),
                  help="comma-separated .npz files with weights (K,), means (K, d), variances (K, d)")
  ap.add_argument("--process", default="sd", help="diffjax.processes.make_process name (default: sd)")
  ap.add_argument("--nfe", default="5,8,10,20", help="comma-separated NFE budgets")
  ap.add_argument("--n", type=int, default=2000, help="samples per run")
  ap.add_argument("--seed", type=int, default=0, help="seed of the initial noise (data samples use seed + 1000)")
  ap.add_argument("--calib_seed", type=int, default=12345, help="seed of optimized grids' calibration batches")
  ap.add_argument("--dump", default=None, help="directory for <config>-nfe<k>.npz files")
  ap.add_argument("--plot", default=None, help="PNG path (default: DIR/sampler_accuracy.png or ./sampler_accuracy.png)")
  ap.add_argument("--ref_tol", type=float, default=1e-8, help="rtol = atol of the float64 dopri5 reference")
  ap.add_argument("--json", default=None, type=output_path,
                  help="also write every result, the ratios and the calibration here")
  ap.add_argument("--only", default=None, help="regex: run only matching configurations")
  ap.add_argument("--no-peers", dest="peers", action="store_false", help="skip diffusers / k-diffusion")
  ap.add_argument("--extended", action="store_true", help="more grid options for diffjax and the peers")
  ap.add_argument("--calibration", choices=("cached", "live", "off"), default="cached",
                  help="fitted samplers: from --calibration_file when it matches this mixture (else skipped), "
                       "fitted now, or not run")
  ap.add_argument("--calib_max_nfe", type=int, default=10,
                  help="fit samplers for budgets up to this NFE (the search cost grows with the budget, the gain "
                       "over the standard solvers shrinks)")
  ap.add_argument("--refine_iterations", type=int, default=20,
                  help="Levenberg-Marquardt iterations refining each fitted sampler on its final error (0: the grid "
                       "search only)")
  ap.add_argument("--calib_minutes", type=float, default=10.0,
                  help="wall-clock bound of a live calibration per mixture (searches and refinement stop early, "
                  "keeping the best found); 0: none")
  ap.add_argument("--calib_val_batch", type=int, default=None,
                  help="validation samples of the calibration (default: calibration_batch_sizes)")
  ap.add_argument("--calibration_file", default=str(CALIBRATION_FILE), help="JSON cache of calibrated samplers")
  ap.add_argument("--save_calibration", action="store_true", help="write the fits made now to --calibration_file")
  args = ap.parse_args(argv)
  args.nfes = sorted({int(k) for k in args.nfe.split(",")})
  if min(args.nfes) < 1 or args.n < 2:
    ap.error("NFE budgets must be >= 1 and n >= 2")
  return args


def main(argv=None):
  args = parse_args(argv)
  jax.config.update("jax_default_matmul_precision", "highest")  # no TF32 on GPUs: float32 means float32
  gmms = [pathlib.Path(p) for p in args.gmm.split(",") if p]
  for p in gmms:
    if not p.is_file():
      raise SystemExit(f"--gmm {p}: no such file (see benchmarks/make_mixtures.py)")
  ksampling = k_diffusion_loader.load_k_diffusion_sampling() if args.peers and peers_available() else None
  if args.peers and not peers_available():
    print("note: torch/diffusers not installed: peers skipped (pip install -e .[reference])")
  configs = build_configs(args, ksampling)
  family_of = {c.name: c.family for c in configs}
  dump = pathlib.Path(args.dump) if args.dump else None
  all_results, calibrations, t_start = {}, {}, time.time()
  for path in gmms:
    problem = Problem(path, args.process, args.n, args.seed, args.ref_tol)
    print(f"[{problem.name}] running {len(configs)} configurations ...", flush=True)
    sub = None if dump is None else (dump if len(gmms) == 1 else dump / problem.name)
    t0 = time.time()
    results, extra = evaluate(problem, configs, args.nfes, sub, log=lambda s: print(s, flush=True))
    all_results[problem.name] = (results, extra)
    rec = getattr(problem, "calibration", None)
    calibrations[problem.name] = rec
    if rec:
      extra["calibration"] = calibration_summary(rec)
      if rec.pop("computed_now", False) and args.save_calibration:
        path = pathlib.Path(args.calibration_file)
        cache = json.loads(path.read_text()) if path.is_file() else {}
        cache[problem.name] = rec
        path.write_text(json.dumps(cache, indent=1) + "\n")
        print(f"[{problem.name}] calibration saved to {path}")
    print(f"[{problem.name}] {time.time() - t0:.0f}s, of which reference solves {problem.ref_time:.0f}s "
          f"({len(problem._refs)} solves, {problem.ref_nfe} evaluations)\n", flush=True)
  for results, extra in all_results.values():
    print(format_table(results, extra, args.nfes))
    print()
  text, ratios = summary(all_results, args.nfes, family_of)
  print(text)
  if args.json:
    out = {mix: {"results": results, "families": family_of, "floor": extra["floor"],
                 "calibration": calibrations.get(mix),
                 "ratio_best_diffjax_to_best_peer": {str(k): ratios[(mix, k)] for k in args.nfes}}
           for mix, (results, extra) in all_results.items()}
    write_json(args.json, out, indent=1, default=float)
  plot_path = pathlib.Path(args.plot) if args.plot else (dump / "sampler_accuracy.png" if dump else
                                                         pathlib.Path("sampler_accuracy.png"))
  plot_path.parent.mkdir(parents=True, exist_ok=True)
  plot(all_results, args.nfes, family_of, plot_path)
  print(f"\nplot: {plot_path}; total {time.time() - t_start:.0f}s")


if __name__ == "__main__":
  main()
