"""diffjax's XLA:CPU flag reaches the backend, and a user's own setting of it is kept."""

import os
import subprocess
import sys

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


def test_convolutions_leave_ynnpack_but_dots_and_reductions_stay(tmp_path):
  flags, dumped = _flags_seen(None, tmp_path)
  assert xla_cpu.FLAG in flags
  assert "INDIVIDUAL_DOT" in dumped and "REDUCE" in dumped and "CONVOLUTION" not in dumped


def test_a_users_own_setting_is_kept(tmp_path):
  mine = "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"
  flags, dumped = _flags_seen(mine, tmp_path)
  assert xla_cpu.FLAG not in flags
  assert "INDIVIDUAL_CONVOLUTION" in dumped and "INDIVIDUAL_DOT" not in dumped
