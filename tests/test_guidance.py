"""Classifier-free guidance wrapper."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tolerances

from diffjax import processes as P
from diffjax.samplers import guidance


def _setup():
  calls = []

  def denoise(x, t, cond):
    calls.append(x.shape[0])
    return 0.5 * x + cond["c"][:, None] * t

  x = jax.random.normal(jax.random.key(0), (4, 3))
  return denoise, calls, x, {"c": jnp.arange(4.0)}, {"c": jnp.full((1,), -1.0)}


def test_cfg_combination_and_single_batched_call():
  denoise, calls, x, cond, uncond = _setup()
  t = 0.5
  d_c, d_u = denoise(x, t, cond), denoise(x, t, {"c": -jnp.ones(4)})
  calls.clear()
  for w in (0.0, 1.0, 7.5):
    # any order of d_u + w (d_c - d_u) rounds ~4 times relative to |d_u| + w (|d_c| + |d_u|): an atol for
    # elements where guidance cancels (measured: equal)
    np.testing.assert_allclose(guidance.classifier_free(denoise, cond, uncond, w)(x, t), d_u + w * (d_c - d_u),
                               rtol=1e-6, atol=tolerances.gamma(4) * float(jnp.max(jnp.abs(d_u) + w * (jnp.abs(d_c)
                                                                                               + jnp.abs(d_u)))))
  assert calls == [8, 8, 8]  # one network call on [x; x] per evaluation


def test_cfg_interval_and_rescale():
  denoise, _, x, cond, uncond = _setup()
  p = P.VPLinear()
  t_in, t_out = 0.5, 0.01  # edm sigma ~ 1.9 and ~ 0.07
  g = guidance.classifier_free(denoise, cond, uncond, 3.0, process=p, interval=(0.5, 10.0))
  # outside the interval / inside it: the same ops selected (measured: equal); 1e-6 = 16 u for a refusion
  np.testing.assert_allclose(g(x, t_out), denoise(x, t_out, cond), rtol=1e-6)
  plain = guidance.classifier_free(denoise, cond, uncond, 3.0)
  np.testing.assert_allclose(g(x, t_in), plain(x, t_in), rtol=1e-6)
  # rescale = 1: the guided eps has the per-example std of the conditional eps.
  r = guidance.classifier_free(denoise, cond, uncond, 3.0, process=p, rescale=1.0)(x, t_in)
  eps = lambda d: (x - p.alpha(t_in) * d) / p.sigma(t_in)
  # eps = (x - alpha d) / sigma (3 roundings, cancelling by |x| / |eps| ~ 1 here), the rescale's std and
  # ratio (~2 T + 6), std over d = 3 (~8): 2 gamma(30) = 3.6e-6 < 1e-5 (measured 1.4e-7 relative)
  np.testing.assert_allclose(jnp.std(eps(r), axis=1), jnp.std(eps(denoise(x, t_in, cond)), axis=1), rtol=1e-5)
  with pytest.raises(ValueError, match="process"):
    guidance.classifier_free(denoise, cond, uncond, 3.0, rescale=0.7)


def test_guidance_scale_sweep_does_not_recompile():
  denoise, _, x, cond, uncond = _setup()
  f = jax.jit(lambda w: guidance.classifier_free(denoise, cond, uncond, w)(x, 0.3))
  for w in (1.0, 2.0, 5.0):
    f(w)
  assert f._cache_size() == 1
