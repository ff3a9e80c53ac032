"""A sampler demo: every chosen solver at a fixed NFE on an analytic 2-D mixture, as a PNG."""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from absl import logging  # noqa: E402

from diffjax import processes  # noqa: E402
from diffjax.analytic import GaussianMixture  # noqa: E402
from diffjax.evaluate.distances import sliced_wasserstein  # noqa: E402
from diffjax.samplers import grids, make_solver, num_evaluations, points_for_budget, sample  # noqa: E402


def ring_mixture(num_modes: int = 8, radius: float = 4.0, std: float = 0.15) -> GaussianMixture:
  """``num_modes`` equal, sharp isotropic Gaussians on a circle."""
  angles = 2 * math.pi * jnp.arange(num_modes) / num_modes
  means = radius * jnp.stack([jnp.cos(angles), jnp.sin(angles)], axis=1)
  return GaussianMixture.create(jnp.ones(num_modes), means, jnp.full((num_modes, 2), std**2))


def run(*, process_name: str, mixture: GaussianMixture, solver_names, grid: str, nfe: int, num_samples: int,
        seed: int, output_png: str) -> dict:
  """Samples ``num_samples`` points with each solver at budget ``nfe``; writes a scatter PNG.

  Returns {solver name: sliced W2 distance to data samples}.
  """
  process = processes.make_process(process_name)
  denoise = mixture.denoiser(process)
  k_noise, k_solver, k_data, k_sw = jax.random.split(jax.random.key(seed), 4)
  x_init = process.prior_sample(k_noise, (num_samples, mixture.dim))
  data = mixture.sample(k_data, num_samples)
  results, panels = {}, [("data", data)]
  for name in solver_names:
    solver = make_solver(name, process)
    n = points_for_budget(solver, nfe)
    ts = grids.GRIDS[grid](process, n)
    x = jax.jit(lambda x, ts, key, solver=solver: sample(solver, denoise, x, ts, key=key))(x_init, ts, k_solver)
    results[name] = float(sliced_wasserstein(x, data, k_sw))
    label = f"{name} ({num_evaluations(solver, n)} NFE)  SW2 {results[name]:.3f}"
    logging.info("%s", label)
    panels.append((label, x))

  cols = min(4, len(panels))
  rows = math.ceil(len(panels) / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
  lim = float(jnp.max(jnp.abs(data))) * 1.3
  for ax in axes.flat:
    ax.axis("off")
  for ax, (label, pts) in zip(axes.flat, panels, strict=False):
    ax.scatter(pts[:, 0], pts[:, 1], s=1, alpha=0.5)
    ax.set(xlim=(-lim, lim), ylim=(-lim, lim), aspect="equal", title=label)
    ax.title.set_fontsize(8)
    ax.axis("on")
  fig.suptitle(f"{process_name} process, {grid} grid, budget {nfe} NFE")
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(output_png)), exist_ok=True)
  fig.savefig(output_png, dpi=100)
  plt.close(fig)
  logging.info("wrote %s", output_png)
  return results
