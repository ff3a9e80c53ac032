import jax
import jax.numpy as jnp
import pytest

from diffjax.evaluate.distances import sliced_wasserstein


def test_sliced_w2_of_shifted_gaussians(x64):
  """W2 between N(0, I) and N(m, I) is |m|; its sliced version is |m| / sqrt(d)."""
  d, n = 4, 1000  # y = x + m: every projected coupling is exact, so n can be small
  x = jax.random.normal(jax.random.key(0), (n, d))
  m = jnp.array([1.0, -2.0, 0.5, 0.0])
  sw = sliced_wasserstein(x, x + m, jax.random.key(1), num_projections=20000)
  assert float(sw) == pytest.approx(float(jnp.linalg.norm(m)) / d**0.5, rel=0.03)
  assert float(sliced_wasserstein(x, x, jax.random.key(1))) == 0.0
  with pytest.raises(ValueError):
    sliced_wasserstein(x, x[:10], jax.random.key(1))
