"""Mathematical tests of the deterministic solvers (diffjax.samplers.ode), swept over ODE_SOLVERS.

Gaussian data has a closed-form denoiser and probability-flow map (diffjax.analytic),
so the global error of every solver is measured exactly. The time of this file is XLA
compilation, so all solvers run in lockstep inside one jitted step (``_run``, the
computation of ``sample`` as a loop) that takes the process (``_Pick``), the data and
the grid as arguments: the float64 tests share one program, whatever the grid sizes.
"""

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import struct

from diffjax import processes
from diffjax.analytic import GaussianMixture
from diffjax.samplers import grids, sample
from diffjax.samplers.ode import ODE_SOLVERS

ORDER_OPTIONS = {"dpm_solver": (1, 2, 3), "unipc": (1, 2, 3), "unipc_bh1": (1, 2, 3), "unipc_bh2": (1, 2, 3),
                 "ipndm": (1, 2, 3, 4), "ipndm_v": (1, 2, 3, 4), "lms": (1, 2, 3, 4)}
CASES = tuple((name, (("order", k),) if k else ()) for name in ODE_SOLVERS for k in ORDER_OPTIONS.get(name, (None,)))
MIXTURE = dict(weights=[0.3, 0.7], means=[[-1.0, 0.5], [1.0, -0.3]], variances=[[0.1, 0.3], [0.2, 0.05]])
# Solvers written in lambda with ratios: finite from alpha = 0 (the others divide by alpha).
LAMBDA_CASES = tuple(c for c in CASES if c[0] in ("euler", "ddim", "dpm_solver", "dpmpp_2m", "dpmpp_3m", "unipc",
                                                  "unipc_bh1", "unipc_bh2"))


def _name(case):
  return case[0] + "".join(f"-{k}{v}" for k, v in case[1])


def _solver(case, process):
  return ODE_SOLVERS[case[0]](process, **dict(case[1]))


def _same_solver(case):
  """(factory, all options with defaults): registry entries that build the same solver get the same key."""
  factory, options = ODE_SOLVERS[case[0]], dict(case[1])
  if isinstance(factory, functools.partial):
    factory, options = factory.func, {**factory.keywords, **options}
  bound = inspect.signature(factory).bind(None, **options)
  bound.apply_defaults()
  return factory, tuple((k, v) for k, v in sorted(bound.arguments.items()) if k != "process")


def _mixture(weights, means, variances, dtype):
  return jax.tree.map(lambda a: a.astype(dtype), GaussianMixture.create(weights, means, variances))


@struct.dataclass
class _Pick(processes.Process):
  """The schedule of ``choices[index]``: solvers see exactly that process's values; ``index`` is traced."""

  choices: tuple
  index: int = 0

  def _pick(self, method, u):
    return jnp.stack([getattr(p, method)(u) for p in self.choices])[self.index]

  def log_alpha(self, t):
    return self._pick("log_alpha", t)

  def log_sigma(self, t):
    return self._pick("log_sigma", t)

  def t_from_log_snr(self, log_snr):
    return self._pick("t_from_log_snr", log_snr)


def _processes():
  """(DiscreteVP 'sd', VPLinear) and _Pick over them (float64: call under x64)."""
  choices = (processes.make_process("sd"), processes.VPLinear())
  return choices, functools.partial(_Pick, choices)


@functools.cache
def _step_all(cases):
  """One jitted step of every solver in ``cases``; process and data are arguments (no recompiles)."""

  def step(process, mixture, xs, t, t_next, states):
    denoise = mixture.denoiser(process)
    out = [_solver(c, process).step(denoise, x, t, t_next, s, None) for c, x, s in zip(cases, xs, states, strict=True)]
    return tuple(o[0] for o in out), tuple(o[1] for o in out)

  return jax.jit(step)


@jax.jit
def _denoise_all(process, mixture, xs, t):
  return jnp.split(mixture.denoiser(process)(jnp.concatenate(xs), t), len(xs))


