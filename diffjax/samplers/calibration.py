"""Calibration of fitted samplers (``optimized_grids``) for one model: reference paths, fits, a keyed file.

``calibrate`` does what a calibration job needs for any denoiser ``(x, t, cond) -> x0_hat``
(a trained network with its guidance, an analytic model):

1. the probability-flow ODE from the calibration noise is solved by Dormand-Prince 5(4) (rtol = atol
   = ``tol``; ``adaptive.odeint_through``, ``dopri5``'s variables) through a lattice of noise levels
   (uniform in log sigma), its steps shortened to land on each (from pure noise, as rectified flow's t = 1,
   the first segment in y = x / sigma against q = alpha / sigma, where the ODE is dy/dq = D and starts finite),
   ``chunk`` samples at a time, and only the states at the lattice are kept (float32, (L, B, ...));
   the clean target is the denoiser's output at the last lattice point (what every sampler's
   final jump returns). The reference's own error is measured by solving the first ``check``
   samples again at ``tol / 10``;
2. for each budget k (grid points = denoiser evaluations), ``search_grid`` picks k lattice
   points and fits the multistep and final coefficients on the fitting batch, scoring each
   candidate on a second, validation batch (``starting_grids`` seed the search); optionally
   (``refine_iterations``) the searched sampler is then refined jointly by Levenberg-Marquardt on
   the final error (``optimized_grids.refine``), the iterate best on the validation batch kept;
3. the record is written to ``path`` after the reference and after every budget (atomically),
   with the reference states beside it (``path + '.reference.npz'``): a killed calibration
   restarts where it stopped. The record's ``key`` (the model's fingerprint, process,
   guidance scale, ...: whatever the caller names) must match for a restart and for
   ``load_fitted``, which refuses a mismatch with one line saying which field differs.
"""

from __future__ import annotations

import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from diffjax.convert.files import write_atomically, write_json
from diffjax.processes import Process
from diffjax.samplers import grids
from diffjax.samplers import optimized_grids as og
from diffjax.samplers.adaptive import flow_field, odeint_through

FORMAT = 1
FITTED = "fitted"  # the name of a calibrated sampler (configs' sampler.name, a Plan's name)
KARRAS_RHO = (3.0, 5.0, 7.0, 10.0)  # Karras grids that seed the search, with uniform log-SNR and uniform t
SEARCH_SHARE = 0.7  # of a budget's time share when the refinement follows its search (the refinement has the rest)


def uniform_t_short(process: Process, k: int):
  """k of k + 1 points uniform in t from t_max, the last (t_min) dropped: where a k-step sampler on diffusers'
  "linspace" timestep spacing evaluates the denoiser (its last evaluation one step above t_min; the final
  estimate is that evaluation's output)."""
  return grids.uniform_t(process, k + 1)[:-1]


class CalibrationError(ValueError):
  """A calibration file that is unreadable or made for another model, process, guidance scale or budget."""


def starting_grids(process: Process, lattice_ts, k: int) -> list[list[int]]:
  """Initial k-point grids of the search as lattice indices: Karras (each rho in ``KARRAS_RHO``), uniform
  log-SNR, uniform t and ``uniform_t_short``, snapped to the lattice (duplicates dropped).

  The last start is there because on mixtures with sharp modes diffusers' samplers on their "linspace"
  spacing beat every sampler on the other grids, and the search, moving one point at a time, did not find
  such a grid from them (benchmarks/README.md, the unseen-mixture table)."""
  # log-SNR spaced grids cannot start at pure noise: there they start at the lattice's first finite level, after it
  top = float(lattice_ts[1]) if og.noise_start(process, lattice_ts[0]) else None
  s_top = None if top is None else float(process.edm_sigma(top))
  spaced = [functools.partial(grids.karras, rho=rho, sigma_max=s_top) for rho in KARRAS_RHO]
  spaced.append(functools.partial(grids.log_snr_uniform, t_start=top))
  if top is not None:
    spaced = [_after_noise(make, float(lattice_ts[0])) for make in spaced]
  starts = []
  for make in spaced + [grids.uniform_t, uniform_t_short]:
    idx = og.snap_to_lattice(lattice_ts, make(process, k))
    if idx not in starts:
      starts.append(idx)
  return starts


