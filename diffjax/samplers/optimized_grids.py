"""Grids and multistep coefficients fitted to one model on a calibration batch.

At 5 to 10 denoiser evaluations, where the few noise levels go and how the
denoiser outputs are combined dominate a sampler's error, and the best choice
depends on the model. This module fits both to reference trajectories of a
calibration batch (noise drawn with other seeds than any evaluation batch, solved
tightly, e.g. with ``dopri5``), in the spirit of learned solver coefficients and
schedules (e.g. DPM-Solver-v3, Zheng et al. 2023; "Align Your Steps", Sabour et al.
2024; PAS, Wang et al. 2024), but with closed-form least squares instead of
gradient descent:

* ``fitted_multistep``: an exponential multistep solver in data-prediction form,
  written in the variance-exploding view x~ = x / alpha, s = sigma / alpha:

    x~_{i+1} = r x~_i + (1 - r) [D_i + sum_{j=1}^{H-1} beta_{i,j} (D_{i-j} - D_i) + gamma_i (x~_i - D_i)],

  r = s_{i+1} / s_i, one denoiser evaluation D_i = D(x_i, t_i) per step. beta = gamma = 0
  is DDIM; DPM-Solver++(2M) is one particular beta_{i,1}; gamma rescales the step of the
  linear part. The per-step coefficients are free.
* ``final_estimate_solver``: the last step also returns the clean sample
  x0 = D_N + sum_j w_j (D_{N-j} - D_N) from the final denoiser output and the ones
  at the previous grid points, at no extra evaluation (w = 0 is the usual jump
  D(x_N, t_N)). ``lagrange_final_weights`` gives the polynomial extrapolation of D to
  sigma = 0, which is the exact ODE solution from the last grid point when D is a
  polynomial in s along the trajectory (x~(0) = D(0) for dx~/ds = (x~ - D) / s).
* ``fit_multistep``: greedy least squares. Step by step along the calibration
  trajectory, beta_i minimizes ||x~_{i+1} - x~ref(t_{i+1})||^2 over the batch given the
  states and denoiser outputs the fitted solver itself produced so far; then w
  minimizes ||x0 - target||^2. Each fit costs exactly one sampler run (N evaluations
  on the calibration batch) and a few tiny least-squares solves.
* ``search_grid``: coordinate search of the N grid points over a lattice of noise
  levels at which the reference trajectory is stored, each candidate scored by the
  calibration error of its fitted solver.

A grid of N points costs N evaluations (N - 1 steps and the final one), like any
multistep solver. Times are process times; alpha(t) > 0 at every grid point but the first, which may be pure
noise (alpha = 0, rectified flow's t = 1: s = inf, r = 0). There x~ is infinite, but the step's linear part
r x~_i = s_{i+1} x_i / sigma_i is not, and a step from pure noise is DDIM's, x~_1 = D_0 + s_1 x_0 / sigma_0
(the limit of the formula; gamma_0 = 0: x~_0 - D_0 is infinite, and no history exists yet).
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from diffjax.processes import Process
from diffjax.samplers.base import Solver, sample

Array = jax.Array


# ------------------------------------------------------------------------------------
# Final estimate from the history of denoiser outputs.
# ------------------------------------------------------------------------------------
class FinalState(NamedTuple):
  """State of ``final_estimate_solver``: the base solver's state, step counter, grid size, past D's."""

  base: Any
  i: Array
  n: Array
  hist: Array  # (max(m - 1, 1), ...) denoiser outputs at the previous grid points, most recent first
  t_hist: Array  # their times


def lagrange_final_weights(process: Process, t_final, t_hist, variable: str = "sigma") -> Array:
  """Weights (m,) on (D_N, D_{N-1}, ...) of the polynomial extrapolation of D to sigma = 0.

  Nodes are the EDM sigmas s = sigma / alpha at (t_final, *t_hist) ("sigma"), or s^2
  ("sigma2", for a D that is even in s near 0, as for Gaussian data). They sum to 1.
  """
  s = process.edm_sigma(jnp.concatenate([jnp.asarray(t_final)[None], jnp.asarray(t_hist)]))
  z = s if variable == "sigma" else s**2
  m = z.shape[0]
  idx = jnp.arange(m)
  mask = idx[:, None] != idx[None, :]
  num = jnp.where(mask, -z[None, :], 1.0)  # L_j(0) = prod_{k != j} (0 - z_k) / (z_j - z_k)
  den = jnp.where(mask, z[:, None] - z[None, :], 1.0)
  return jnp.prod(num / den, axis=1)


def final_estimate_solver(solver: Solver, process: Process, history: int = 2, weights=None,
                          variable: str = "sigma") -> Solver:
  """``solver`` whose last step returns sum_j w_j D_{N-j}; run it with ``sample(..., denoise_final=False)``.

  The wrapper records the denoiser output at each step's input (x_i, t_i) (the first
  evaluation of a step, which every solver in ``diffjax.samplers`` makes at its own
  input; anything else raises at trace time) and, on the last step, evaluates
  D_N = D(x_N, t_N) once and returns x0 = w_0 D_N + w_1 D_{N-1} + ... + w_{m-1} D_{N-m+1}.

  Args:
    solver: a ``Solver``.
    process: the process (for the Lagrange weights).
    history: m >= 1 outputs in the estimate; 1 is the usual final jump.
    weights: (m,) weights (should sum to 1), or None for ``lagrange_final_weights``.
    variable: Lagrange variable, see ``lagrange_final_weights``.

  A grid of N >= m points costs ``num_evaluations(solver, N)`` evaluations, as with
  the plain final jump.
  """
  if history < 1:
    raise ValueError(f"history must be >= 1, got {history}")
  if weights is not None and np.shape(weights) != (history,):
    raise ValueError(f"weights must have shape ({history},), got {np.shape(weights)}")
  m = history

  def init(x, ts):
    size = max(m - 1, 1)
    return FinalState(solver.init(x, ts), jnp.zeros((), jnp.int32), jnp.asarray(ts.shape[0], jnp.int32),
                      jnp.zeros((size,) + x.shape, x.dtype), jnp.full((size,), ts[0]))

  def step(denoise, x, t, t_next, state, key):
    seen = []

    def recording(xx, tt):
      d = denoise(xx, tt)
      if not seen:
        if xx is not x:
          raise ValueError("final_estimate_solver: the solver's first evaluation of a step is not at its input x")
        seen.append(d)
      return d

    x_next, base = solver.step(recording, x, t, t_next, state.base, key)
    if not seen:
      raise ValueError("final_estimate_solver: the solver made no evaluation in a step")
    hist = jnp.concatenate([seen[0][None].astype(state.hist.dtype), state.hist[:-1]])
    t_hist = jnp.concatenate([jnp.asarray(t, state.t_hist.dtype)[None], state.t_hist[:-1]])

    def final(x_next):
      d_n = denoise(x_next, t_next)
      if m == 1:
        return d_n.astype(x_next.dtype)
      w = (lagrange_final_weights(process, t_next, t_hist[: m - 1], variable) if weights is None
           else jnp.asarray(weights))
      w = w.astype(d_n.dtype)
      return (w[0] * d_n + jnp.tensordot(w[1:], hist[: m - 1], axes=1)).astype(x_next.dtype)

    x_out = jax.lax.cond(state.i == state.n - 2, final, lambda x_next: x_next, x_next)
    return x_out, FinalState(base, state.i + 1, state.n, hist, t_hist)

  return Solver(init=init, step=step, order=solver.order, nfe_per_step=solver.nfe_per_step,
                stochastic=solver.stochastic)


# ------------------------------------------------------------------------------------
# The fitted multistep solver.
# ------------------------------------------------------------------------------------
def fitted_multistep(process: Process, beta, gamma=None) -> Solver:
  """Exponential multistep solver with per-step coefficients (module docstring).

  Args:
    process: the process.
    beta: (N - 1, H - 1) weights of (D_{i-j} - D_i) at step i of a grid of N points;
      outputs before the first grid point must have weight 0 (beta[i, j] = 0 for j > i,
      as ``fit_multistep`` leaves them: the history starts zero-filled).
    gamma: (N - 1,) weights of (x~_i - D_i), default 0.

  Global order 1 whatever the coefficients (they are fitted, not derived); 1 evaluation
  per step.
  """
  beta = jnp.asarray(beta)
  if beta.ndim != 2:
    raise ValueError(f"beta must be (num_steps, history - 1), got shape {beta.shape}")
  gamma = jnp.zeros(beta.shape[:1], beta.dtype) if gamma is None else jnp.asarray(gamma)
  if gamma.shape != beta.shape[:1]:
    raise ValueError(f"gamma must be ({beta.shape[0]},), got shape {gamma.shape}")
  h = beta.shape[1] + 1

  def init(x, ts):
    return {"i": jnp.zeros((), jnp.int32), "hist": jnp.zeros((max(h - 1, 1),) + x.shape, x.dtype)}

  def step(denoise, x, t, t_next, state, key):
    d = denoise(x, t)
    i = jnp.minimum(state["i"], beta.shape[0] - 1)
    prev = [state["hist"][j] for j in range(h - 1)]
    x_next = _multistep_update(process, x, d, prev, beta[i], gamma[i], t, t_next)
    hist = jnp.concatenate([d[None], state["hist"][:-1]]) if h > 1 else state["hist"]
    return x_next, {"i": state["i"] + 1, "hist": hist}

  return Solver(init=init, step=step, order=1, nfe_per_step=1)


def _multistep_update(process: Process, x, d, prev, b, g, t, t_next) -> Array:
  """x_{i+1} of a ``fitted_multistep`` step from x (at t) to t_next: D_i = d, prev = [D_{i-1}, D_{i-2}, ...]
  (arrays, at most b.size of them; missing ones count as 0, as the zero-filled history), b = beta_i, g = gamma_i."""
  alpha, sigma = process.alpha(t), process.sigma(t)
  alpha_n, s_n = process.alpha(t_next), process.edm_sigma(t_next)
  r = s_n * alpha / sigma  # s_n / s, 0 from pure noise
  signal = alpha > 0
  xs_minus_d = jnp.where(signal, x / jnp.where(signal, alpha, 1.0) - d, 0.0)  # (gamma's term: 0 from pure noise)
  combo = d + g.astype(x.dtype) * xs_minus_d
  b = b.astype(x.dtype)
  for j, p in enumerate(prev):  # summed one by one: a stacked history costs a copy of it (the search's rollout)
    combo = combo + b[j] * (p - d)
  if len(prev) < b.shape[0]:  # the zero-filled history's terms, b_j (0 - d)
    combo = combo - jnp.sum(b[len(prev):]) * d
  x_next = alpha_n * (s_n * x / sigma + (1.0 - r) * combo)  # r x~ = s_n x / sigma: finite at alpha = 0
  return x_next.astype(x.dtype)


@dataclasses.dataclass
class FittedSampler:
  """A grid with its fitted coefficients; ``sample`` runs it.

  Attributes:
    ts: (N,) process times.
    beta: (N - 1, H - 1) step coefficients (``fitted_multistep``).
    final: (H - 1,) coefficients of (D_{N-j} - D_N) in the final estimate.
    gamma: (N - 1,) coefficients of (x~_i - D_i), or None (0).
    calib_rmse: RMS error on the calibration batch (vs the reference target).
  """

  ts: np.ndarray
  beta: np.ndarray
  final: np.ndarray
  gamma: np.ndarray | None = None
  calib_rmse: float = float("nan")

  @property
  def final_weights(self) -> np.ndarray:
    """(H,) weights on (D_N, D_{N-1}, ...)."""
    return np.concatenate([[1.0 - np.sum(self.final)], self.final])

  def solver(self, process: Process) -> Solver:
    """The Solver to run with ``sample(..., denoise_final=False)`` on ``ts``."""
    history = min(self.final.size + 1, len(self.ts))
    return final_estimate_solver(fitted_multistep(process, self.beta, self.gamma), process, history,
                                 self.final_weights[:history])

  def sample(self, process: Process, denoise, x, *, key=None) -> Array:
    """(B, ...) clean samples from x (B, ...) at ts[0]; N evaluations."""
    return sample(self.solver(process), denoise, x, jnp.asarray(self.ts, x.dtype), key=key, denoise_final=False)

  def to_dict(self) -> dict:
    gamma = np.zeros(len(self.ts) - 1) if self.gamma is None else np.asarray(self.gamma)
    return {"ts": np.asarray(self.ts).tolist(), "beta": np.asarray(self.beta).tolist(),
            "gamma": gamma.tolist(), "final": np.asarray(self.final).tolist(), "calib_rmse": self.calib_rmse}

  @classmethod
  def from_dict(cls, d) -> FittedSampler:
    final = np.asarray(d["final"], np.float64).reshape(-1)
    beta = np.asarray(d["beta"], np.float64).reshape(len(d["ts"]) - 1, final.size)
    gamma = np.asarray(d.get("gamma", np.zeros(len(d["ts"]) - 1)), np.float64)
    return cls(np.asarray(d["ts"], np.float64), beta, final, gamma, float(d.get("calib_rmse", float("nan"))))


def _lstsq(regressors, target):
  """argmin_c ||target - sum_j c_j regressors[j]||^2 over all elements (float64); c_j = 0 for a zero regressor."""
  if not regressors:
    return np.zeros(0)
  a = np.stack([np.asarray(g, np.float64).ravel() for g in regressors], 1)
  gram = a.T @ a
  rhs = a.T @ np.asarray(target, np.float64).ravel()
  # Equilibrated by the column norms, one division at a time. A zero regressor (e.g. two equal float32 denoiser
  # outputs) carries no information and is dropped: the former normalisation by sqrt(max(diag, 1e-300)) products
  # underflowed there (1e-300 * 1e-300 = 0) and gave 0 / 0 = NaN, which LAPACK rejects ("SVD did not converge").
  norm = np.sqrt(np.diag(gram))
  keep = norm > 0
  c = np.zeros(a.shape[1])
  if keep.any():
    n = norm[keep]
    c[keep] = np.linalg.lstsq(gram[np.ix_(keep, keep)] / n[:, None] / n[None, :], rhs[keep] / n, rcond=1e-12)[0] / n
  return c


def _checked(d, t):
  """d (float64), after checking that the denoiser's output at time t is finite."""
  if not np.all(np.isfinite(d)):
    rows = int(np.sum(~np.all(np.isfinite(d.reshape(d.shape[0], -1)), axis=1)))
    raise FloatingPointError(f"the denoiser returned non-finite values at t = {t:.6g} ({rows} of {d.shape[0]} "
                             "samples); the fit needs a finite denoiser")
  return d