def _grids(name, process, ns, **kwargs):
  """Host grids of several sizes, compiled once (eager jnp compiles per size; interp is slow to compile).

  "karras" is built in the EDM sigma (the grid of process EDM) and mapped to time by
  one ``t_from_edm_sigma`` call.
  """
  if name != "karras":
    return [np.asarray(ts) for ts in jax.jit(lambda p: [getattr(grids, name)(p, n, **kwargs) for n in ns])(process)]
  kwargs.setdefault("sigma_min", process.edm_sigma(process.t_min))
  kwargs.setdefault("sigma_max", process.edm_sigma(process.t_max))
  sigmas = jax.jit(lambda kw: jnp.concatenate([grids.karras(processes.EDM(), n, **kw) for n in ns]))(kwargs)
  return np.split(np.asarray(process.t_from_edm_sigma(sigmas)), np.cumsum(ns)[:-1])


def _types(tree):
  return [(a.shape, a.dtype) for a in jax.tree.leaves(tree)]


def _run(cases, process, mixture, x, ts, denoise_final=False):
  """``sample(solver, denoise, x, ts, denoise_final)`` for every solver in ``cases``, as a Python loop.

  Also checks that a step keeps the shapes and dtypes of x and of the state (``lax.scan``
  in ``sample`` needs it).
  """
  unique = {_same_solver(c): c for c in reversed(cases)}  # aliases (ddim = euler, ...) run once
  ts, run = np.asarray(ts), tuple(unique.values())
  xs = (x,) * len(run)
  if ts.shape[0] > 1:
    states = tuple(_solver(c, process).init(x, ts) for c in run)
    types = _types((xs, states))
    for i in range(ts.shape[0] - 1):
      xs, states = _step_all(run)(process, mixture, xs, ts[i], ts[i + 1], states)
    assert _types((xs, states)) == types
  xs = _denoise_all(process, mixture, xs, ts[-1]) if denoise_final else xs
  return [xs[run.index(unique[_same_solver(c)])] for c in cases]


# ----------------------------------------------------------------------------------
# Empirical global order against the exact flow of a single Gaussian.
# ----------------------------------------------------------------------------------
# Distinct variances: the small one (near sigma_min^2) makes the low-noise steps count,
# the large one (near sigma_max^2) the high-noise warm-up steps of the multistep
# methods, so every solver is in its asymptotic regime at these N (a slope is fitted
# to the errors at all of them). Both processes use the Karras grid over the noise range
# of Stable Diffusion's schedule (EDM sigma 0.029 .. 14.6).
ORDER_NS = np.array([129, 257, 513])
GAUSS = dict(means=[[0.3, -0.5]], variances=[[0.01, 100.0]])


@functools.cache
def _order_errors(process_name):
  """(len(CASES), len(ORDER_NS)) max-abs errors at ts[-1] (float64, call under x64)."""
  (sd, vp), pick = _processes()
  process, index = (sd, 0) if process_name == "sd" else (vp, 1)
  one = GaussianMixture.create([1.0], **GAUSS)
  two = GaussianMixture.create([0.5, 0.5], GAUSS["means"] * 2, GAUSS["variances"] * 2)  # same denoiser, shared compile
  errors = []
  for ts in _grids("karras", process, ORDER_NS.tolist(), sigma_min=sd.edm_sigma(sd.t_min),
                   sigma_max=sd.edm_sigma(sd.t_max)):
    alpha, sigma, alpha_n, sigma_n = (f(u) for u in (ts[0], ts[-1]) for f in (process.alpha, process.sigma))
    x = alpha * one.means[0] + jnp.sqrt(alpha**2 * one.variances[0] + sigma**2) * jax.random.normal(
        jax.random.key(0), (8, 2), jnp.float64)
    exact = one.gaussian_flow(x, alpha, sigma, alpha_n, sigma_n)
    errors.append([float(jnp.max(jnp.abs(out - exact))) for out in _run(CASES, pick(index), two, x, ts)])
  return np.array(errors).T


@pytest.mark.parametrize("process_name", ["sd", "vp_linear"])
@pytest.mark.parametrize("case", CASES, ids=_name)
def test_empirical_order(x64, case, process_name):
  errors = _order_errors(process_name)[CASES.index(case)]
  slope = -np.polyfit(np.log(ORDER_NS - 1), np.log(errors), 1)[0]
  declared = _solver(case, processes.make_process(process_name)).order
  assert abs(slope - declared) <= 0.3, f"slope {slope:.2f}, declared {declared}, errors {errors}"


