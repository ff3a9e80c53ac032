"""A diffusers ``scheduler_config.json`` as diffjax's four pieces: process, solver, grid, target.

diffusers fuses the noise schedule, the time discretisation and the update rule into
one stateful scheduler object. Here a scheduler config becomes a ``DiscreteVP`` (the
betas), the prediction target, and for ``num_steps`` a ``Plan``: a diffjax solver, the
grid of process times it visits (DiscreteVP times are diffusers' timesteps), whether
the run ends with the jump to sigma = 0, and the scale of the initial noise. Running
``samplers.sample`` on the plan gives what the scheduler's denoising loop gives (tests:
``tests/test_pipelines_parity.py``).

Supported: ``DDIMScheduler`` (eta = 0), ``PNDMScheduler`` (PLMS, ``skip_prk_steps``),
``EulerDiscreteScheduler`` and ``DPMSolverMultistepScheduler`` (dpmsolver++, orders 2
and 3), with "leading", "trailing" and "linspace" spacing; and SD3's / Flux's
``FlowMatchEulerDiscreteScheduler`` (a ``RectifiedFlow`` without shift whose times are the
scheduler's shifted sigmas, the velocity target, Euler; static or dynamic shift). (Karras sigmas are not mapped:
diffusers then feeds the network rounded timesteps at unrounded noise levels, which a
process time cannot express; use a diffjax grid instead.) Any diffjax solver and grid
runs on the same process with ``Plan.native``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np

from diffjax.processes import DiscreteVP, Process, RectifiedFlow, resolution_mu
from diffjax.samplers import SOLVERS, Solver, grids, make_solver, points_for_budget, start_problem

PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
FLOW_MATCH = "FlowMatchEulerDiscreteScheduler"
SCHEDULERS = ("DDIMScheduler", "PNDMScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler", FLOW_MATCH)


@dataclasses.dataclass(frozen=True)
class Plan:
  """How one sampling run goes: ``samplers.sample(solver, denoise, x, ts, denoise_final=...)``.

  Attributes:
    solver: the diffjax solver.
    ts: (N,) float64 process times, noise decreasing.
    denoise_final: end with the jump D(x, ts[-1]) to sigma = 0 (else the state at ts[-1]).
    init_scale: the initial state is ``init_scale * noise``, noise ~ N(0, I), in the
      process's coordinates at ts[0].
    name, options: the solver's name and factory options (the record of a run; runs with
      equal names and options share one compiled program).
  """

  solver: Solver
  ts: np.ndarray
  denoise_final: bool
  init_scale: float
  name: str
  options: tuple = ()

  @property
  def custom_solver(self) -> Solver | None:
    """The solver when ``name`` and ``options`` cannot rebuild it (a fitted sampler: its coefficients are
    data), else None. Task programs are cached by name and options and built with this solver when set."""
    return None if self.name in SOLVERS else self.solver

  def record(self) -> dict:
    """JSON-ready description: solver, options, grid, final jump, initial scale."""
    return {"solver": self.name, "options": dict(self.options), "ts": [float(t) for t in self.ts],
            "denoise_final": self.denoise_final, "init_scale": self.init_scale}

  @classmethod
  def native(cls, process: Process, name: str, nfe: int, grid: str = "karras", **options) -> Plan:
    """A diffjax solver by name on a diffjax grid within ``nfe`` evaluations, from the prior."""
    if grid not in grids.GRIDS:
      raise ValueError(f"unknown grid {grid!r}; available: {sorted(grids.GRIDS)}")
    solver = make_solver(name, process, **options)
    ts = np.asarray(grids.GRIDS[grid](process, points_for_budget(solver, nfe)), np.float64)
    problem = start_problem(name, process, ts[0])
    if problem:
      raise ValueError(problem)
    return cls(solver, ts, True, float(process.prior_std), name, tuple(sorted(options.items())))


def discrete_process(config: Mapping) -> DiscreteVP:
  """The ``DiscreteVP`` of a diffusers scheduler config's betas (``trained_betas``, else ``beta_schedule``)."""
  if config.get("trained_betas") is not None:
    return DiscreteVP.from_betas(config["trained_betas"])
  return DiscreteVP.from_schedule(config.get("beta_schedule", "linear"), int(config.get("num_train_timesteps", 1000)),
                                  float(config.get("beta_start", 0.0001)), float(config.get("beta_end", 0.02)))