def fit_multistep(process: Process, denoise, x, ts, ref_states, target, history: int = 3,
                  free_ratio: bool = True) -> FittedSampler:
  """Greedy least-squares fit of ``fitted_multistep`` coefficients and final weights on a calibration batch.

  Args:
    process: the model's process.
    denoise: ``(x, t) -> x0_hat`` (ideally jitted; called N times on the batch).
    x: (B, ...) calibration start at ts[0] in process coordinates.
    ts: (N,) grid, N >= 2.
    ref_states: (N, B, ...) reference trajectory in the sigma-space view x~ = x / alpha
      at the grid points (ref_states[0], the start, is not used).
    target: (B, ...) reference clean samples (the ODE solution at sigma = 0).
    history: H >= 1, outputs combined per step (H = 1: DDIM with a fitted final step).
    free_ratio: also fit gamma, the weight of (x~_i - D_i) (else gamma = 0).

  Returns:
    A ``FittedSampler`` with ``calib_rmse`` the RMS error of its output on the batch.
  """
  ts = np.asarray(ts, np.float64)
  n = ts.shape[0]
  if n < 2:
    raise ValueError("fit_multistep needs a grid of at least 2 points")
  alpha, sigma, s = _coefficients(process, ts)
  dtype = jnp.asarray(x).dtype
  x = np.asarray(x, np.float64)
  if not (np.all(np.isfinite(x)) and np.all(np.isfinite(np.asarray(ref_states[1:])))
          and np.all(np.isfinite(np.asarray(target)))):
    raise ValueError("fit_multistep: x, ref_states and target must be finite")
  outs = []
  beta = np.zeros((n - 1, max(history - 1, 0)))
  gamma = np.zeros(n - 1)
  for i in range(n - 1):
    d = _evaluate(denoise, x, ts[i], dtype)
    outs.insert(0, d)
    base, regs = _step_terms(x, alpha[i], sigma[i], s[i + 1], outs[: history], free_ratio)
    c = _lstsq(regs, np.asarray(ref_states[i + 1], np.float64) - base)
    if free_ratio:
      gamma[i] = c[-1]
      beta[i, : c.size - 1] = c[:-1]
    else:
      beta[i, : c.size] = c
    x = alpha[i + 1] * (base + sum((cj * g for cj, g in zip(c, regs, strict=True)), np.zeros_like(base)))
  outs.insert(0, _evaluate(denoise, x, ts[-1], dtype))
  w = _lstsq(_final_terms(outs[: history]), np.asarray(target, np.float64) - outs[0])
  final = np.zeros(max(history - 1, 0))
  final[: w.size] = w
  fitted = FittedSampler(ts, beta, final, gamma)
  fitted.calib_rmse = _rmse(_final_estimate(outs, fitted.final_weights), target)
  return fitted