def test_equivalent_solvers(x64):
  """Algebraic identities: the first-order methods are all DDIM; iPNDM is LMS on steps uniform in sigma.

  (Registry aliases such as ddim = euler or unipc = unipc_bh2 share one run in ``_run``.)
  """
  (sd, _), pick = _processes()
  mixture = _mixture(**MIXTURE, dtype=jnp.float64)
  x = sd.prior_sample(jax.random.key(5), (8, 2), jnp.float64)
  ts = sd.t_from_edm_sigma(jnp.linspace(14.0, 0.03, 12))  # uniform in sigma
  out = dict(zip(CASES, _run(CASES, pick(0), mixture, x, ts), strict=True))
  same = [[(n, (("order", k),)) for n in ("ipndm", "ipndm_v", "lms")] for k in (1, 2, 3, 4)]
  same[0] += [("euler", ()), ("dpm_solver", (("order", 1),))]
  for group in same:
    for case in group[1:]:
      np.testing.assert_allclose(out[case], out[group[0]], rtol=1e-10, atol=1e-10, err_msg=_name(case))


def test_multistep_weights_are_exact(x64):
  """LMS weights integrate polynomials of degree < k exactly; UniPC's integrate the exponential weight exactly.

  Checked against Gauss-Legendre quadrature, including unused (NaN) and infinitely far
  (lam = -inf) history nodes.
  """
  from diffjax.samplers.ode import _lms_weights, _unipc_weights

  nodes, s_next = np.array([1.0, 1.7, 3.1, 3.6]), 0.4  # s_i, s_{i-1}, ... (noise decreasing)
  ks = np.arange(1, 5)
  unused = np.where(np.arange(4) >= ks[:, None], np.nan, nodes)
  lms = np.asarray(jax.jit(jax.vmap(_lms_weights, (0, 0, None)))(ks, unused, s_next))
  for k, c in zip(ks, lms, strict=True):
    assert np.all(c[k:] == 0)
    for deg in range(k):
      np.testing.assert_allclose(c @ nodes**deg, (s_next ** (deg + 1) - 1.0) / (deg + 1), rtol=1e-12, atol=1e-12)

  h = 0.7  # -sum_j w_j r_j^k (the update's -sum_j w_j (D_j - D_0) for D_j - D_0 = r_j^k) must equal
  xi, wq = np.polynomial.legendre.leggauss(30)  # int_0^h e^-(h - tau) (tau/h)^k dtau = h int_0^1 e^-h(1-u) u^k du
  moment = lambda k: h * np.sum(wq / 2 * np.exp(-h * (1 - (xi + 1) / 2)) * ((xi + 1) / 2) ** k)
  rs = np.array([(-0.8, -1.9, -2.5), (1.0, -0.6, -1.5), (-0.8, -1.9, -2.5), (-0.8, -np.inf, 0.0), (-0.8, np.nan, 0.0)])
  ms, used = np.array([3, 3, 2, 2, 2]), [3, 3, 2, 1, 1]  # nodes at lam = -inf (or unused) drop out
  for variant in ("bh1", "bh2"):  # B(h) cancels unless m = 1
    ws = np.asarray(jax.jit(jax.vmap(lambda r, m, v=variant: _unipc_weights(jnp.asarray(h), r, m, v)))(rs, ms))
    for r, w, n in zip(rs, ws, used, strict=True):
      assert np.all(w[n:] == 0)
      for k in range(1, n + 1):
        np.testing.assert_allclose(-w[:n] @ r[:n] ** k, moment(k), rtol=1e-12)


def _evaluations(solver, steps: int) -> list[int]:
  """Denoiser calls executed by each of the first ``steps`` steps, counted at run time (a call in an
  untaken branch or a skipped loop iteration does not count; PNDM has one call site for its two)."""
  calls, x, ts = [], jnp.ones((2, 2)), jnp.array([2.0, 1.0, 0.5, 0.25])

  def denoise(x, t):
    jax.debug.callback(lambda: calls.append(1))
    return 0.5 * x

  state, counts = solver.init(x, ts), []
  for i in range(steps):
    x, state = jax.jit(solver.step, static_argnums=0)(denoise, x, ts[i], ts[i + 1], state, None)
    jax.effects_barrier()
    counts.append(len(calls) - sum(counts))
  return counts


