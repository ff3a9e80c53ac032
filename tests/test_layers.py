"""Shared layers: the two-stage GroupNorm is nn.GroupNorm (two-pass variance), values, gradients and parameters."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tolerances

from diffjax.models.layers import NORM_AXES, GroupNorm, Upsample, group_norm, upsample_conv_subpixel


def _inputs(shape, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(3.0 * rng.standard_normal(shape) + 2.0, jnp.float32)
  c = shape[-1]
  params = {'scale': jnp.asarray(rng.standard_normal(c), jnp.float32),
            'bias': jnp.asarray(rng.standard_normal(c), jnp.float32)}
  return x, params


def _group_norm_bound(x, params, groups, eps):
  """Bound on the float32 rounding error of any two-pass GroupNorm evaluation, per element (float64).

  n = elements per group. mean: n-term sum and a divide, |d mu| <= gamma(n + 1) mean|x|; var =
  mean((x - mu)^2): a subtraction and a square per term, the sum, divide and + eps, relative error
  gamma(n + 4) (+ d mu^2 / var from the shifted mean); 1 / sqrt adds TRANSCENDENTAL_OPS roundings,
  halved-variance error in r; then y = (x - mu) r s + b rounds 3 more times. So
  |dy| <= |s| (|d mu| r + |xhat| (rel_r + gamma(2))) + gamma(1) (|s xhat| + |b|).
  """
  x = np.asarray(x, np.float64)
  s, b = (np.asarray(params[k], np.float64) for k in ('scale', 'bias'))
  xg = x.reshape(x.shape[0], -1, groups, x.shape[-1] // groups)  # (N, spatial, G, C / G)
  n = xg.shape[1] * xg.shape[3]
  mu = xg.mean((1, 3), keepdims=True)
  var = ((xg - mu) ** 2).mean((1, 3), keepdims=True)
  r = 1.0 / np.sqrt(var + eps)
  xhat = ((xg - mu) * r).reshape(x.shape)
  g = tolerances.gamma
  d_mu = g(n + 1) * np.abs(xg).mean((1, 3), keepdims=True)
  rel_r = 0.5 * (g(n + 4) + d_mu**2 / var) + g(tolerances.TRANSCENDENTAL_OPS)
  bound = np.abs(s).reshape(1, 1, groups, -1) * (d_mu * r + np.abs(xhat.reshape(xg.shape)) * (rel_r + g(2)))
  return bound.reshape(x.shape) + g(1) * (np.abs(s * xhat) + np.abs(b)), xhat, n


@pytest.mark.parametrize('shape,groups', [((2, 8, 8, 64), 32), ((3, 5, 7, 12), 4), ((2, 16, 6), 3), ((1, 4, 4, 8), 1)])
def test_group_norm_matches_flax_values_and_gradients(shape, groups):
  x, params = _inputs(shape)
  ours = GroupNorm(groups, 1e-6)
  ref = nn.GroupNorm(num_groups=groups, epsilon=1e-6, use_fast_variance=False)
  y, y_ref = ours.apply({'params': params}, x), ref.apply({'params': params}, x)
  bound, xhat, n = _group_norm_bound(x, params, groups, 1e-6)
  tolerances.assert_within(y, y_ref, 2 * bound)  # two float32 evaluations, each within the bound

  def grads(module):
    return jax.grad(lambda p, x: jnp.sum(jnp.sin(module.apply({'params': p}, x))), argnums=(0, 1))(params, x)

  for a, b in zip(jax.tree.leaves(grads(ours)), jax.tree.leaves(grads(ref)), strict=True):
    # The backward sums n terms per group twice (mean g, mean g xhat) or N * spatial per channel (scale,
    # bias), on the forward's xhat and r (relative error ~ gamma(n + 8)); each gradient combines
    # O(1 + max|xhat|) such terms of size <= max|grad|. Twice that, for two evaluations.
    atol = 2 * tolerances.gamma(2 * max(n, x.size // shape[-1]) + 16) * (1 + np.abs(xhat).max()) * float(
        jnp.max(jnp.abs(b)))
    np.testing.assert_allclose(a, b, atol=atol, rtol=0)


def test_group_norm_standardises_each_group():
  x, _ = _inputs((2, 6, 6, 8), seed=1)
  y = GroupNorm(4, 0.0).apply({'params': {'scale': jnp.ones(8), 'bias': jnp.zeros(8)}}, x)
  g = np.asarray(y, np.float64).reshape(2, 36, 4, 2).transpose(0, 2, 1, 3).reshape(2, 4, -1)
  # Per element y is within e = _group_norm_bound of the exact xhat (whose group mean is 0 and variance 1),
  # so the float64 group mean is within mean(e) and the variance within mean(2 |xhat| e + e^2).
  e, xhat, _ = _group_norm_bound(x, {'scale': np.ones(8), 'bias': np.zeros(8)}, 4, 0.0)
  e, xhat = (a.reshape(2, 36, 4, 2).transpose(0, 2, 1, 3).reshape(2, 4, -1) for a in (e, xhat))
  tolerances.assert_within(g.mean(-1), 0.0, e.mean(-1), "mean")
  tolerances.assert_within(g.var(-1), 1.0, (2 * np.abs(xhat) * e + e**2).mean(-1) + 2 * e.mean(-1) ** 2, "var")


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

  # Both are float32 sums of products of x and kernel taps, in different orders: each is within
  # gamma(n) * direct(|x|, |kernel|) of the exact value (n = 9 C_in taps, + 2 for the subpixel path's
  # sums of kernel taps), so they differ by at most twice that; a wrong tap or phase is O(1).
  bound = tolerances.multilinear_bound(direct, x, kernel, n=9 * shape[-1], extra_ops=2)
  tolerances.assert_within(upsample_conv_subpixel(x, kernel), direct(x, kernel), 2 * bound, "forward")
  probe = jnp.asarray(rng.standard_normal((shape[0], 2 * shape[1], 2 * shape[2], out)), jnp.float32)
  grads = [jax.grad(lambda x, k, f=f: jnp.sum(probe * f(x, k)), argnums=(0, 1))(x, kernel)
           for f in (upsample_conv_subpixel, direct)]
  # The VJPs are sums of products of probe, kernel and x too: 4 * 9 * C_out terms into an input pixel,
  # N * 2H * 2W into a kernel tap (+ 4 for the subpixel path's sums over its phases).
  n = max(36 * out, 4 * shape[0] * shape[1] * shape[2])
  grad_bounds = tolerances.multilinear_bound(
      lambda p, x, k: jax.grad(lambda x, k: jnp.sum(p * direct(x, k)), argnums=(0, 1))(x, k), probe, x, kernel,
      n=n, extra_ops=4)
  for a, b, bound, name in zip(*grads, grad_bounds, ("dx", "dkernel"), strict=True):
    tolerances.assert_within(a, b, 2 * bound, name)
  # Forward mode too (the fitted sampler's refinement takes jacfwd through the denoiser): the JVP in x and
  # kernel is direct(dx, kernel) + direct(x, dkernel), the same sums of products as the forward pass, + 1
  # rounding for the sum of the two terms.
  tangents = [jnp.asarray(rng.standard_normal(a.shape), jnp.float32) for a in (x, kernel)]
  jvps = [jax.jvp(f, (x, kernel), tuple(tangents))[1] for f in (upsample_conv_subpixel, direct)]
  jvp_bound = tolerances.multilinear_bound(lambda x, k, dx, dk: jax.jvp(direct, (x, k), (dx, dk))[1], x, kernel,
                                           *tangents, n=9 * shape[-1], extra_ops=3)
  tolerances.assert_within(jvps[0], jvps[1], 2 * jvp_bound, "jvp")
  only_x = jax.jvp(lambda x: upsample_conv_subpixel(x, kernel), (x,), (tangents[0],))[1]
  x_bound = tolerances.multilinear_bound(direct, tangents[0], kernel, n=9 * shape[-1], extra_ops=2)
  tolerances.assert_within(only_x, direct(tangents[0], kernel), 2 * x_bound, "jvp in x alone")


def test_upsample_parameters_and_outputs_match_conv_on_the_upsampled_image():
  x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 6, 6, 8)), jnp.float32)
  ref = _DirectUpsample(8)
  params = ref.init(jax.random.key(3), x)['params']
  # Each output is a bias plus 9 * 8 products (+ 2 roundings for the subpixel path's summed taps): float32
  # rounding is within gamma(9 * 8 + 3) * ref(|params|, |x|) in any order, twice that between two paths.
  apply_abs = lambda p, x: ref.apply({'params': p}, x)
  bound = tolerances.multilinear_bound(apply_abs, params, x, n=9 * 8 + 1, extra_ops=2)
  for subpixel in (True, False, None):
    module = Upsample(8, subpixel=subpixel)
    mine = nn.meta.unbox(module.init(jax.random.key(3), x)['params'])
    assert jax.tree.all(jax.tree.map(lambda a, b: a.shape == b.shape and bool(jnp.all(a == b)), mine, params))
    tolerances.assert_within(module.apply({'params': params}, x), ref.apply({'params': params}, x), 2 * bound,
                             f"subpixel={subpixel}")
  bf16 = Upsample(8, dtype=jnp.bfloat16, subpixel=True).apply({'params': params}, x)
  assert bf16.dtype == jnp.bfloat16
  # bfloat16: x, kernel and bias rounded to 8 bits (their products within gamma_3 in bf16 units), the
  # float32-accumulated sum as above, and the output rounded once more to bfloat16.
  bf16_bound = (tolerances.multilinear_bound(apply_abs, params, x, n=3, u=tolerances.BF16) + bound
                + tolerances.gamma(1, tolerances.BF16) * np.abs(np.asarray(bf16, np.float64)))
  tolerances.assert_within(bf16, ref.apply({'params': params}, x), bf16_bound, "bfloat16")
