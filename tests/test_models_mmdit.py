"""MMDiT (diffjax.models.mmdit): SD3 / SD3.5's transformer against diffusers' SD3Transformer2DModel."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tolerances
from reference_models import assert_exports_back, jiggle

from diffjax.convert import load_pretrained, save_pretrained
from diffjax.convert.keys import WeightMismatchError
from diffjax.models.mmdit import MMDIT_CONFIGS, MMDiT, MMDiTConfig, init_mmdit

TINY = dict(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=12,
            pos_embed_max_size=16)
VARIANTS = {'sd3': {}, 'sd35': dict(qk_norm='rms_norm', dual_attention_layers=(0,))}


def test_the_position_table_is_cropped_at_the_centre_and_bounded():
  m = MMDiT(MMDIT_CONFIGS['tiny'])
  params = init_mmdit(m, jax.random.key(0))
  table = np.asarray(params['pos_embed']['pos_embed']).reshape(16, 16, -1)
  zero = jax.tree.map(jnp.zeros_like, params)
  zero['pos_embed']['pos_embed'] = params['pos_embed']['pos_embed']
  # with every weight zero but the table, the patch embedding is the cropped table itself
  from diffjax.models.mmdit import _PatchEmbed
  embed = _PatchEmbed(m.config).apply({'params': zero['pos_embed']}, jnp.zeros((1, 8, 12, 4)))
  np.testing.assert_array_equal(np.asarray(embed[0]).reshape(4, 6, -1), table[6:10, 5:11])  # rows 6.., cols 5..
  with pytest.raises(ValueError, match='17x4 patches: more than the position table serves'):
    m.apply({'params': params}, jnp.zeros((1, 34, 8, 4)), jnp.zeros(1), jnp.zeros((1, 3, 16)), jnp.zeros((1, 12)))
  with pytest.raises(ValueError, match='caption_projection_dim'):
    MMDiTConfig(caption_projection_dim=100)


@pytest.mark.reference
@pytest.mark.parametrize('variant', list(VARIANTS))
def test_mmdit_matches_diffusers(variant, tmp_path):
  torch = pytest.importorskip('torch')
  diffusers = pytest.importorskip('diffusers')
  ref = jiggle(diffusers.SD3Transformer2DModel(**TINY, **VARIANTS[variant]))
  ref.save_pretrained(tmp_path / 'sd3')
  m, params = load_pretrained(tmp_path / 'sd3')
  want_config = dataclasses.replace(MMDIT_CONFIGS['tiny'], **{
      'qk_norm': VARIANTS[variant].get('qk_norm'), 'dual_attention_layers': VARIANTS[variant].get(
          'dual_attention_layers', ())})
  assert isinstance(m, MMDiT) and m.config == want_config
  rng = np.random.default_rng(0)
  t = np.array([3.0, 987.5], np.float32)
  context = rng.standard_normal((2, 7, 16)).astype(np.float32)
  pooled = rng.standard_normal((2, 12)).astype(np.float32)
  worst = 0.0
  for height, width in ((8, 8), (8, 12)):  # the sample size and a wider latent (another crop of the table)
    x = rng.standard_normal((2, 4, height, width)).astype(np.float32)
    with torch.no_grad():
      want = ref(torch.from_numpy(x), torch.from_numpy(context), torch.from_numpy(pooled),
                 torch.from_numpy(t)).sample.numpy()
    got = np.asarray(jax.jit(m.apply)({'params': params}, x.transpose(0, 2, 3, 1), t, context, pooled))
    worst = max(worst, float(np.abs(got.transpose(0, 3, 1, 2) - want).max() / np.abs(want).max()))
  print(f'mmdit[{variant}] max abs diff / max |out| {worst:.2e}')
  # As for DiT: 2 L 3 sqrt(k) u per unit of output, k = 256 (the timestep sinusoid), 2 blocks, factor 3.
  assert worst <= 2 * 2 * 3 * math.sqrt(256) * tolerances.U32 * 3
  assert_exports_back(m, params, ref, tmp_path / 'back')


def test_an_sd35_checkpoint_under_an_sd3_config_is_one_error_naming_what_differs(tmp_path):
  import json
  sd35 = MMDiT(dataclasses.replace(MMDIT_CONFIGS['tiny'], qk_norm='rms_norm'))
  save_pretrained(sd35, init_mmdit(sd35, jax.random.key(0)), tmp_path / 'sd35')
  config = json.loads((tmp_path / 'sd35' / 'config.json').read_text())
  config['qk_norm'] = None
  (tmp_path / 'sd35' / 'config.json').write_text(json.dumps(config))
  with pytest.raises(WeightMismatchError, match='8 unexpected') as e:  # norm_q/k, norm_added_q/k of 2 blocks
    load_pretrained(tmp_path / 'sd35')
  assert str(tmp_path / 'sd35') in str(e.value) and 'transformer_blocks.0.attn.norm_added_k.weight' in str(e.value)