def _after_noise(make, t_noise: float):
  """``make``'s grid of k - 1 points after the pure-noise start t_noise: (process, k) -> k points."""
  return lambda process, k: np.concatenate([[t_noise], np.asarray(make(process, k - 1), np.float64)])


def share_of_time(end: float, k: int, remaining) -> float:
  """The deadline (a ``time.time()``) of budget ``k``'s turn: its share, in proportion to k, of the time from now
  to ``end`` among the ``remaining`` budgets (k included)."""
  now = time.time()
  return now + max(end - now, 0.0) * k / sum(remaining)


def reference_paths(process: Process, denoise, x, cond, lattice_ts, *, tol: float, chunk: int,
                    keep_states: bool = True, progress: bool = False) -> tuple[np.ndarray | None, np.ndarray, int]:
  """(states (L, B, ...) in x~ = x / alpha, target (B, ...), evaluations) of the probability-flow ODE from x.

  x (B, ...) is at lattice_ts[0]; cond is a pytree of (B, ...) arrays (or None) handed to
  ``denoise(x, t, cond)``; the ODE is solved ``chunk`` samples at a time (a chunk shares
  dopri5's step sizes). Evaluations count batched denoiser calls of one chunk each.
  ``keep_states=False``: the target alone (states None). From pure noise (alpha(lattice_ts[0]) = 0)
  states[0] is x / sigma, the start in the variables of the first segment (``noise_segment``).
  """
  ts = jnp.asarray(lattice_ts, jnp.float32)
  us = jnp.log(process.edm_sigma(ts))
  from_noise = og.noise_start(process, lattice_ts[0])

  @jax.jit
  def run(xc, cc):
    d = lambda x, t: denoise(x, t, cc)
    if from_noise:
      first = xc / process.sigma(ts[0])
      x0s, nfe = noise_segment(process, d, first, ts[1], tol)
      path, stats = odeint_through(flow_field(process, d), x0s, us[1:], rtol=tol, atol=tol)
      path, nfe = jnp.concatenate([x0s[None], path]), nfe + stats.nfe
    else:
      first = xc / process.alpha(ts[0])
      path, stats = odeint_through(flow_field(process, d), first, us, rtol=tol, atol=tol)
      nfe = stats.nfe
    states = jnp.concatenate([first[None], path]) if keep_states else jnp.zeros(())
    return states, d(process.alpha(ts[-1]) * path[-1], ts[-1]), nfe + 1

  b = x.shape[0]
  states, targets, evaluations = [], [], 0
  for lo in tqdm.trange(0, b, chunk, desc="reference paths", unit="chunk", disable=not progress, leave=False):
    sl = slice(lo, min(lo + chunk, b))
    s, t, nfe = run(x[sl], jax.tree.map(lambda a, sl=sl: a[sl], cond))
    if not (np.all(np.isfinite(np.asarray(s))) and np.all(np.isfinite(np.asarray(t)))):
      raise FloatingPointError(f"the reference solve of samples {sl.start}..{sl.stop - 1} is not finite (dopri5 "
                               f"did not reach the end at tol {tol}, or the denoiser returned NaN)")
    if keep_states:
      states.append(np.asarray(s, np.float32))
    targets.append(np.asarray(t, np.float32))
    evaluations += int(nfe)
  return np.concatenate(states, axis=1) if keep_states else None, np.concatenate(targets), evaluations


