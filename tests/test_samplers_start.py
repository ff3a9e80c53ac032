"""Which solvers can start where a process is pure noise (rectified flow at t = 1, alpha = 0).

``samplers.NEED_SIGNAL_AT_START`` names the solvers that step in x / alpha: this runs every fixed-step solver on
rectified flow from t = 1 with an exact Gaussian denoiser and checks that exactly those come out non-finite, and
that plans and training configs refuse them (and log-SNR / Karras grids) there with one line.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import shapes_mmdit
from diffjax import processes, samplers, schema
from diffjax.pipelines import Plan
from diffjax.samplers import grids
from diffjax.samplers.adaptive import ADAPTIVE_SOLVERS

FLOW = processes.make_process("rectified_flow")
VAR = 0.25  # data ~ N(0, VAR I): the exact denoiser is linear


def _denoise(x, t):
  a, s = FLOW.alpha(t), FLOW.sigma(t)
  return a * VAR / (a * a * VAR + s * s) * x


def test_exactly_the_listed_solvers_fail_from_pure_noise():
  x = jax.random.normal(jax.random.key(0), (4, 8))
  ts = jnp.asarray(grids.uniform_t(FLOW, 7), jnp.float32)
  assert float(FLOW.alpha(ts[0])) == 0.0
  non_finite = set()
  for name in sorted(set(samplers.SOLVERS) - set(ADAPTIVE_SOLVERS)):
    out = samplers.sample(samplers.make_solver(name, FLOW), _denoise, x, ts, key=jax.random.key(1))
    if not np.isfinite(np.asarray(out)).all():
      non_finite.add(name)
  assert non_finite == samplers.NEED_SIGNAL_AT_START


def test_plans_and_configs_refuse_a_start_they_cannot_take():
  with pytest.raises(ValueError, match="heun steps in x / alpha, infinite at t = 1 .* solvers that start there"):
    Plan.native(FLOW, "heun", 6, "uniform_t")
  for grid in ("log_snr", "karras"):
    with pytest.raises(ValueError, match=f"the {grid} grid is spaced in log-SNR .* use uniform_t"):
      Plan.native(FLOW, "dpmpp_2m", 6, grid)
  assert np.isfinite(Plan.native(FLOW, "dpmpp_2m", 6, "uniform_t").ts).all()
  # a process with signal at t_max takes every grid and solver
  assert np.isfinite(Plan.native(processes.make_process("vp_cosine"), "heun", 6, "karras").ts).all()
  config = shapes_mmdit.get_config()
  schema.validate(config)
  for field, value in (("sampler.grid", "log_snr"), ("sampler.name", "ipndm")):
    bad = config.copy_and_resolve_references()
    bad.unlock()
    section, key = field.split(".")
    bad[section][key] = value
    with pytest.raises(schema.ConfigError, match=rf"^config\.{section}\.{key} = '{value}' is invalid: expected "):
      schema.validate(bad)
