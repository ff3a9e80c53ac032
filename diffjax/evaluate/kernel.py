"""Kernel Inception Distance (Binkowski et al. 2018): the unbiased squared MMD with a cubic kernel.

  k(x, y) = (x . y / d + 1)^3                          (d: the feature dimension)
  MMD_u^2 = sum_{i != i'} k(x_i, x_i') / (m (m - 1)) + sum_{j != j'} k(y_j, y_j') / (n (n - 1))
            - 2 sum_{i, j} k(x_i, y_j) / (m n)

over real features x (m, d) and generated ones y (n, d). Its expectation is the population
MMD^2, whatever m and n (unlike the Frechet distance, whose bias falls as 1/n), so values from
sets of different sizes compare. torch-fidelity and clean-fid average the same estimator over
random subsets of 1000; on the whole sets, as here, the expectation is the same and the variance
smaller. The standard error is the two-sample delete-one jackknife's (Arvesen 1969), exact
and O(m^2 + n^2) from the kernel matrices' row sums. Everything is float64 numpy.
"""

from __future__ import annotations

import numpy as np

from diffjax.evaluate.manifold import check_features


def cubic_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """k(x_i, y_j) = (x_i . y_j / d + 1)^3 for x (m, d), y (n, d): (m, n)."""
  return (x @ y.T / x.shape[1] + 1.0) ** 3


def kid(real, generated) -> tuple[float, float]:
  """(MMD_u^2, its jackknife standard error) of the cubic kernel between real (m, d) and generated (n, d).

  The estimate is unbiased, so it can be negative when the two distributions agree.
  """
  x, y = check_features(real, generated)
  m, n = len(x), len(y)
  if min(m, n) < 3:  # the leave-one-out terms divide by (m - 1)(m - 2)
    raise ValueError(f"KID's jackknife needs at least 3 features per set, got {m} real and {n} generated")
  kxx, kyy, kxy = cubic_kernel(x, x), cubic_kernel(y, y), cubic_kernel(x, y)
  rx = kxx.sum(1) - np.diag(kxx)  # sum over i' != i of k(x_i, x_i')
  ry = kyy.sum(1) - np.diag(kyy)
  sxx, syy, sxy = rx.sum(), ry.sum(), kxy.sum()
  value = sxx / (m * (m - 1)) + syy / (n * (n - 1)) - 2.0 * sxy / (m * n)
  # Leave x_i out: its row and column leave the xx sum, its row the xy sum.
  without_x = (sxx - 2.0 * rx) / ((m - 1) * (m - 2)) + syy / (n * (n - 1)) - 2.0 * (sxy - kxy.sum(1)) / ((m - 1) * n)
  without_y = sxx / (m * (m - 1)) + (syy - 2.0 * ry) / ((n - 1) * (n - 2)) - 2.0 * (sxy - kxy.sum(0)) / (m * (n - 1))
  variance = (m - 1) / m * np.sum((without_x - without_x.mean()) ** 2)
  variance += (n - 1) / n * np.sum((without_y - without_y.mean()) ** 2)
  return float(value), float(np.sqrt(variance))