def noise_segment(process: Process, denoise, y, t_end, tol: float):
  """(x~ = x / alpha at t_end, evaluations) of the probability-flow ODE from pure noise x = sigma y (alpha = 0).

  In y = x / sigma and q = alpha / sigma (so x~ = y / q, s = 1 / q) the ODE dx~/ds = (x~ - D) / s becomes
  dy/dq = D(sigma y, t(q)): finite at q = 0, where x~ and log s are not. Dormand-Prince from q = 0 to
  q(t_end) = 1 / s(t_end), at rtol = atol = ``tol``.
  """
  def field(q, y):
    t = process.t_from_log_snr(2.0 * jnp.log(q))  # q = 0: log-SNR -inf, the process's pure-noise time
    return denoise(process.sigma(t) * y, t)

  q_end = 1.0 / process.edm_sigma(t_end)
  ys, stats = odeint_through(field, y, jnp.stack([jnp.zeros_like(q_end), q_end]), rtol=tol, atol=tol)
  return ys[-1] / q_end, stats.nfe


def _write_json(path: str, record: dict) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  write_json(path, record, indent=1)


def read_record(path: str) -> dict:
  """The calibration record in ``path`` (ValueError naming the file when it is not one)."""
  try:
    with open(path, encoding="utf-8") as f:
      record = json.load(f)
  except FileNotFoundError:
    raise FileNotFoundError(f"{path}: no such calibration file (make one with --mode=calibrate)") from None
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CalibrationError(f"{path}: not a calibration file ({e})") from None
  if not isinstance(record, dict) or record.get("format") != FORMAT or not isinstance(record.get("samplers"), dict):
    raise CalibrationError(f"{path}: not a calibration file of format {FORMAT}")
  return record


def _as_stored(key: dict) -> dict:
  return json.loads(json.dumps(key))  # what a file holds (tuples become lists)


def _mismatch(path: str, record_key: dict, key: dict) -> str | None:
  key = _as_stored(key)
  for field in sorted(set(key) | set(record_key)):
    if record_key.get(field) != key.get(field):
      return (f"{path}: calibrated for {field} = {record_key.get(field)!r}, this run has {key.get(field)!r}; "
              f"calibrate for it (--mode=calibrate)")
  return None


def load_fitted(path: str, key: dict, nfe: int) -> og.FittedSampler:
  """The fitted sampler for ``nfe`` evaluations from a calibration file made under the same ``key``.

  ``CalibrationError`` (one line naming the file) when the key differs in any field or no fit of that
  budget exists.
  """
  record = read_record(path)
  message = _mismatch(path, record.get("key", {}), key)
  if message:
    raise CalibrationError(message)
  entry = record["samplers"].get(str(nfe))
  if entry is None:
    fitted = ", ".join(sorted(record["samplers"], key=int)) or "none"
    raise CalibrationError(f"{path}: no fitted sampler for {nfe} evaluations (fitted: {fitted}); calibrate that budget")
  return og.FittedSampler.from_dict(entry)


def _reference_error(process, denoise, x, cond, lattice_ts, states, target, tol: float, n: int) -> dict:
  """RMS differences of the first n samples' target and lattice states (worst point) solved again at tol / 10."""
  first = jax.tree.map(lambda a: a[:n], cond)
  tight_states, tight_target, _ = reference_paths(process, denoise, x[:n], first, lattice_ts, tol=tol / 10, chunk=n)
  error = np.sqrt(np.mean((tight_target.astype(np.float64) - target[:n]) ** 2))
  path_error = np.sqrt(np.max(np.mean((tight_states.astype(np.float64) - states[:, :n]) ** 2,
                                      axis=tuple(range(1, states.ndim)))))
  return {"target_error_rms": float(error), "path_error_rms": float(path_error), "checked": n}


