"""Sampling is jit-compiled once for a sweep, and batch-sharding does not change samples."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import tolerances

from diffjax import processes as P
from diffjax.analytic import GaussianMixture
from diffjax.samplers import SOLVERS, grids, guidance, make_solver, sample

# Solvers exercised by the sharding test (those registered; stochastic ones included).
MESH_SOLVERS = ["euler", "heun", "dpmpp_2m", "unipc_bh2", "ddpm", "dpmpp_2m_sde", "edm_stochastic"]


def _class_conditional_denoiser(process):
  """Two classes, each a 2-D Gaussian mixture; cond is the class label (B,)."""
  mixtures = [GaussianMixture.create([0.5, 0.5], [[-2, 0], [2, 0]], [[0.1, 0.1]] * 2),
              GaussianMixture.create([1.0], [[0, 3]], [[0.2, 0.5]])]
  dens = [m.denoiser(process) for m in mixtures]
  return lambda x, t, c: jnp.where((c == 1)[:, None], dens[1](x, t), dens[0](x, t))


def test_sweeping_scale_seed_and_grid_parameters_compiles_once():
  p = P.make_process("sd")
  den = _class_conditional_denoiser(p)
  solver = make_solver("dpmpp_2m" if "dpmpp_2m" in SOLVERS else "euler", p)
  cond, uncond = {"c": jnp.ones(6, jnp.int32)}, {"c": jnp.zeros((1,), jnp.int32)}

  @jax.jit
  def run(seed, scale, sigma_min, sigma_max, rho):
    key = jax.random.key(seed)
    ts = grids.karras(p, 10, sigma_min, sigma_max, rho)
    x = p.prior_sample(key, (6, 2))
    guided = guidance.classifier_free(lambda x, t, c: den(x, t, c["c"]), cond, uncond, scale)
    return sample(solver, guided, x, ts, key=key)

  outs = [run(seed, scale, smin, smax, rho)
          for seed, scale, smin, smax, rho in [(0, 1.0, 0.03, 14.6, 7.0), (1, 4.0, 0.03, 14.6, 7.0),
                                               (1, 4.0, 0.05, 10.0, 7.0), (2, 2.0, 0.05, 10.0, 3.0)]]
  assert run._cache_size() == 1
  # The sweep really changes the result (it is not a constant function).
  assert all(float(jnp.max(jnp.abs(a - b))) > 1e-3 for a, b in zip(outs[:-1], outs[1:], strict=True))


_WORKER = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec
    from diffjax import processes as P
    from diffjax.analytic import GaussianMixture
    from diffjax.samplers import SOLVERS, grids, make_solver, sample
    assert jax.device_count() == 8, jax.devices()
    p = P.make_process("sd")
    gm = GaussianMixture.create([0.3, 0.7], [[-1.0, 0.5, 2.0], [1.5, -1.0, 0.0]], [[0.05, 0.2, 0.1], [0.3, 0.02, 0.1]])
    den = gm.denoiser(p)
    mesh = jax.make_mesh((8,), ("data",))
    batch = NamedSharding(mesh, PartitionSpec("data"))
    ts = grids.karras(p, 12)
    key = jax.random.key(0)
    x = p.prior_sample(jax.random.key(1), (32, 3))
    for name in NAMES:
      if name not in SOLVERS:
        continue
      solver = make_solver(name, p)
      run = lambda x, key: sample(solver, den, x, ts, key=key)
      one = jax.jit(run)(jax.device_put(x, jax.devices()[0]), key)
      sharded = jax.jit(run, in_shardings=(batch, None), out_shardings=batch)(jax.device_put(x, batch), key)
      assert len(sharded.sharding.device_set) == 8
      diff = float(np.max(np.abs(np.asarray(one) - np.asarray(sharded))))
      bound = RTOL * float(np.max(np.abs(np.asarray(one))))
      assert np.isfinite(diff) and diff <= bound, (name, diff, bound)
      print(name, diff, bound)
""")


def test_batch_sharded_sampling_on_8_devices_matches_one_device():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  # Per-example work is the same on 1 or 8 devices, but another batch size per device may vectorize
  # (and fuse) differently: rounding only, two runs of 11 steps, up to 2 evaluations a step.
  rtol = tolerances.sampler_rtol(11, evals_per_step=2)
  code = f"NAMES = {MESH_SOLVERS!r}\nRTOL = {rtol!r}\n" + _WORKER
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  checked = [line.split()[0] for line in out.stdout.splitlines()]
  assert "euler" in checked and len(checked) >= 2, out.stdout
  diffs, bounds = np.array([[float(v) for v in line.split()[1:3]] for line in out.stdout.splitlines()]).T
  np.testing.assert_array_less(diffs, bounds)
