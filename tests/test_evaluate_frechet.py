"""Frechet distance against closed forms and scipy.linalg.sqrtm."""

import numpy as np
import pytest
import scipy.linalg

from diffjax.evaluate.frechet import feature_frechet_distance, feature_statistics, frechet_distance


def _random_spd(rng, d, rank=None):
  a = rng.normal(size=(d, rank or d))
  return a @ a.T / d + (0 if rank else 0.1 * np.eye(d))


def test_commuting_diagonal_covariances_closed_form():
  rng = np.random.default_rng(0)
  a, b = rng.uniform(0.1, 4, 6), rng.uniform(0.1, 4, 6)
  mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
  expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)
  # 1-D: (m1 - m2)^2 + (s1 - s2)^2 in standard deviations
  assert frechet_distance([1.0], [[4.0]], [-1.0], [[9.0]]) == pytest.approx(4.0 + 1.0, rel=1e-12)
  # scaled covariance S2 = c^2 S1 (commuting, not diagonal): (1 - c)^2 Tr S1
  s = _random_spd(rng, 5)
  assert frechet_distance(np.zeros(5), s, np.zeros(5), 9 * s) == pytest.approx(4 * np.trace(s), rel=1e-10)


def test_non_commuting_case_matches_scipy_sqrtm_and_is_symmetric():
  rng = np.random.default_rng(1)
  for d in (2, 7, 32):
    s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    assert np.linalg.norm(s1 @ s2 - s2 @ s1) > 0.1  # really non-commuting
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    fd = frechet_distance(mu1, s1, mu2, s2)
    assert fd == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(fd, rel=1e-9)


def test_singular_covariances_are_stable():
  """Rank-deficient covariances (fewer samples than dimensions): finite, >= 0, exact where known."""
  rng = np.random.default_rng(2)
  s1, s2 = _random_spd(rng, 20, rank=3), _random_spd(rng, 20, rank=5)
  expected = np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
  assert frechet_distance(np.zeros(20), s1, np.zeros(20), s2) == pytest.approx(expected, rel=1e-6)
  x = rng.normal(size=(10, 64))  # n < d
  assert feature_frechet_distance(x, x) == pytest.approx(0.0, abs=1e-10)
  assert feature_frechet_distance(x, x[::-1]) == pytest.approx(0.0, abs=1e-10)  # order does not matter
  assert feature_frechet_distance(x, x + 1.0) == pytest.approx(64.0, rel=1e-9)  # a pure shift


def test_sample_estimate_converges_to_closed_form():
  rng = np.random.default_rng(3)
  d = 4
  s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
  mu1, mu2 = np.zeros(d), rng.normal(size=d)
  exact = frechet_distance(mu1, s1, mu2, s2)
  errors = []
  for n in (100, 1000, 100_000):
    x = rng.multivariate_normal(mu1, s1, size=n)
    y = rng.multivariate_normal(mu2, s2, size=n)
    errors.append(abs(feature_frechet_distance(x, y) - exact))
  assert errors[-1] < 0.01 * exact
  assert errors[-1] < errors[0]
  mu, cov = feature_statistics(x)
  np.testing.assert_allclose(mu, mu1, atol=0.02)
  np.testing.assert_allclose(cov, s1, atol=0.02)


def test_validates_shapes():
  with pytest.raises(ValueError, match="n >= 2"):
    feature_statistics(np.zeros((1, 3)))
  with pytest.raises(ValueError, match="covariances"):
    frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))
