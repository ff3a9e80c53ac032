"""Every sample-set metric of two feature sets, each with a standard error and a 95% interval.

  compare(real_features, generated_features) -> {"frechet_distance", "kid", "precision", "recall",
                                                 "density", "coverage"} -> intervals.Estimate

Frechet distance (``frechet``; biased upwards by O(1/n): compare equal set sizes), KID
(``kernel``; unbiased, exact jackknife error), precision / recall and density / coverage
(``manifold``; k = 3 and 5 as their papers). The errors of all but KID come from the
delete-a-group jackknife (``intervals``). Lower is better for the two distances, higher for
the rest; ``BETTER`` says which.
"""

from __future__ import annotations

import numpy as np

from diffjax.evaluate import intervals, kernel, manifold
from diffjax.evaluate.frechet import feature_frechet_distance

BETTER = {"frechet_distance": "lower", "kid": "lower", "precision": "higher", "recall": "higher",
          "density": "higher", "coverage": "higher"}


def _jackknifed(real: np.ndarray, generated: np.ndarray) -> dict[str, float]:
  precision, recall = manifold.precision_recall(real, generated)
  density, coverage = manifold.density_coverage(real, generated)
  return {"frechet_distance": feature_frechet_distance(generated, real), "precision": precision, "recall": recall,
          "density": density, "coverage": coverage}


def compare(real_features, generated_features, *, groups: int = 10, seed: int = 0) -> dict[str, intervals.Estimate]:
  """All metrics of generated (n, d) against real (m, d) features, in ``BETTER``'s order."""
  real, generated = manifold.check_features(real_features, generated_features)
  out = intervals.group_jackknife(_jackknifed, real, generated, groups=groups, seed=seed)
  value, se = kernel.kid(real, generated)
  out["kid"] = intervals.Estimate(value, se, "two-sample delete-one jackknife (exact)")
  return {name: out[name] for name in BETTER}
