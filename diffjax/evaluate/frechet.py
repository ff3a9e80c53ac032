"""Frechet distance between Gaussians fitted to feature sets (the FID formula).

  d^2 = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2})          (Dowson & Landau 1982)

``Tr (S1 S2)^{1/2} = Tr (sqrt(S1) S2 sqrt(S1))^{1/2}`` (the two matrices are similar),
and the right side is the trace of the square root of a symmetric PSD matrix: the sum
of the square roots of its eigenvalues. Computed in float64 numpy with ``eigh`` only,
it needs no complex ``sqrtm`` and no epsilon regularization, and stays stable for
singular covariances (fewer samples than feature dimensions): eigenvalues at rounding
noise level are set to 0 first, since the square root would amplify them (1e-16 -> 1e-8).
"""

from __future__ import annotations

import numpy as np


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
  """(mean (d,), covariance (d, d)) of ``features`` (n, d), n >= 2, in float64 (unbiased, ddof=1)."""
  x = np.asarray(features, np.float64)
  if x.ndim != 2 or x.shape[0] < 2:
    raise ValueError(f"need features of shape (n, d) with n >= 2, got {x.shape}")
  return x.mean(axis=0), np.atleast_2d(np.cov(x, rowvar=False))


def _clean(w: np.ndarray) -> np.ndarray:
  """Eigenvalues of a PSD matrix with rounding noise (|w| below d eps max|w|, or negative) set to 0."""
  return np.where(w > len(w) * np.finfo(w.dtype).eps * np.abs(w).max(initial=0.0), w, 0.0)


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
  """Symmetric square root of a symmetric PSD matrix."""
  w, v = np.linalg.eigh((s + s.T) / 2)
  return (v * np.sqrt(_clean(w))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """Squared Frechet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2).

  Args:
    mu1, mu2: means (d,).
    sigma1, sigma2: symmetric PSD covariances (d, d).
  Returns:
    ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2}) >= 0, a Python float (the "FID" value, not its root).
  """
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
  d = mu1.shape[0]
  if mu1.shape != (d,) or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
    raise ValueError(f"need means (d,) and covariances (d, d), got {mu1.shape}, {s1.shape}, {mu2.shape}, {s2.shape}")
  r1 = _psd_sqrt(s1)
  m = r1 @ s2 @ r1
  cross = np.sqrt(_clean(np.linalg.eigvalsh((m + m.T) / 2))).sum()
  return float(max(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * cross, 0.0))


def feature_frechet_distance(features1, features2) -> float:
  """``frechet_distance`` between Gaussians fitted (``feature_statistics``) to two sets of features (n_i, d)."""
  return frechet_distance(*feature_statistics(features1), *feature_statistics(features2))
