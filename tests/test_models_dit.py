"""DiT (diffjax.models.dit): the position table, adaLN-Zero, parity with diffusers' DiTTransformer2DModel."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tolerances
from reference_models import assert_exports_back, jiggle

from diffjax.convert import load_pretrained
from diffjax.models.dit import DIT_CONFIGS, DiT, init_dit, sincos_position_table


def test_the_position_table_encodes_column_then_row():
  table = sincos_position_table(16, 3, 5, base_size=5).reshape(3, 5, 16)
  # the first half depends on the column only, the second on the row only
  np.testing.assert_array_equal(table[0, :, :8], table[2, :, :8])
  np.testing.assert_array_equal(table[:, 0, 8:], table[:, 4, 8:])
  # position 0: sin 0 = 0, cos 0 = 1; column c (base_size = number of columns): sin(c * 10000^(-i/4))
  np.testing.assert_array_equal(table[0, 0], np.array([0, 0, 0, 0, 1, 1, 1, 1] * 2, np.float32))
  want = np.sin(3 * 10000.0 ** (-np.arange(4) / 4.0))
  np.testing.assert_allclose(table[1, 3, :4], want, rtol=0, atol=tolerances.gamma(tolerances.TRANSCENDENTAL_OPS))
  # rows are scaled to the base grid: 3 rows on a base of 5 sit at 0, 5/3, 10/3
  np.testing.assert_allclose(table[2, 0, 8:12], np.sin(10 / 3 * 10000.0 ** (-np.arange(4) / 4.0)), rtol=0,
                             atol=tolerances.gamma(8 + tolerances.TRANSCENDENTAL_OPS))
  with pytest.raises(ValueError, match='divisible by 4'):
    sincos_position_table(6, 2, 2, 2)


def test_zero_gates_make_every_block_the_identity():
  """adaLN-Zero: with each block's modulation zero, the attention and MLP do not reach the output."""
  m = DiT(DIT_CONFIGS['tiny'])
  params = jax.tree.map(np.asarray, nn.meta.unbox(init_dit(m, jax.random.key(0))))
  for i in range(m.config.num_layers):
    for leaf in ('kernel', 'bias'):
      params[f'transformer_blocks_{i}']['norm1']['linear'][leaf] = np.zeros_like(
          params[f'transformer_blocks_{i}']['norm1']['linear'][leaf])
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 4))
  t, y = jnp.array([10.0, 900.0]), jnp.array([3, 10])  # 10: the null label
  run = jax.jit(lambda p: m.apply({'params': p}, x, t, y))
  base = run(params)
  other = jax.tree.map(lambda a: a, params)
  for i in range(m.config.num_layers):
    block = other[f'transformer_blocks_{i}']
    block['attn1']['to_v']['kernel'] = block['attn1']['to_v']['kernel'] * 3.0 + 1.0
    block['ff']['net_2']['kernel'] = -block['ff']['net_2']['kernel']
  np.testing.assert_array_equal(run(other), base)
  assert base.shape == (2, 8, 8, 8)
  with pytest.raises(ValueError, match='multiples of 2'):
    m.apply({'params': params}, jnp.zeros((1, 7, 8, 4)), t[:1], y[:1])


@pytest.mark.reference
def test_dit_matches_diffusers(tmp_path):
  torch = pytest.importorskip('torch')
  diffusers = pytest.importorskip('diffusers')
  ref = jiggle(diffusers.DiTTransformer2DModel(
      num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2, sample_size=8,
      patch_size=2, num_embeds_ada_norm=10, norm_num_groups=4))
  ref.save_pretrained(tmp_path / 'dit')
  m, params = load_pretrained(tmp_path / 'dit')
  assert isinstance(m, DiT) and m.config == DIT_CONFIGS['tiny']
  t, y = np.array([3, 999]), np.array([1, 10])  # 10: the null label of guidance
  worst = 0.0
  for size in (8, 12):  # the config's sample size and another (its position table recomputed)
    x = np.random.default_rng(size).standard_normal((2, 4, size, size)).astype(np.float32)
    with torch.no_grad():
      want = ref(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(y)).sample.numpy()
    got = np.asarray(jax.jit(m.apply)({'params': params}, x.transpose(0, 2, 3, 1), t, y)).transpose(0, 3, 1, 2)
    worst = max(worst, float(np.abs(got - want).max() / np.abs(want).max()))
  print(f'dit max abs diff / max |out| {worst:.2e}')
  # The estimate of the text encoders' parity tests, 2 L 3 sqrt(k) u per unit of output, with the longest sum
  # k = 256 (the timestep sinusoid's channels) and 2 blocks: 1.1e-5 of the largest output.
  assert worst <= 2 * 2 * 3 * math.sqrt(256) * tolerances.U32 * 3
  # export round trip: diffusers reads diffjax's folder back bit for bit
  assert_exports_back(m, params, ref, tmp_path / 'back')
