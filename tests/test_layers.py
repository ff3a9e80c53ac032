"""Shared layers: the two-stage GroupNorm is nn.GroupNorm (two-pass variance), values, gradients and parameters."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax.models.layers import NORM_AXES, GroupNorm, Upsample, group_norm, upsample_conv_subpixel


def _inputs(shape, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(3.0 * rng.standard_normal(shape) + 2.0, jnp.float32)
  c = shape[-1]
  params = {'scale': jnp.asarray(rng.standard_normal(c), jnp.float32),
            'bias': jnp.asarray(rng.standard_normal(c), jnp.float32)}
  return x, params


@pytest.mark.parametrize('shape,groups', [((2, 8, 8, 64), 32), ((3, 5, 7, 12), 4), ((2, 16, 6), 3), ((1, 4, 4, 8), 1)])
def test_group_norm_matches_flax_values_and_gradients(shape, groups):
  x, params = _inputs(shape)
  ours = GroupNorm(groups, 1e-6)
  ref = nn.GroupNorm(num_groups=groups, epsilon=1e-6, use_fast_variance=False)
  y, y_ref = ours.apply({'params': params}, x), ref.apply({'params': params}, x)
  np.testing.assert_allclose(y, y_ref, atol=2e-5, rtol=1e-5)

  def grads(module):
    return jax.grad(lambda p, x: jnp.sum(jnp.sin(module.apply({'params': p}, x))), argnums=(0, 1))(params, x)

  for a, b in zip(jax.tree.leaves(grads(ours)), jax.tree.leaves(grads(ref)), strict=True):
    np.testing.assert_allclose(a, b, atol=2e-5 * float(jnp.max(jnp.abs(b))), rtol=1e-4)


def test_group_norm_standardises_each_group():
  x, _ = _inputs((2, 6, 6, 8), seed=1)
  y = GroupNorm(4, 0.0).apply({'params': {'scale': jnp.ones(8), 'bias': jnp.zeros(8)}}, x)
  g = np.asarray(y, np.float64).reshape(2, 36, 4, 2).transpose(0, 2, 1, 3).reshape(2, 4, -1)
  np.testing.assert_allclose(g.mean(-1), 0.0, atol=1e-5)
  np.testing.assert_allclose(g.var(-1), 1.0, atol=1e-4)


def test_group_norm_parameters_dtypes_and_errors():
  module = group_norm(4, 1e-6, dtype=jnp.bfloat16, param_dtype=jnp.float32)
  x = jnp.ones((2, 4, 4, 8), jnp.bfloat16)
  boxed = module.init(jax.random.key(0), x)['params']
  assert {k: (v.value.shape, v.names) for k, v in boxed.items()} == {'scale': ((8,), NORM_AXES),
                                                                     'bias': ((8,), NORM_AXES)}
  params = nn.meta.unbox(boxed)
  assert params['scale'].dtype == jnp.float32
  assert module.apply({'params': params}, x).dtype == jnp.bfloat16
  with pytest.raises(ValueError, match='divisible by 3 groups'):
    GroupNorm(3, 1e-6).init(jax.random.key(0), jnp.ones((1, 2, 2, 8)))


class _DirectUpsample(nn.Module):
  """The reference: repeat 2x, then ``nn.Conv`` 3x3 (torch padding 1) under the same name."""
  channels: int

  @nn.compact
  def __call__(self, x):
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return nn.Conv(self.channels, (3, 3), padding=((1, 1), (1, 1)), name='conv')(x)


@pytest.mark.parametrize('shape,out', [((2, 5, 7, 3), 4), ((1, 8, 8, 16), 16), ((3, 1, 2, 2), 5)])
def test_subpixel_upsample_conv_is_upsample_then_conv_values_and_gradients(shape, out):
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal((3, 3, shape[-1], out)), jnp.float32)

  def direct(x, kernel):
    up = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return jax.lax.conv_general_dilated(up, kernel, (1, 1), ((1, 1), (1, 1)),
                                        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))

  np.testing.assert_allclose(upsample_conv_subpixel(x, kernel), direct(x, kernel), atol=1e-5, rtol=1e-5)
  probe = jnp.asarray(rng.standard_normal((shape[0], 2 * shape[1], 2 * shape[2], out)), jnp.float32)
  grads = [jax.grad(lambda x, k, f=f: jnp.sum(probe * f(x, k)), argnums=(0, 1))(x, kernel)
           for f in (upsample_conv_subpixel, direct)]
  for a, b in zip(*grads, strict=True):
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-5)


def test_upsample_parameters_and_outputs_match_conv_on_the_upsampled_image():
  x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 6, 6, 8)), jnp.float32)
  ref = _DirectUpsample(8)
  params = ref.init(jax.random.key(3), x)['params']
  for subpixel in (True, False, None):
    module = Upsample(8, subpixel=subpixel)
    mine = nn.meta.unbox(module.init(jax.random.key(3), x)['params'])
    assert jax.tree.all(jax.tree.map(lambda a, b: a.shape == b.shape and bool(jnp.all(a == b)), mine, params))
    np.testing.assert_allclose(module.apply({'params': params}, x), ref.apply({'params': params}, x), atol=1e-5)
  bf16 = Upsample(8, dtype=jnp.bfloat16, subpixel=True).apply({'params': params}, x)
  assert bf16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(bf16, np.float32), ref.apply({'params': params}, x), atol=0.1)
