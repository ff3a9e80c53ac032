"""The T5 encoder (diffjax.models.t5): position buckets, masking, loading transformers' files (parity)."""

import math

import jax
import numpy as np
import pytest
import tolerances
from reference_models import assert_exports_back, jiggle

from diffjax.convert import load_pretrained, save_pretrained
from diffjax.convert.files import read_weights, write_safetensors
from diffjax.convert.keys import WeightMismatchError
from diffjax.models.t5 import T5_CONFIGS, T5EncoderModel, position_buckets

# Tiny transformers T5 configs: v1.1 (gated tanh GELU, SD3's / Flux's) and the original (ReLU).
T5_REFERENCE_CONFIGS = {
    'gated_gelu': dict(vocab_size=1000, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                       feed_forward_proj='gated-gelu'),
    'relu_3layers': dict(vocab_size=1000, d_model=24, d_kv=6, d_ff=40, num_layers=3, num_heads=3,
                         feed_forward_proj='relu', relative_attention_num_buckets=16,
                         relative_attention_max_distance=64),
}


def test_position_buckets_follow_the_definition():
  b = position_buckets(1, 400, 32, 128)[0]  # key offsets 0 .. 399 from query 0
  assert list(b[:8]) == [0] + list(range(17, 24))  # positive offsets 1..7: their own buckets after the 16 negative
  back = position_buckets(400, 1, 32, 128)[:, 0]  # offsets 0 .. -399
  assert list(back[:8]) == list(range(8))
  # log-spaced buckets 8..15 between |offset| 8 and 128: bucket 8 + floor(8 log(n / 8) / log 16)
  for n in (8, 15, 16, 31, 32, 64, 127):
    assert back[n] == 8 + int(math.floor(8 * math.log(n / 8) / math.log(16) + 1e-9)), n
  assert set(back[128:]) == {15} and set(b[128:]) == {31}  # beyond max_distance: the last bucket of each side
  assert position_buckets(5, 7, 32, 128).shape == (5, 7)


@pytest.mark.reference
@pytest.mark.parametrize('buckets,distance', [(32, 128), (16, 64), (64, 256)])
def test_position_buckets_match_transformers(buckets, distance):
  torch = pytest.importorskip('torch')
  from transformers.models.t5.modeling_t5 import T5Attention
  length = 3 * distance
  offsets = torch.arange(length)[None, :] - torch.arange(length)[:, None]
  want = T5Attention._relative_position_bucket(offsets, bidirectional=True, num_buckets=buckets,
                                               max_distance=distance).numpy()
  np.testing.assert_array_equal(position_buckets(length, length, buckets, distance), want)


def _random_params(module, seed=0):
  ids = np.zeros((1, 4), np.int32)
  return jax.jit(module.init)(jax.random.key(seed), ids)['params']


def test_padding_keys_do_not_reach_the_unpadded_tokens():
  m = T5EncoderModel(T5_CONFIGS['tiny'])
  params = _random_params(m)
  ids = np.random.default_rng(0).integers(2, 1000, (2, 12))
  mask = np.ones_like(ids)
  mask[:, 7:] = 0
  other = ids.copy()
  other[:, 7:] = np.random.default_rng(1).integers(2, 1000, (2, 5))
  run = jax.jit(m.apply)
  a, b = (run({'params': params}, x, mask).last_hidden_state for x in (ids, other))
  # A padded key's logit gets finfo(float32).min added: its softmax weight underflows to exactly 0, so the
  # unpadded rows see the same sums; allow the rounding of a reordered sum all the same (d_model-long dots).
  np.testing.assert_allclose(np.asarray(a[:, :7]), np.asarray(b[:, :7]), rtol=0,
                             atol=tolerances.gamma(4 * 48) * float(np.abs(np.asarray(a)).max()))
  assert np.abs(np.asarray(a[:, 7:]) - np.asarray(b[:, 7:])).max() > 1e-3  # padded positions do change
  pooled = np.asarray(run({'params': params}, ids, mask).pooled)
  np.testing.assert_allclose(pooled, np.asarray(a[:, :7]).mean(1), rtol=tolerances.gamma(8), atol=1e-7)


