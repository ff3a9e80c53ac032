"""U-Net: unit tests (shapes, dtypes, remat, sharding names) and parity with diffusers' UNet2DConditionModel."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tolerances

from diffjax.models.layers import CONV_KERNEL_AXES, DENSE_KERNEL_AXES, timestep_embedding
from diffjax.models.unet import UNET_CONFIGS, UNet, UNetConfig, init_unet

TINY = UNET_CONFIGS['tiny']
# one level (ResNet + transformer, mid block, decoder ResNets): the cheapest network with every block kind
ONE = UNetConfig(block_out_channels=(16,), layers_per_block=1, attention_levels=(True,), num_heads=2,
                 cross_attention_dim=8, norm_num_groups=4)


def _random_params(net, seed=0):
  """Random float32 parameters of ``net``'s shapes (faster than compiling ``init``'s random number generators)."""
  shapes = nn.meta.unbox(jax.eval_shape(lambda: init_unet(net, jax.random.key(0))))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(0.1 * rng.standard_normal(s.shape), jnp.float32), shapes)


def _inputs(cfg, batch=2, size=8, length=5, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((batch, size, size, cfg.in_channels)).astype(np.float32)
  t = np.linspace(1.0, 900.0, batch).astype(np.float32)
  ctx = rng.standard_normal((batch, length, cfg.cross_attention_dim)).astype(np.float32)
  return x, t, ctx


# -- unit tests ----------------------------------------------------------------------------------------------------
def test_timestep_embedding_formula():
  t = np.array([0.0, 3.0, 999.0])
  for flip, shift in ((True, 0.0), (False, 1.0)):
    e = np.asarray(timestep_embedding(jnp.asarray(t), 8, flip_sin_to_cos=flip, downscale_freq_shift=shift))
    freqs = np.exp(-np.log(10000.0) * np.arange(4) / (4 - shift))
    sin, cos = np.sin(t[:, None] * freqs), np.cos(t[:, None] * freqs)
    # float32 freqs = exp(y), y = -log(1e4) i / (half - shift): 3 roundings in y (the constant, product,
    # divide) give 3 |y| u in f (exp's conditioning is |y|), exp adds T u; the product t f (1) and sin / cos
    # range reduction (~1) move the phase by <= |t f| (3 |y| + T + 4) u; sin, cos add T u.
    phase = np.abs(t[:, None] * freqs)
    bound = phase * (3 * np.abs(np.log(freqs)) + tolerances.TRANSCENDENTAL_OPS + 4) * tolerances.U32 + tolerances.gamma(
        tolerances.TRANSCENDENTAL_OPS)
    tolerances.assert_within(e, np.concatenate([cos, sin] if flip else [sin, cos], -1), np.concatenate([bound] * 2, -1))
  assert timestep_embedding(jnp.zeros(2), 7).shape == (2, 7)


def test_named_variants_have_the_stable_diffusion_parameter_counts():
  # diffusers' SD 1.5 / 2.1 U-Nets: 859,520,964 and 865,910,724 parameters.
  for name, want in (('sd15', 859_520_964), ('sd21', 865_910_724)):
    shapes = jax.eval_shape(lambda n=name: nn.meta.unbox(init_unet(UNet(UNET_CONFIGS[n]), jax.random.key(0))))
    assert sum(x.size for x in jax.tree.leaves(shapes)) == want, name


def test_shapes_and_dtypes():
  x, t, ctx = _inputs(TINY, batch=3, size=16)
  for dtype in (jnp.float32, jnp.bfloat16):
    net = UNet(TINY, dtype=dtype)
    params = jax.eval_shape(lambda n=net: nn.meta.unbox(init_unet(n, jax.random.key(0))))
    assert {p.dtype for p in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}  # f32 params
    y = jax.eval_shape(net.apply, {'params': params}, x, t, ctx)
    assert y.shape == (3, 16, 16, TINY.out_channels) and y.dtype == dtype


def test_bf16_compute_is_close_to_f32():
  x, t, ctx = _inputs(ONE)
  params = _random_params(UNet(ONE))
  y32 = jax.jit(UNet(ONE).apply)({'params': params}, x, t, ctx)
  y16 = jax.jit(UNet(ONE, dtype=jnp.bfloat16).apply)({'params': params}, x, t, ctx)
  assert y16.dtype == jnp.bfloat16
  rel = jnp.linalg.norm(y16.astype(jnp.float32) - y32) / jnp.linalg.norm(y32)
  assert 1e-4 < rel < 0.05  # really computed in bf16, and still accurate


def test_remat_gives_same_output_and_gradients():
  x, t, ctx = _inputs(ONE)
  params = _random_params(UNet(ONE), 1)

  def loss(p, net):
    return jnp.mean(net.apply({'params': p}, x, t, ctx) ** 2)

  l0, g0 = jax.jit(jax.value_and_grad(lambda p: loss(p, UNet(ONE))))(params)
  l1, g1 = jax.jit(jax.value_and_grad(lambda p: loss(p, UNet(ONE, remat=True))))(params)
  # remat recomputes the same forward ops; a different fusion may only reorder the loss's mean over
  # n = x.size outputs: 2 gamma(n + 2) relative (measured: identical).
  np.testing.assert_allclose(l0, l1, rtol=2 * tolerances.gamma(x.size + 2))
  # gradients: the same sums in possibly another order; rtol 1e-4 = 2 lambda sqrt(n) u (probabilistic bound,
  # lambda = 3) for sums of up to n = 1e5 terms, above the weight gradients' batch x 8 x 8 x channels here.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), g0, g1)
  assert jax.tree.structure(g0) == jax.tree.structure(g1)


def test_parameters_carry_logical_axis_names():
  boxed = jax.eval_shape(lambda: init_unet(UNet(TINY), jax.random.key(0)))
  leaves = jax.tree.leaves(boxed, is_leaf=lambda v: isinstance(v, nn.Partitioned))
  assert leaves and all(isinstance(v, nn.Partitioned) for v in leaves)
  assert all(len(v.names) == v.value.ndim for v in leaves)
  p = boxed['down_blocks_0']['resnets_0']
  assert p['conv1']['kernel'].names == CONV_KERNEL_AXES
  assert p['time_emb_proj']['kernel'].names == DENSE_KERNEL_AXES
  specs = nn.get_partition_spec(boxed)
  assert specs['conv_in']['kernel'] == jax.sharding.PartitionSpec(*CONV_KERNEL_AXES)


def test_class_conditioning_scale_shift_and_dropout():
  cfg = UNetConfig(block_out_channels=(16,), layers_per_block=1, attention_levels=(True,), num_heads=2,
                   cross_attention_dim=None, norm_num_groups=4, resnet_scale_shift=True, dropout=0.5, num_classes=3)
  net = UNet(cfg)
  x = jnp.ones((2, 8, 8, 4))
  params = _random_params(net)
  assert params['down_blocks_0']['resnets_0']['time_emb_proj']['kernel'].shape[-1] == 2 * 16  # scale, shift

  @jax.jit
  def run(labels, key):
    det = net.apply({'params': params}, x, jnp.ones(2), None, labels)
    drop = net.apply({'params': params}, x, jnp.ones(2), None, labels, deterministic=False, rngs={'dropout': key})
    return det, drop

  y, d0 = run(jnp.array([0, 2]), jax.random.key(0))
  y2, d1 = run(jnp.array([1, 2]), jax.random.key(1))
  assert not np.allclose(y[0], y2[0]) and np.allclose(y[1], y2[1])  # a label changes only its own example
  assert not np.allclose(d0, d1) and not np.allclose(d0, y)
  with pytest.raises(ValueError, match='class_labels'):
    net.apply({'params': params}, x, jnp.ones(2))