def test_declared_evaluations_and_options():
  """nfe_per_step is the number of denoiser calls of a step; bad options fail at construction."""
  assert set(ORDER_OPTIONS) <= set(ODE_SOLVERS)
  for case in CASES:
    solver = _solver(case, processes.EDM())
    first, second = _evaluations(solver, 2)
    assert (first, second) == (solver.nfe_per_step + solver.warmup_nfe, solver.nfe_per_step), _name(case)
    assert not solver.stochastic, _name(case)
  for name, bad in [("dpm_solver", {"order": 4}), ("dpmpp_2m", {"order": 0}), ("unipc", {"variant": "bh3"}),
                    ("ipndm", {"order": 5}), ("lms", {"order": 5}), ("ipndm_v", {"order": 0})]:
    with pytest.raises(ValueError):
      ODE_SOLVERS[name](processes.EDM(), **bad)


# ----------------------------------------------------------------------------------
# Finite everywhere: every solver and order, 1..100 grid points.
# ----------------------------------------------------------------------------------
NAN_NS = tuple(range(1, 13)) + (16, 25, 50, 100)


@pytest.mark.parametrize("grid", ["karras", "uniform_t"])
def test_finite_on_sd(x64, grid):
  """Float64 shares the compiled steps of the order test; float32 is covered from alpha = 0 below."""
  (process, *_), pick = _processes()
  mixture = _mixture(**MIXTURE, dtype=jnp.float64)
  x = process.prior_sample(jax.random.key(1), (8, 2), jnp.float64)
  bad = []
  for n, ts in zip(NAN_NS, _grids(grid, process, NAN_NS), strict=True):
    outs = _run(CASES, pick(0), mixture, x, ts, denoise_final=True)
    bad += [(_name(c), n) for c, out in zip(CASES, outs, strict=True) if not np.all(np.isfinite(out))]
  assert not bad, f"non-finite samples: {bad}"


def test_lambda_solvers_from_pure_noise():
  """RectifiedFlow from t = 1 (alpha = 0, lam = -inf): finite, and converging to the exact flow."""
  process = processes.RectifiedFlow(shift=3.0)
  one = GaussianMixture.create([1.0], [[0.3, -0.5]], [[0.1, 2.0]])
  two = _mixture([0.5, 0.5], [[0.3, -0.5]] * 2, [[0.1, 2.0]] * 2, jnp.float32)
  x = jax.random.normal(jax.random.key(2), (8, 2), jnp.float32)  # x_1 = eps
  exact = one.gaussian_flow(x, 0.0, 1.0, 1.0, 0.0)
  errors = {}
  for n, ts in zip(NAN_NS, _grids("uniform_t", process, NAN_NS, t_start=1.0), strict=True):
    outs = _run(LAMBDA_CASES, process, two, x, ts, denoise_final=True)
    for c, out in zip(LAMBDA_CASES, outs, strict=True):
      assert np.all(np.isfinite(out)), (_name(c), n)
      errors[c, n] = float(jnp.max(jnp.abs(out - exact)))
  for c in LAMBDA_CASES:  # bh1's B(h) = h is poor on the first, long lambda steps; still converging
    assert errors[c, 100] < 0.1 and errors[c, 100] < errors[c, 12] / 2, (_name(c), errors[c, 12], errors[c, 100])


# ----------------------------------------------------------------------------------
# A two-component mixture: convergence to a Heun reference (8000 steps, error ~1e-7).
# ----------------------------------------------------------------------------------
def test_mixture_convergence(x64):
  (process, *_), pick = _processes()
  mixture = _mixture(**MIXTURE, dtype=jnp.float64)
  denoise = mixture.denoiser(process)
  x = process.prior_sample(jax.random.key(3), (8, 2), jnp.float64)
  coarse_ts, fine_ts, ref_ts = _grids("karras", process, (33, 129, 8001))
  ref = jax.jit(lambda x, ts: sample(ODE_SOLVERS["heun"](process), denoise, x, ts))(x, ref_ts)
  coarse, fine = (_run(CASES, pick(0), mixture, x, ts, denoise_final=True) for ts in (coarse_ts, fine_ts))
  for case, c, f in zip(CASES, coarse, fine, strict=True):
    order = _solver(case, process).order
    c, f = (float(jnp.max(jnp.abs(out - ref))) for out in (c, f))
    assert f < 0.1 / 4 ** (order - 1) and f < c / 2**order, (_name(case), c, f)

  # The lax.scan driver gives what the step loop gives (UniPC: the richest state through scan).
  case = ("unipc", (("order", 3),))
  driven = jax.jit(lambda x, ts: sample(_solver(case, process), denoise, x, ts))(x, coarse_ts)
  np.testing.assert_allclose(driven, coarse[CASES.index(case)], rtol=1e-12, atol=1e-12)