def test_a_t5_file_with_a_missing_layer_is_one_error_naming_it(tmp_path):
  m = T5EncoderModel(T5_CONFIGS['tiny'])
  save_pretrained(m, _random_params(m), tmp_path / 't5')
  file = tmp_path / 't5' / 'model.safetensors'
  state = read_weights(str(file))
  del state['encoder.block.1.layer.1.DenseReluDense.wo.weight'], state['encoder.final_layer_norm.weight']
  write_safetensors(str(file), state)
  with pytest.raises(WeightMismatchError, match='2 missing') as e:
    load_pretrained(tmp_path / 't5')
  assert str(tmp_path / 't5') in str(e.value)
  assert 'encoder.block.1.layer.1.DenseReluDense.wo.weight' in str(e.value)
  assert 'encoder.final_layer_norm.weight' in str(e.value)


@pytest.mark.reference
@pytest.mark.parametrize('name', list(T5_REFERENCE_CONFIGS))
def test_t5_matches_transformers(name, tmp_path):
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  cfg = transformers.T5Config(**T5_REFERENCE_CONFIGS[name], dropout_rate=0.0)
  ref = jiggle(transformers.T5EncoderModel(cfg))
  ref.save_pretrained(tmp_path / 't5')
  m, params = load_pretrained(tmp_path / 't5')
  # 300 tokens: offsets beyond relative_attention_max_distance reach the last buckets
  ids = np.random.default_rng(0).integers(2, 1000, (2, 300))
  mask = np.ones_like(ids)
  mask[0, 170:] = 0
  worst = 0.0
  for am in (None, mask):
    out = jax.jit(lambda p, i, a: m.apply({'params': p}, i, a, output_hidden_states=True))(params, ids, am)
    with torch.no_grad():
      r = ref(torch.from_numpy(ids), attention_mask=None if am is None else torch.from_numpy(am),
              output_hidden_states=True)
    assert len(out.hidden_states) == len(r.hidden_states) == cfg.num_layers + 1
    scale = float(np.abs(r.last_hidden_state.numpy()).max())
    for a, b in zip((out.last_hidden_state, *out.hidden_states), (r.last_hidden_state, *r.hidden_states),
                    strict=True):
      worst = max(worst, float(np.abs(np.asarray(a) - b.numpy()).max()) / max(scale, 1.0))
  print(f't5[{name}] max abs diff / max(|h|, 1) {worst:.2e}')
  # Per layer a d_model-, d_ff- and 300-long sum plus a softmax: the estimate of the CLIP and MiniLM tests,
  # 2 L 3 sqrt(k) u per unit of |h| with k = 300 (the longest sum), times 4 for T5's logits, which are not
  # divided by sqrt(d_kv): at most 7.5e-5 here; measured 4-6e-7.
  assert worst <= 2 * cfg.num_layers * 3 * math.sqrt(300) * tolerances.U32 * 4
  # export round trip: transformers reads diffjax's folder back bit for bit
  assert_exports_back(m, params, ref, tmp_path / 'back')


@pytest.mark.reference
def test_the_encoder_of_a_t5_for_generation_loads(tmp_path):
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  cfg = transformers.T5Config(**T5_REFERENCE_CONFIGS['gated_gelu'], dropout_rate=0.0)
  full = jiggle(transformers.T5ForConditionalGeneration(cfg))
  full.save_pretrained(tmp_path / 'full')  # shared, encoder.*, decoder.*, lm_head: the decoder is ignored
  m, params = load_pretrained(tmp_path / 'full')
  ids = np.random.default_rng(0).integers(2, 1000, (1, 20))
  with torch.no_grad():
    want = full.encoder(torch.from_numpy(ids)).last_hidden_state.numpy()
  got = np.asarray(jax.jit(m.apply)({'params': params}, ids).last_hidden_state)
  assert np.abs(got - want).max() <= 2 * cfg.num_layers * 3 * math.sqrt(48) * tolerances.U32 * 4 * np.abs(want).max()
  # a file that names the token table encoder.embed_tokens.weight (tied in transformers) loads the same
  file = tmp_path / 'full' / 'model.safetensors'
  state = read_weights(str(file))
  state['encoder.embed_tokens.weight'] = state.pop('shared.weight')
  write_safetensors(str(file), state)
  m2, params2 = load_pretrained(tmp_path / 'full')
  np.testing.assert_array_equal(np.asarray(params2['shared']['embedding']), np.asarray(params['shared']['embedding']))