def calibrate(process: Process, denoise, x_fit, x_val, budgets, *, key: dict, path: str | None, cond_fit=None,
              cond_val=None, lattice: int = 64, history: int = 3, tol: float = 1e-5, chunk: int = 256, check: int = 64,
              reference=None, moves=(1, 2, 4), max_sweeps: int = 6, restarts: int | None = 1,
              refine_iterations: int = 0, time_budget_s: float | None = None,
              progress: bool = True, log=print) -> dict:
  """Fits a sampler for every budget in ``budgets`` and writes the record to ``path`` (module docstring).

  Args:
    process: the model's process; the calibration starts at ``process.t_max``.
    denoise: ``(x, t, cond) -> x0_hat`` in the process's coordinates (guidance included, as sampled).
    x_fit, x_val: (B, ...) and (B', ...) standard normal noise (other seeds than any evaluation);
      the initial states are ``process.prior_std`` times them, as ``sample`` starts.
    budgets: denoiser evaluations per sample to fit for (each in [2, lattice]).
    key: JSON-able dict that names what the calibration is valid for (e.g. the model's
      fingerprint, process, guidance scale); checked on restart and by ``load_fitted``.
    path: the JSON record; ``path + '.reference.npz'`` keeps the reference states. None: nothing
      is written (and nothing resumed).
    cond_fit, cond_val: pytrees of (B, ...) / (B', ...) conditions for ``denoise`` (or None).
    lattice: noise levels, uniform in log sigma, where reference states are kept (grid points
      are chosen among them); history: denoiser outputs combined per step; tol: dopri5's.
    chunk: samples per reference solve (memory: one chunk's states at the lattice).
    check: samples whose reference is solved again at ``tol / 10`` to measure its error.
    reference: ``(x, cond, keep_states) -> (states (L, B, ...) or None, target (B, ...), evaluations)``
      in place of the Dormand-Prince solve (``reference_paths``' contract, x at the lattice's first
      time), e.g. for a model whose flow is known in closed form; its error is not measured.
    moves, max_sweeps, restarts: the grid search's (``optimized_grids.search_grid``; ``restarts``: how many
      of the ``starting_grids``, best first, a search descends from, None: all; with ``time_budget_s``, as
      many as the budget's share allows).
    refine_iterations: > 0: each searched sampler is then refined jointly (coefficients and grid) by at most
      this many Levenberg-Marquardt iterations on the fitting batch's final error, the iterate best on the
      validation batch kept (``optimized_grids.refine``, ``chunk`` samples per Jacobian block). An
      iteration runs the sampler on the fitting batch with P forward-mode tangents (P: its unknowns, about
      3-5 per evaluation), once more per damping tried, and once on the validation batch.
    time_budget_s: wall-clock seconds for this call: what the reference paths leave is shared among
      the budgets still to fit in proportion to k (each search stops at its share's end, keeping the
      best grid found; its entry says ``stopped_early``; with ``refine_iterations`` the search has
      ``SEARCH_SHARE`` of the share and the refinement the rest). None: every search runs to its end.

  Returns:
    The record: ``key``, ``lattice`` (times), ``reference`` (tol, error, evaluations, seconds)
    and ``samplers`` {str(k): FittedSampler fields + search cost}.
  """
  t_start = time.time()
  key = _as_stored(key)
  budgets = sorted({int(k) for k in budgets})
  bad = [k for k in budgets if not 2 <= k <= lattice]
  if bad:
    raise ValueError(f"budgets {bad} are outside [2, {lattice}] (the lattice size)")
  lattice_ts = np.asarray(og.log_sigma_lattice(process, lattice), np.float64)
  if path is not None and os.path.exists(path):
    record = read_record(path)
    message = _mismatch(path, record.get("key", {}), key)
    if message or record.get("lattice") != lattice_ts.tolist() or record.get("history") != history:
      raise CalibrationError((message or f"{path}: made with another lattice or history") + "; or remove the file")
    log(f"resuming the calibration in {path}: fitted {sorted(record['samplers'], key=int) or 'none'}")
  else:
    record = {"format": FORMAT, "key": key, "lattice": lattice_ts.tolist(), "history": history, "samplers": {}}
    if path is not None:  # before the reference solve: a place that cannot be written fails now, not minutes later
      _write_json(path, record)
  x_fit, x_val = (process.prior_std * jnp.asarray(x, jnp.float32) for x in (x_fit, x_val))
  ref_file = None if path is None else path + ".reference.npz"
  if "reference" in record and os.path.isfile(ref_file):
    with np.load(ref_file) as z:
      states, target, target_val = z["states"], z["target"], z["target_val"]
  else:
    t0 = time.time()
    solve = reference or functools.partial(reference_paths, process, denoise, lattice_ts=lattice_ts, tol=tol,
                                           chunk=chunk, progress=progress)
    states, target, nfe_fit = solve(x_fit, cond_fit, keep_states=True)
    _, target_val, nfe_val = solve(x_val, cond_val, keep_states=False)
    record["reference"] = {"solver": "given" if reference else "dopri5", "tol": None if reference else tol,
                           "evaluations": nfe_fit + nfe_val, "fit_batch": int(x_fit.shape[0]),
                           "validation_batch": int(x_val.shape[0])}
    if reference is None:
      record["reference"].update(_reference_error(process, denoise, x_fit, cond_fit, lattice_ts, states, target, tol,
                                                  min(check, x_fit.shape[0])))
    record["reference"]["seconds"] = time.time() - t0
    log(f"reference paths: {record['reference']['seconds']:.0f} s, {nfe_fit + nfe_val} batched evaluations"
        + ("" if reference else f"; error vs tol/10: target {record['reference']['target_error_rms']:.2e}, path "
           f"{record['reference']['path_error_rms']:.2e} (RMS)"))
    if path is not None:
      write_atomically(ref_file, lambda tmp: np.savez(tmp, states=states, target=target, target_val=target_val),
                       suffix=".npz")
      _write_json(path, record)
  fit_denoise = jax.jit(lambda x, t: denoise(x, t, cond_fit))
  val_denoise = jax.jit(lambda x, t: denoise(x, t, cond_val))
  todo = [k for k in budgets if str(k) not in record["samplers"]]
  for i, k in enumerate(tqdm.tqdm(todo, desc="fitting budgets", unit="budget", disable=not progress)):
    deadline = search_deadline = None
    if time_budget_s is not None:
      deadline = share_of_time(t_start + time_budget_s, k, todo[i:])
      search_deadline = time.time() + (SEARCH_SHARE if refine_iterations > 0 else 1.0) * (deadline - time.time())
    res = og.search_grid(process, fit_denoise, x_fit, lattice_ts, states, target, k, history=min(history, k),
                         validation=(x_val, jnp.asarray(target_val)), validation_denoise=val_denoise,
                         init=starting_grids(process, lattice_ts, k), moves=moves, max_sweeps=max_sweeps,
                         restarts=restarts, deadline=search_deadline)
    fitted, entry = res.sampler, {"indices": res.indices, "candidates": res.candidates, "evaluations": res.evaluations,
                                  "seconds": res.seconds, "stopped_early": res.stopped_early, "descents": res.descents}
    note = ""
    if refine_iterations > 0:
      t0 = time.time()
      fitted, trace = og.refine(process, fitted, denoise, x_fit, target, cond=cond_fit, validation=(x_val, target_val),
                                validation_cond=cond_val, iterations=refine_iterations, chunk=chunk, deadline=deadline)
      entry |= {"searched_rmse": res.sampler.calib_rmse, "refine_iterations": trace[-1][0],
                "refine_seconds": time.time() - t0}
      note = f", refined to {fitted.calib_rmse:.3e} in {trace[-1][0]} iterations ({entry['refine_seconds']:.0f} s)"
    record["samplers"][str(k)] = fitted.to_dict() | entry
    if path is not None:
      _write_json(path, record)
    log(f"NFE {k}: validation RMSE {res.sampler.calib_rmse:.3e} ({res.candidates} candidate grids, "
        f"{res.descents} descent{'s' if res.descents > 1 else ''}, "
        f"{res.seconds:.0f} s{', stopped by the time budget' if res.stopped_early else ''}){note}")
  return record