def _evaluate(denoise, x, t, dtype) -> np.ndarray:
  """The denoiser's output (float64) at x (float64, cast to ``dtype``) and time t, checked finite."""
  return _checked(np.asarray(denoise(jnp.asarray(x, dtype), jnp.asarray(t, dtype)), np.float64), t)


def _coefficients(process: Process, ts) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(alpha, sigma, s = sigma / alpha) at the times ts, float64 of the float32 values the samplers use."""
  t = jnp.asarray(ts, jnp.float32)
  return tuple(np.asarray(f(t), np.float64) for f in (process.alpha, process.sigma, process.edm_sigma))


def _step_terms(x, alpha, sigma, s_next, outs, free_ratio: bool):
  """(DDIM's x~_{i+1}, the regressors whose fitted weights are beta_i (and gamma_i)) of a ``fitted_multistep``
  step from x_i (process coordinates) at (alpha, sigma) to noise level s_next; outs: D_i, D_{i-1}, ... (most
  recent first, at most H). From pure noise (alpha = 0) gamma's regressor is 0 (``_lstsq`` gives it weight 0)."""
  d, r = outs[0], s_next * alpha / sigma
  regs = [(1.0 - r) * (prev - d) for prev in outs[1:]]
  if free_ratio:
    regs.append((1.0 - r) * (x / alpha - d) if alpha > 0 else np.zeros_like(d))
  return s_next * x / sigma + (1.0 - r) * d, regs


def _final_terms(outs):
  """Regressors of the final estimate's weights: D_{N-j} - D_N for the outputs before the last (outs: most
  recent first)."""
  return [prev - outs[0] for prev in outs[1:]]


def _final_estimate(outs, weights) -> np.ndarray:
  """sum_j weights_j D_{N-j} (outs: most recent first; weights sum to 1, as ``FittedSampler.final_weights``)."""
  return outs[0] + sum((w * g for w, g in zip(weights[1:], _final_terms(outs[: len(weights)]), strict=False)),
                       np.zeros_like(outs[0]))


def _rmse(x, target) -> float:
  return float(np.sqrt(np.mean((np.asarray(x, np.float64) - np.asarray(target, np.float64)) ** 2)))


def rollout(process: Process, fitted: FittedSampler, denoise, x) -> Array:
  """(B, ...) output of ``fitted.sample`` in x's dtype, computed step by step: the search's validation score.

  Each step is ``fitted_multistep``'s update (``_multistep_update``, compiled once per history length, the
  coefficients and times traced), given the denoiser output that ``denoise`` returns for (x_i, t_i) from a
  Python loop, so a remembering ``denoise`` (``_Remembered``) can serve the first steps candidates share.
  In x's dtype because that is what ``sample`` computes (float32 in practice): the float64 NumPy loop it
  replaced cost 1.9 s a candidate on a 32,768 x 225 validation batch, 6x its denoiser evaluations."""
  x = jnp.asarray(x)
  ts = jnp.asarray(fitted.ts, x.dtype)
  beta = jnp.asarray(fitted.beta, x.dtype)
  gamma = jnp.zeros(beta.shape[:1], x.dtype) if fitted.gamma is None else jnp.asarray(fitted.gamma, x.dtype)
  history = min(fitted.final.size + 1, len(fitted.ts))
  outs = []
  for i in range(ts.shape[0] - 1):
    outs.insert(0, _evaluated(denoise, x, ts[i]))
    x = _rollout_step(process, x, outs[0], tuple(outs[1:beta.shape[1] + 1]), beta[i], gamma[i], ts[i], ts[i + 1])
  outs.insert(0, _evaluated(denoise, x, ts[-1]))
  w = jnp.asarray(fitted.final_weights[:history], x.dtype)
  return w[0] * outs[0] + sum(w[j] * outs[j] for j in range(1, history))


_rollout_step = jax.jit(_multistep_update)  # the process is a pytree: a traced argument


def _evaluated(denoise, x, t) -> Array:
  """D(x, t) in x's dtype, checked finite."""
  return jnp.asarray(_checked(np.asarray(denoise(x, t)), float(t)), x.dtype)


class _Remembered:
  """``denoise`` that returns the stored output for an input it has seen (the same bytes at the same time).

  A greedy fit's first i steps depend only on the first i + 1 grid points, and the search's candidates
  differ from the best grid in one point: their fits and validation runs repeat the best grid's first
  evaluations on identical inputs. Keeps the ``size`` most recent outputs.
  """

  def __init__(self, denoise, size: int):
    self._denoise, self._size, self._outputs = denoise, size, {}
    self.calls = 0  # evaluations made (not remembered)

  def __call__(self, x, t):
    a = np.asarray(x)
    key = (hashlib.sha256(np.ascontiguousarray(a).view(np.uint8)).hexdigest(), a.shape, float(t))
    if key in self._outputs:
      out = self._outputs.pop(key)
    else:
      self.calls += 1
      out = np.asarray(self._denoise(x, t))
    self._outputs[key] = out  # most recently used last
    while len(self._outputs) > self._size:
      del self._outputs[next(iter(self._outputs))]
    return out


# ------------------------------------------------------------------------------------
# Grid search on a lattice of stored reference states.
# ------------------------------------------------------------------------------------
@dataclasses.dataclass
class SearchResult:
  """Result of ``search_grid``: the best fitted sampler, its lattice indices and the cost."""

  sampler: FittedSampler
  indices: list
  evaluations: int  # batched denoiser calls (each on the whole calibration batch)
  candidates: int
  seconds: float
  stopped_early: bool = False  # the search's deadline cut it short
  descents: int = 1  # starting grids descended from (``restarts``, or fewer when the deadline came first)


def search_grid(process: Process, denoise, x, lattice_ts, lattice_states, target, n_points: int, *,
                history: int = 3, free_ratio: bool = True, validation=None, validation_denoise=None, init=(),
                moves=(1, 2, 4, 8), max_sweeps: int = 6, restarts: int | None = 1,
                deadline: float | None = None) -> SearchResult:
  """Coordinate search of an N-point grid over lattice points, each candidate scored after ``fit_multistep``.

  Args:
    process, denoise, x, target, history, free_ratio: as in ``fit_multistep``; x is at lattice_ts[0].
    lattice_ts: (L,) process times, noise decreasing; lattice_ts[0] is the start and
      is always the first grid point.
    lattice_states: (L, B, ...) reference trajectory (x~ = x / alpha) at lattice_ts.
    n_points: N, grid points (N evaluations).
    validation: optional (x_val, target_val), a second calibration batch: candidates are
      then scored by the RMS error of the sampler fitted on (x, target) on this batch
      (which guards the search against fitting the few hardest samples of one batch);
      else by the fitting batch's own error.
    validation_denoise: the denoiser of the validation batch (default ``denoise``; a conditional
      model's validation samples have their own conditions).
    init: initial grids as lattice-index lists (each of length N, starting at 0); the
      best-scoring one starts the search. Default: N points evenly spaced in index.
    moves: index offsets tried for each interior/last point, both directions.
    max_sweeps: passes over the points (stops early when a pass improves nothing).
    restarts: how many of the ``init`` grids, best-scoring first, a search descends from (None: all);
      the best grid any descent reaches is returned. Descents from different starts end in different
      local minima (e.g. 5.1e-2 to 7.7e-2 from the seven ``calibration.starting_grids`` at NFE 10
      on a sharp 24-D mixture, where the best start's descent gave 5.8e-2).
    deadline: a ``time.time()`` after which no further candidate is tried (the starting grids are
      always scored); the result's ``stopped_early`` says whether it cut the search short.

  Returns:
    ``SearchResult`` (its sampler's ``calib_rmse`` is the score). A candidate costs at most N
    batched evaluations, twice with ``validation`` (computed by ``rollout``); evaluations on
    inputs an earlier candidate already had (the first steps of a grid that differs from the
    best one in a later point) are remembered, not repeated.
  """
  t0 = time.time()
  lattice_ts = np.asarray(lattice_ts, np.float64)
  lattice_states = np.asarray(lattice_states)
  size = lattice_ts.shape[0]
  if n_points < 2 or n_points > size:
    raise ValueError(f"need 2 <= n_points <= lattice size {size}, got {n_points}")
  cache = {}
  fit_denoise = _Remembered(denoise, 2 * n_points)
  if validation is not None:
    x_val, target_val = validation
    val_denoise = _Remembered(denoise if validation_denoise is None else validation_denoise, 2 * n_points)

  def score(idx):
    key = tuple(idx)
    if key not in cache:
      fitted = fit_multistep(process, fit_denoise, x, lattice_ts[list(idx)], lattice_states[list(idx)], target,
                             history, free_ratio)
      if validation is not None:
        fitted.calib_rmse = _rmse(rollout(process, fitted, val_denoise, x_val), target_val)
      cache[key] = fitted
    return cache[key].calib_rmse

  inits = [list(i) for i in init] or [list(np.round(np.linspace(0, size - 1, n_points)).astype(int))]
  for idx in inits:
    if len(idx) != n_points or idx[0] != 0 or any(b <= a for a, b in zip(idx, idx[1:], strict=False)):
      raise ValueError(f"bad initial lattice indices {idx}: need {n_points} increasing indices from 0")
  ranked = sorted(inits, key=score)

  def neighbours(at):
    """Each point of the grid ``at[0]`` moved by each move (``at[0]`` is read as each candidate is made)."""
    for pos in range(1, n_points):
      for move in moves:
        for sign in (1, -1):
          cand = list(at[0])
          cand[pos] += sign * move
          lo = cand[pos - 1] + 1
          hi = cand[pos + 1] - 1 if pos + 1 < n_points else size - 1
          if lo <= cand[pos] <= hi:
            yield cand

  def descend(start):
    """(the grid coordinate moves from ``start`` reach, whether the deadline stopped them)."""
    at = [start]
    for _ in range(max_sweeps):
      improved = False
      for cand in neighbours(at):
        if deadline is not None and time.time() > deadline:
          return at[0], True
        if score(cand) < score(at[0]):
          at[0], improved = cand, True
      if not improved:
        break
    return at[0], False

  best, descents = ranked[0], 0
  for start in ranked if restarts is None else ranked[:max(restarts, 1)]:
    reached, stopped = descend(start)
    descents += 1
    if score(reached) < score(best):
      best = reached
    if stopped:
      break
  evaluations = fit_denoise.calls + (val_denoise.calls if validation is not None else 0)
  return SearchResult(cache[tuple(best)], best, evaluations=evaluations, candidates=len(cache),
                      seconds=time.time() - t0, stopped_early=stopped, descents=descents)


def log_sigma_lattice(process: Process, size: int, t_start=None, t_end=None) -> Array:
  """(size,) process times uniform in log(sigma / alpha) from t_start (t_max) to t_end (t_min).

  Where t_start is pure noise (alpha = 0: log sigma / alpha is infinite), the lattice is t_start followed by
  size - 1 times uniform in log(sigma / alpha) from 1 / s(t_end) to s(t_end), s = sigma / alpha: a log-SNR
  range symmetric about 0 (rectified flow, t_min = 1e-3: s from 999 (t = 0.999) to 1 / 999).
  """
  t_start = process.t_max if t_start is None else t_start
  t_end = process.t_min if t_end is None else t_end
  u_end = jnp.log(process.edm_sigma(t_end))
  if noise_start(process, t_start):
    if float(u_end) >= 0.0:
      raise ValueError(f"t_end = {float(t_end):g} has sigma / alpha = {float(jnp.exp(u_end)):g} >= 1: a lattice from "
                       "pure noise needs an end with more signal than noise")
    u = jnp.linspace(-u_end, u_end, size - 1)
    return jnp.concatenate([jnp.asarray(t_start, u.dtype)[None], process.t_from_edm_sigma(jnp.exp(u))])
  u = jnp.linspace(jnp.log(process.edm_sigma(t_start)), u_end, size)
  return process.t_from_edm_sigma(jnp.exp(u))


def noise_start(process: Process, t) -> bool:
  """Whether the process is pure noise at the (concrete) time t: alpha(t) = 0, as rectified flow at t = 1."""
  return float(process.alpha(jnp.asarray(t, jnp.float32))) <= 0.0


def snap_to_lattice(lattice_ts, ts) -> list:
  """Lattice indices closest (in time) to the grid ts, made strictly increasing, first index 0."""
  lattice_ts = np.asarray(lattice_ts, np.float64)
  idx = [int(np.argmin(np.abs(lattice_ts - t))) for t in np.asarray(ts, np.float64)]
  idx[0] = 0
  for i in range(1, len(idx)):
    idx[i] = max(idx[i], idx[i - 1] + 1)
  if idx[-1] >= lattice_ts.shape[0]:
    raise ValueError("grid has more points than the lattice can hold after snapping")
  return idx


# ------------------------------------------------------------------------------------
# Joint refinement: Levenberg-Marquardt on the final error.
# ------------------------------------------------------------------------------------
def refine(process: Process, fitted: FittedSampler, denoise, x, target, *, cond=None, validation=None,
           validation_cond=None, iterations: int = 20, move_grid: bool = True, chunk: int = 1024,
           min_gain: float = 1e-3, deadline: float | None = None):
  """Refines a ``FittedSampler`` jointly: Levenberg-Marquardt on the residual sampler(x) - target.

  ``fit_multistep`` fits each step to the reference state at the next grid point (greedy, closed
  form); what matters is the error of the output. This minimizes mean((sampler(x) - target)^2) over
  all coefficients at once (beta, gamma, final weights) and, with ``move_grid``, the interior and
  last grid points (as softplus-parametrised log-sigma decrements, so the grid stays decreasing;
  the first point stays at ts[0], and from pure noise, where log sigma / alpha is infinite, the
  second too). The unknowns are few (P = N (H + 1) + N - 2 or so: 20-50), so each iteration forms
  the Gauss-Newton normal equations J^T J and J^T r exactly (J: the residual's P forward-mode
  derivatives, ``chunk`` samples at a time, summed in float64) and solves them damped,
  (J^T J + lambda diag(J^T J)) delta = -J^T r; a step that does not lower the fitting error is
  retried with 4x the damping (10 tries), an accepted one divides it by 3. Why not Adam (what this
  replaced): on a 225-D mixture at 5 evaluations, 7 iterations (71 s) took the validation RMSE from
  6.24e-2 to 4.28e-2 where 500 Adam steps (359 s) reached 4.80e-2 (benchmarks/README.md, session 24).
  Needs a denoiser JAX can differentiate forward (the analytic ones and networks).

  Args:
    process, fitted: the process and the starting sampler (its ts, beta, gamma, final).
    denoise: ``(x, t, cond) -> x0_hat``.
    x: (B, ...) start at ts[0]; target: (B, ...) reference clean samples; cond: pytree of (B, ...)
      conditions for ``denoise`` (or None).
    validation: optional (x_val, target_val), with ``validation_cond``: the iterate with the lowest
      RMSE on it (the start included) is returned, which guards against over-fitting the few
      hardest samples of the fitting batch; else the last iterate.
    iterations: at most this many accepted steps; stops earlier when a step lowers the fitting
      RMSE by less than ``min_gain`` (relative), when no damping gives a lower error, or at ``deadline``
      (a ``time.time()``; the iteration running then finishes).
    move_grid: also optimize the grid points.
    chunk: samples per Jacobian block (memory: P tangents of one chunk's sampler run).

  Returns:
    (FittedSampler, history): ``calib_rmse`` is the returned sampler's validation (or fitting)
    RMSE (the starting sampler itself when no iterate beats it); history lists (iteration, fitting RMSE,
    validation RMSE or nan), iteration 0 the start.
  """
  from jax.flatten_util import ravel_pytree

  ts0 = jnp.asarray(fitted.ts, jnp.float32)
  fixed = 2 if noise_start(process, ts0[0]) else 1  # the points that stay
  log_s0 = jnp.log(process.edm_sigma(ts0[fixed - 1:]))
  gamma0 = np.zeros(len(fitted.ts) - 1) if fitted.gamma is None else fitted.gamma
  params = {"beta": jnp.asarray(fitted.beta, jnp.float32), "gamma": jnp.asarray(gamma0, jnp.float32),
            "final": jnp.asarray(fitted.final, jnp.float32)}
  if move_grid:  # softplus^-1 of the log-sigma decrements between consecutive points
    params["drop"] = jnp.log(jnp.expm1(jnp.maximum(-jnp.diff(log_s0), 1e-6)))
  flat, unravel = ravel_pytree(params)
  history = min(fitted.final.size + 1, len(fitted.ts))
  rows, cols = np.indices(fitted.beta.shape)
  mask = jnp.asarray(cols < rows, jnp.float32)  # step i has i earlier outputs (the history starts zero-filled)

  def grid(p):
    if "drop" not in p:
      return ts0
    log_s = log_s0[0] - jnp.cumsum(jax.nn.softplus(p["drop"]))
    return jnp.concatenate([ts0[:fixed], process.t_from_edm_sigma(jnp.exp(log_s))])

  def residual(v, xb, tb, cb):
    p = unravel(v)
    w = jnp.concatenate([1.0 - jnp.sum(p["final"], keepdims=True), p["final"]])[:history]
    solver = final_estimate_solver(fitted_multistep(process, p["beta"] * mask, p["gamma"]), process, history, w)
    out = sample(solver, lambda xx, tt: denoise(xx, tt, cb), xb, grid(p).astype(xb.dtype), denoise_final=False)
    return (out.astype(jnp.float32) - tb).ravel()

  @jax.jit
  def normal_block(v, xb, tb, cb):
    """(J^T J, J^T r) of one block of samples."""
    r, jac = residual(v, xb, tb, cb), jax.jacfwd(residual)(v, xb, tb, cb)
    return jac.T @ jac, jac.T @ r

  squares = jax.jit(lambda v, xb, tb, cb: jnp.sum(residual(v, xb, tb, cb) ** 2))

  def blocks(xb, tb, cb):
    for lo in range(0, xb.shape[0], chunk):
      sl = slice(lo, lo + chunk)
      yield xb[sl], tb[sl], jax.tree.map(lambda a, sl=sl: a[sl], cb)

  def rmse(v, xb, tb, cb) -> float:
    total = sum(float(squares(v, *b)) for b in blocks(xb, tb, cb))
    return float(np.sqrt(total / np.prod(tb.shape)))

  target = jnp.asarray(target, jnp.float32)
  target_val = None if validation is None else jnp.asarray(validation[1], jnp.float32)  # once, not per iteration

  def validated(v, fit: float) -> tuple[float, float]:
    """(the validation RMSE or nan, the score that chooses the iterate: it, or the fitting RMSE without one)."""
    if validation is None:
      return float("nan"), fit
    val = rmse(v, validation[0], target_val, validation_cond)
    return val, val

  start, fit = flat, rmse(flat, x, target, cond)
  val, score = validated(flat, fit)
  log, best = [(0, fit, val)], (score, flat)
  damping = 1e-3
  for it in range(1, iterations + 1):
    if deadline is not None and time.time() > deadline and it > 1:
      break
    jtj, jtr = np.zeros((flat.size, flat.size)), np.zeros(flat.size)
    for b in blocks(x, target, cond):
      a, g = normal_block(flat, *b)
      jtj += np.asarray(a, np.float64)
      jtr += np.asarray(g, np.float64)
    diag = np.diag(jtj)
    free = diag > 0  # masked history coefficients have no derivative
    for _ in range(10):
      step = np.zeros(flat.size)
      lhs = jtj[np.ix_(free, free)] + damping * np.diag(diag[free])
      step[free] = np.linalg.solve(lhs, -jtr[free])
      trial = flat + jnp.asarray(step, flat.dtype)
      new = rmse(trial, x, target, cond)
      if np.isfinite(new) and new < fit:
        break
      damping *= 4.0
    else:
      break  # no damping lowers the error: a minimum (to float32 rounding)
    damping = max(damping / 3.0, 1e-9)  # (J^T J + damping diag) stays well conditioned
    gain, flat, fit = (fit - new) / fit, trial, new
    val, score = validated(flat, fit)
    log.append((it, fit, val))
    if score < best[0]:
      best = (score, flat)
    if gain < min_gain or (deadline is not None and time.time() > deadline):
      break
  if best[1] is start:  # no iterate beat the start: its exact coefficients (not their float32 round trip)
    return dataclasses.replace(fitted, calib_rmse=best[0]), log
  chosen = unravel(best[1])
  out = FittedSampler(np.asarray(grid(chosen), np.float64), np.asarray(chosen["beta"] * mask, np.float64),
                      np.asarray(chosen["final"], np.float64), np.asarray(chosen["gamma"], np.float64), best[0])
  return out, log
