"""The attention API (diffjax.models.attention): every implementation against float64 softmax attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tolerances

from diffjax.models import attention


def _attention_inputs(tokens, seed=0):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.standard_normal((2, tokens, 4, 16)), jnp.float32) for _ in range(3)]


def test_blocked_attention_matches_float64_attention(x64):
  """The online-softmax tiles against softmax attention in float64, within float32's bound.

  Each output is sum_s w_s v_s with softmax weights: the logits (H-term dots), exp, the
  normaliser and the weighted sum (S terms) round at most gamma(S + H + 8 + transcendentals)
  times sum_s w_s |v_s| <= max |v| (the block rescalings add one multiply per block).
  """
  q, k, v = _attention_inputs(1024)
  s, h = k.shape[1], k.shape[-1]
  ref = jax.nn.dot_product_attention(*(a.astype(jnp.float64) for a in (q, k, v)))
  out = jax.jit(attention.blocked_attention)(q, k, v)
  assert out.dtype == jnp.float32
  bound = tolerances.gamma(s + h + 8 + 2 * s // attention.ATTENTION_BLOCK + tolerances.TRANSCENDENTAL_OPS)
  np.testing.assert_allclose(out, ref, rtol=0, atol=bound * float(jnp.abs(v).max()))
  # The dispatch: long self-attention on the CPU takes the tiles; short or masked attention does not.
  np.testing.assert_array_equal(attention.dot_product_attention(q, k, v), out)
  short = [a[:, :256] for a in (q, k, v)]
  np.testing.assert_array_equal(attention.dot_product_attention(*short), jax.nn.dot_product_attention(*short))
  # Gradients (through the scan) agree with float64's to the same relative order.
  loss = lambda f: (lambda q, k, v: jnp.sum(f(q, k, v) * v))
  g64 = jax.grad(loss(jax.nn.dot_product_attention), argnums=(0, 1, 2))(*(a.astype(jnp.float64) for a in (q, k, v)))
  g32 = jax.jit(jax.grad(loss(attention.blocked_attention), argnums=(0, 1, 2)))(q, k, v)
  for a, b in zip(g32, g64, strict=True):
    np.testing.assert_allclose(a, b, rtol=0, atol=4 * bound * float(jnp.abs(b).max()))


def _reference(q, k, v, *, mask=None, bias=None, scale=None, is_causal=False):
  """Softmax attention in float64 NumPy."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  logits = np.einsum('btnh,bsnh->bnts', q, k) * scale
  if bias is not None:
    logits = logits + np.asarray(bias, np.float64)
  allowed = np.ones(logits.shape, bool)
  if mask is not None:
    allowed &= np.broadcast_to(np.asarray(mask), logits.shape)
  if is_causal:
    allowed &= np.tril(np.ones(logits.shape[-2:], bool))
  logits = np.where(allowed, logits, -np.inf)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  return np.einsum('bnts,bsnh->btnh', w / w.sum(-1, keepdims=True), v)


def _bound(q, k, v, scale, bias):
  """A float32 bound on any evaluation order: the weighted sum and normaliser (S terms) as in the test
  above, plus the logits' rounding (H-term dots times the scale, the bias added), which perturbs each
  weight by a relative e^(2 delta) - 1 <= 4 delta for delta = the largest logit error."""
  q64, k64 = np.abs(np.asarray(q, np.float64)), np.abs(np.asarray(k, np.float64))
  h, s = q.shape[-1], k.shape[1]
  scale = h ** -0.5 if scale is None else scale
  largest = scale * np.einsum('btnh,bsnh->bnts', q64, k64).max() + (0.0 if bias is None else np.abs(bias).max())
  delta = tolerances.gamma(h + 3 + tolerances.TRANSCENDENTAL_OPS) * largest
  return (tolerances.gamma(s + 8 + tolerances.TRANSCENDENTAL_OPS) + 4 * delta) * float(np.abs(v).max())


CASES = {
    'plain': {},
    'causal': dict(is_causal=True),
    'scale': dict(scale=0.3),
    'mask': dict(mask=np.random.default_rng(3).random((1, 1, 256, 256)) < 0.7),
    'bias': dict(bias=np.random.default_rng(4).standard_normal((1, 2, 256, 256)).astype(np.float32)),
}


@pytest.mark.parametrize('case', list(CASES))
@pytest.mark.parametrize('implementation', ['xla', 'einsum', 'splash', 'cudnn'])
def test_every_implementation_matches_float64_attention(implementation, case):
  if implementation == 'cudnn' and jax.default_backend() != 'gpu':
    pytest.skip('cuDNN attention needs a GPU')
  kw = CASES[case]
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal((1, 256, 2, 64)), jnp.float32) for _ in range(3))
  if implementation == 'cudnn':  # cuDNN takes 16-bit inputs: compare in bfloat16's precision
    q, k, v = (a.astype(jnp.bfloat16) for a in (q, k, v))
  if implementation == 'splash' and ('mask' in kw or 'bias' in kw):
    with pytest.raises(ValueError, match="'splash' takes no mask"):
      attention.dot_product_attention(q, k, v, implementation=implementation, **kw)
    return
  run = jax.jit(lambda q, k, v: attention.dot_product_attention(q, k, v, implementation=implementation, **kw))
  out = np.asarray(run(q, k, v), np.float64)
  want = _reference(q, k, v, **kw)
  bound = _bound(q, k, v, kw.get('scale'), kw.get('bias'))
  if implementation == 'cudnn':  # bfloat16 logits, weights and output: a few of its roundings
    bound += 8 * tolerances.BF16 * float(np.abs(want).max())
  np.testing.assert_allclose(out, want, rtol=0, atol=bound)


def test_named_implementations_refuse_what_they_cannot_serve():
  q = k = v = jnp.ones((1, 300, 2, 8))
  with pytest.raises(ValueError, match="'blocked' takes no mask"):
    attention.dot_product_attention(q, k, v, mask=jnp.ones((300, 300), bool), implementation='blocked')
  with pytest.raises(ValueError, match="'blocked' needs sequence lengths that are multiples of 512, got 300"):
    attention.dot_product_attention(q, k, v, implementation='blocked')
  with pytest.raises(ValueError, match="'splash' needs sequence lengths that are multiples of 128, got 300"):
    attention.dot_product_attention(q, k, v, implementation='splash')
  with pytest.raises(ValueError, match="'flash' is not one of"):
    attention.dot_product_attention(q, k, v, implementation='flash')
  # 'auto' serves anything: here XLA's implementation
  np.testing.assert_array_equal(attention.dot_product_attention(q, k, v), jax.nn.dot_product_attention(q, k, v))


def test_a_fully_masked_row_attends_to_nothing():
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal((1, 4, 1, 8)), jnp.float32) for _ in range(3))
  mask = np.ones((1, 1, 4, 4), bool)
  mask[..., 2, :] = False  # query 2 may attend to no key
  out = np.asarray(attention.einsum_attention(q, k, v, mask=mask))
  np.testing.assert_array_equal(out[:, 2], 0.0)
  np.testing.assert_allclose(out[:, [0, 1, 3]], _reference(q, k, v, mask=mask)[:, [0, 1, 3]], rtol=0,
                             atol=_bound(q, k, v, None, None))
