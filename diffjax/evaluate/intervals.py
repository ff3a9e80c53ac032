"""Confidence intervals for two-sample metrics: the delete-a-group jackknife.

Both sets are split at random into G groups; the metric is recomputed G times, each time
without group g of either set, and

  SE^2 = (G - 1) / G * sum_g (theta_(g) - mean theta)^2,     interval = theta +- z SE.

It needs no resampling with replacement, which would put duplicate points into the
nearest-neighbour metrics (a copy is its own nearest neighbour, so recall and the radii
would be biased); it costs G evaluations of the metric. ``tests/test_evaluate_metrics.py``
measures it on Gaussian sets (two 4-d sets of 150, 120 draws, G = 10): the standard error
over the Monte Carlo spread is 1.0 (Frechet distance), 1.2 (precision, density) and 1.5-1.7
(recall, coverage: the nearest-neighbour radii change with every deletion, so those
intervals are conservative); every 95% interval held the estimator's mean in 92-99% of draws.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

Z_95 = 1.959963984540054  # the standard normal's 97.5% quantile


@dataclasses.dataclass(frozen=True)
class Estimate:
  """A metric's value on the whole sets and its standard error; ``interval`` the 95% one."""

  value: float
  se: float
  method: str  # how ``se`` was obtained

  @property
  def interval(self) -> tuple[float, float]:
    return self.value - Z_95 * self.se, self.value + Z_95 * self.se

  def record(self) -> dict:
    low, high = self.interval
    return {"value": self.value, "se": self.se, "ci95": [low, high], "se_method": self.method}


def group_jackknife(metrics: Callable[[np.ndarray, np.ndarray], dict[str, float]], real, generated, *,
                    groups: int = 10, seed: int = 0) -> dict[str, Estimate]:
  """Each value of ``metrics(real, generated)`` (a dict of floats) with its delete-a-group jackknife error."""
  real, generated = np.asarray(real), np.asarray(generated)
  if groups < 2 or groups > min(len(real), len(generated)):
    raise ValueError(f"the jackknife needs 2 to {min(len(real), len(generated))} groups here, got {groups}")
  rng = np.random.default_rng(seed)
  label = lambda n: rng.permutation(np.arange(n) % groups)
  real_groups, generated_groups = label(len(real)), label(len(generated))
  values = metrics(real, generated)
  partial = [metrics(real[real_groups != g], generated[generated_groups != g]) for g in range(groups)]
  method = f"delete-a-group jackknife, {groups} groups"
  out = {}
  for name, value in values.items():
    p = np.array([d[name] for d in partial], np.float64)
    out[name] = Estimate(float(value), float(np.sqrt((groups - 1) / groups * np.sum((p - p.mean()) ** 2))), method)
  return out
