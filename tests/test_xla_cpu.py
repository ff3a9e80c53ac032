"""diffjax's XLA:CPU flag reaches the backend, a user's own setting of it is kept, and a reduction that
YNNPACK's reduce fusion miscomputes (jaxlib 0.10.2) comes out right under it."""

import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tolerances

from diffjax import xla_cpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_PROBE = ("import os, jax; import diffjax; import jax.numpy as jnp; float(jnp.ones(2).sum()); "
          "print(os.environ['XLA_FLAGS'])")


def _flags_seen(xla_flags: str | None, tmp_path) -> tuple[str, str]:
  """(XLA_FLAGS after importing diffjax, the ynn option in the backend's dumped debug options)."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["XLA_FLAGS"] = f"{xla_flags or ''} --xla_dump_to={tmp_path}".strip()
  out = subprocess.run([sys.executable, "-c", _PROBE], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300, check=True)
  dumped = sorted({line.strip() for f in os.listdir(tmp_path) if f.endswith(".debug_options")
                   for line in open(os.path.join(tmp_path, f)) if "ynn_fusion_type" in line})
  return out.stdout.strip(), "\n".join(dumped)


def test_convolutions_and_reductions_leave_ynnpack_but_dots_stay(tmp_path):
  flags, dumped = _flags_seen(None, tmp_path)
  assert xla_cpu.FLAG in flags
  assert "INDIVIDUAL_DOT" in dumped and "REDUCE" not in dumped and "CONVOLUTION" not in dumped


def test_a_users_own_setting_is_kept(tmp_path):
  mine = "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"
  flags, dumped = _flags_seen(mine, tmp_path)
  assert xla_cpu.FLAG not in flags
  assert "INDIVIDUAL_CONVOLUTION" in dumped and "INDIVIDUAL_DOT" not in dumped


def test_the_max_of_a_dot_product_chain_is_right():
  """The softmax max of a 256-D Gaussian mixture's log-densities at SD's t_max (as the sampler benchmark's
  matrix-form posterior mean computes it): YNNPACK's reduce fusion returned -inf, NaN or garbage for it,
  changing from call to call, where float64 gives about -1041."""
  if jax.default_backend() != "cpu" or xla_cpu.FLAG not in os.environ.get("XLA_FLAGS", ""):
    pytest.skip("the check is of diffjax's CPU setting; a user's own XLA_FLAGS are theirs")
  rng = np.random.default_rng(0)
  k, d, n = 10, 256, 1024
  means, var = 0.7 * rng.standard_normal((k, d)), np.full((k, d), 1e-2 + 14.6**2)
  x = 14.6 * rng.standard_normal((n, d))
  inv, norm = 1.0 / var, np.sum(np.log(2 * math.pi * var), -1)
  consts = (inv, means * inv, np.sum(means**2 * inv, -1))

  def logits(x, inv, m_inv, c):
    return -0.5 * ((x**2) @ inv.T - 2.0 * x @ m_inv.T + c) - 0.5 * norm

  exact = np.max(logits(x, *consts), -1)
  c32 = [jnp.asarray(a, jnp.float32) for a in consts]  # closed over: the failing fusion had them as constants
  f = jax.jit(lambda x: jnp.max(logits(x, *c32), -1))
  # float32 rounding of the two length-d dot products and the few sums around them, in any order (Higham 3.5)
  bound = tolerances.gamma(d + 8) * (x**2 @ inv.T + 2 * np.abs(x) @ np.abs(consts[1]).T + consts[2]
                                     + np.abs(norm)).max(-1)
  for _ in range(5):  # the miscompiled fusion read different values from call to call
    got = np.asarray(f(jnp.asarray(x, jnp.float32)), np.float64)
    assert np.all(np.abs(got - exact) <= bound), np.nanmax(np.abs(got - exact) / bound)