@dataclasses.dataclass(frozen=True)
class DiffusersScheduler:
  """A diffusers scheduler config, read once (``from_config``); ``plan(num_steps)`` per run."""

  class_name: str
  process: DiscreteVP | RectifiedFlow
  target: str
  spacing: str
  steps_offset: int
  set_alpha_to_one: bool
  solver_order: int
  shift: float = 1.0  # flow matching: the static time shift
  dynamic_shift: bool = False  # flow matching: the shift exp(mu) comes with each run (Flux)
  train_timesteps: int = 1000  # flow matching: the network's time is sigma * this
  # flow matching with a dynamic shift: mu linear in the image's tokens, base_shift at base_seq_len tokens,
  # max_shift at max_seq_len (diffusers' calculate_shift, with the config's values)
  shift_range: tuple[float, float, int, int] = (0.5, 1.15, 256, 4096)

  @classmethod
  def from_config(cls, config: Mapping, where: str = "scheduler config") -> DiffusersScheduler:
    """From the dict of a ``scheduler_config.json`` (``where`` names it in errors)."""
    name = config.get("_class_name")
    if name not in SCHEDULERS:
      raise NotImplementedError(
          f"{where}: scheduler {name!r} is not mapped to diffjax (supported: {', '.join(SCHEDULERS)}); "
          f"choose any diffjax solver instead (e.g. sampler='dpmpp_2m')")
    if name == FLOW_MATCH:
      return cls._flow_match(config, where)
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES:
      raise ValueError(f"{where}: prediction_type {prediction!r} is not one of {sorted(PREDICTION_TYPES)}")
    process = discrete_process(config)
    unsupported = {
        "clip_sample": bool(config.get("clip_sample", False)) and name == "DDIMScheduler",
        "thresholding": bool(config.get("thresholding", False)),
        "rescale_betas_zero_snr": bool(config.get("rescale_betas_zero_snr", False)),
        "skip_prk_steps=false": name == "PNDMScheduler" and not config.get("skip_prk_steps", False),
        "algorithm_type": name == "DPMSolverMultistepScheduler"
                          and config.get("algorithm_type", "dpmsolver++") != "dpmsolver++",
        "solver_type": name == "DPMSolverMultistepScheduler" and config.get("solver_type", "midpoint") != "midpoint",
        "use_exponential_sigmas/use_beta_sigmas": bool(config.get("use_exponential_sigmas") or
                                                       config.get("use_beta_sigmas")),
        "set_alpha_to_one=true": name == "PNDMScheduler" and bool(config.get("set_alpha_to_one", False)),
        "final_sigmas_type": config.get("final_sigmas_type", "zero") != "zero",
        "use_karras_sigmas": bool(config.get("use_karras_sigmas", False)),
    }
    bad = [k for k, v in unsupported.items() if v]
    if bad:
      raise NotImplementedError(f"{where}: {name} with {', '.join(bad)} is not mapped to diffjax")
    spacing = config.get("timestep_spacing", "leading" if name in ("DDIMScheduler", "PNDMScheduler") else "linspace")
    if spacing not in ("leading", "trailing", "linspace"):
      raise ValueError(f"{where}: timestep_spacing {spacing!r} is not one of leading, trailing, linspace")
    return cls(name, process, PREDICTION_TYPES[prediction], spacing, int(config.get("steps_offset", 0)),
               bool(config.get("set_alpha_to_one", True)), int(config.get("solver_order", 2)))

  @classmethod
  def _flow_match(cls, config: Mapping, where: str) -> DiffusersScheduler:
    unsupported = {k: config.get(k) for k in ("invert_sigmas", "shift_terminal", "use_karras_sigmas",
                                              "use_exponential_sigmas", "use_beta_sigmas", "stochastic_sampling")
                   if config.get(k)}
    if config.get("time_shift_type", "exponential") != "exponential":
      unsupported["time_shift_type"] = config["time_shift_type"]
    if unsupported:
      raise NotImplementedError(f"{where}: {FLOW_MATCH} with {unsupported} is not mapped to diffjax")
    shift_range = (float(config.get("base_shift", 0.5)), float(config.get("max_shift", 1.15)),
                   int(config.get("base_image_seq_len", 256)), int(config.get("max_image_seq_len", 4096)))
    return cls(FLOW_MATCH, RectifiedFlow(), "velocity", "linspace", 0, True, 1,
               float(config.get("shift", 1.0)), bool(config.get("use_dynamic_shifting", False)),
               int(config.get("num_train_timesteps", 1000)), shift_range)

  def mu_for(self, image_tokens: int) -> float:
    """The dynamic shift's mu for an image of ``image_tokens`` transformer tokens (``processes.resolution_mu``
    with the config's values)."""
    base_shift, max_shift, base_len, max_len = self.shift_range
    return resolution_mu(image_tokens, base_len, max_len, base_shift, max_shift)

  @property
  def num_train_timesteps(self) -> int:
    return self.train_timesteps if self.class_name == FLOW_MATCH else self.process.num_train_timesteps

  @property
  def time_scale(self) -> float:
    """The network's time over the process time (a pipeline's ``time_scale``): flow matching's networks see
    sigma * num_train_timesteps (float32, as diffusers multiplies it), the VP schedulers' the timestep itself."""
    return float(self.train_timesteps) if self.class_name == FLOW_MATCH else 1.0

  def flow_sigmas(self, num_steps: int, *, mu: float | None = None, sigmas=None) -> np.ndarray:
    """The flow-matching scheduler's N sigmas (float32 values, as float64), without the final 0.

    As ``set_timesteps(num_steps, sigmas=sigmas, mu=mu)``: without ``sigmas``, N points from the
    largest to the smallest of its training sigmas (those already shifted, with a static shift) are
    spaced linearly and shifted, by ``shift`` or, with dynamic shifting, by exp(``mu``) (Flux's
    pipeline passes sigmas linspace(1, 1 / N, N) and mu from the image's token count).
    """
    if self.dynamic_shift and mu is None:
      raise ValueError("this flow-matching scheduler shifts dynamically: pass mu (e.g. from the token count)")
    t_total, shift = self.train_timesteps, float(self.shift)
    # The arithmetic keeps diffusers' dtypes (NumPy 2 keeps a float32 array float32 against Python floats):
    # its training sigmas in float32, a grid it spaces itself in float64, sigmas it is given in float32.
    if sigmas is None:
      train = np.linspace(1, t_total, t_total, dtype=np.float32)[::-1] / np.float32(t_total)
      if not self.dynamic_shift:
        train = shift * train / (1.0 + (shift - 1.0) * train)
      grid = np.linspace(float(train[0]) * t_total, float(train[-1]) * t_total, num_steps) / t_total
    else:
      grid = np.asarray(sigmas, np.float32)
    if self.dynamic_shift:
      grid = math.exp(mu) / (math.exp(mu) + (1.0 / grid - 1.0))
    else:
      grid = shift * grid / (1.0 + (shift - 1.0) * grid)
    return grid.astype(np.float32).astype(np.float64)

  def plan(self, num_steps: int, *, mu: float | None = None, sigmas=None) -> Plan:
    """The diffjax equivalent of ``scheduler.set_timesteps(num_steps)`` and its denoising loop
    (``mu``, ``sigmas``: the flow-matching scheduler's, ``flow_sigmas``)."""
    if num_steps < 1:
      raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if self.class_name == FLOW_MATCH:
      # Euler on x = (1 - sigma) x0 + sigma eps is x + (sigma' - sigma) v: diffjax's euler (DDIM) step; the last
      # step, to sigma = 0, is the jump to the denoised x0 = x - sigma v. The start is pure noise (sigma = 1).
      ts = self.flow_sigmas(num_steps, mu=mu, sigmas=sigmas)
      return Plan(make_solver("euler", self.process), ts, True, 1.0, "euler")
    if mu is not None or sigmas is not None:
      raise ValueError(f"{self.class_name} takes no mu or sigmas")
    t_total, p = self.num_train_timesteps, self.process
    if self.class_name in ("DDIMScheduler", "PNDMScheduler"):
      ts = grids.ddim_timesteps(t_total, num_steps, self.spacing, self.steps_offset)
      # Both step from t to t - T // N (the final alpha below 0): the next timestep for leading/trailing spacing.
      if num_steps > 1 and not np.all(ts[:-1] - ts[1:] == t_total // num_steps):
        raise NotImplementedError(
            f"{self.class_name} with {self.spacing!r} spacing and {num_steps} steps steps to t - T // N, which is "
            f"not its next timestep (the network would see other times than the noise levels): use 'leading' "
            f"spacing, or a number of steps that divides {t_total}")
      name = "ddim" if self.class_name == "DDIMScheduler" else "pndm"
      # diffusers' PLMS combines the network's raw outputs: v itself under v-prediction (ode.pndm's combine="v").
      options = (("combine", "v"),) if name == "pndm" and self.target == "v" else ()
      solver = make_solver(name, p, **dict(options))
      if self.set_alpha_to_one:  # the last step lands on alpha_bar = 1: DDIM's is the jump D(x, t_last)
        return Plan(solver, ts, True, 1.0, name, options)
      # The last step lands on alpha_bar_0 (t = 0), without the jump to sigma = 0.
      ts = ts if ts[-1] == 0 else np.concatenate([ts, [0.0]])
      return Plan(solver, ts, False, 1.0, name, options)
    if self.class_name == "EulerDiscreteScheduler":
      ts = self._sigma_grid(num_steps, num_steps)
      # init_noise_sigma (in x / alpha; its largest sigma, interpolated linearly) times alpha(t0)
      sigmas = np.exp(np.asarray(p.log_edm_sigmas, np.float64))
      s_max = float(np.interp(ts[0], np.arange(t_total), sigmas))
      init = s_max if self.spacing in ("linspace", "trailing") else float(np.sqrt(s_max**2 + 1))
      return Plan(make_solver("euler", p), ts, True, init * float(p.alpha(jnp.float32(ts[0]))), "euler")
    # DPMSolverMultistepScheduler: N of N + 1 points (leading/linspace), the final sigma 0 as the jump.
    order = self.solver_order
    if order not in (2, 3):
      raise NotImplementedError(f"DPMSolverMultistepScheduler with solver_order={order}: diffjax maps orders 2 and 3")
    ts = self._sigma_grid(num_steps, num_steps + 1)
    name = f"dpmpp_{order}m"
    options = (("lower_order_final", order == 2 or num_steps < 15),)
    return Plan(make_solver(name, p, **dict(options)), ts, True, 1.0, name, options)

  def _sigma_grid(self, num_steps: int, points: int) -> np.ndarray:
    """Timesteps of the Euler / DPM-Solver schedulers (float64), as process times."""
    t_total = self.num_train_timesteps
    if self.spacing == "trailing":
      return grids.ddim_timesteps(t_total, num_steps, "trailing")
    if self.spacing == "leading":
      ratio = t_total // points
      return (np.arange(points) * ratio).round()[::-1][:num_steps].astype(np.float64) + self.steps_offset
    # Euler: fractional timesteps (float32, as diffusers keeps them). Between integer timesteps
    # diffusers interpolates sigma linearly, the DiscreteVP log sigma: the noise levels differ
    # there by a relative 1e-3 or less, so "linspace" Euler is close to diffusers', not equal.
    if points == num_steps:
      return np.linspace(0, t_total - 1, num_steps, dtype=np.float32)[::-1].astype(np.float64)
    return np.linspace(0, t_total - 1, points).round()[::-1][:num_steps]
