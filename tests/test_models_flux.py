"""Flux (diffjax.models.flux): packing, rotary positions, parity with diffusers' FluxTransformer2DModel."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tolerances
from reference_models import assert_exports_back, flux_outputs, jiggle

from diffjax.convert import load_pretrained, save_pretrained
from diffjax.convert.keys import WeightMismatchError
from diffjax.models.flux import (
    FLUX_CONFIGS,
    Flux,
    apply_rotary,
    image_ids,
    init_flux,
    pack_latents,
    rotary_angles,
    rotary_for,
    unpack_latents,
)

TINY = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=12, pooled_projection_dim=10, axes_dims_rope=(2, 2, 4))


def test_packing_puts_each_2x2_patch_in_channel_row_col_order_and_inverts():
  z = np.arange(2 * 4 * 6 * 3, dtype=np.float32).reshape(2, 4, 6, 3)  # NHWC
  tokens = np.asarray(pack_latents(jnp.asarray(z)))
  assert tokens.shape == (2, 6, 12)
  # token (row 1, col 2) of batch 1 holds z[1, 2:4, 4:6, :] with channel c*4 + ph*2 + pw
  want = np.array([z[1, 2 + ph, 4 + pw, c] for c in range(3) for ph in range(2) for pw in range(2)])
  np.testing.assert_array_equal(tokens[1, 1 * 3 + 2], want)
  np.testing.assert_array_equal(np.asarray(unpack_latents(jnp.asarray(tokens), 4, 6)), z)
  ids = image_ids(2, 3)
  np.testing.assert_array_equal(ids[4], [0, 1, 1])


def test_rotary_positions_rotate_pairs_by_position_differences():
  """Rotating q by position i and k by j makes their dot product depend on i - j only (per axis)."""
  rng = np.random.default_rng(0)
  q, k = (jnp.asarray(rng.standard_normal((1, 1, 1, 8)), jnp.float32) for _ in range(2))
  def score(i, j):
    ids = np.array([[0, i, 2 * i], [0, j, 2 * j]], np.float32)
    cos, sin = rotary_angles(ids, (2, 2, 4))
    qi = apply_rotary(q, cos[:1], sin[:1])
    kj = apply_rotary(k, cos[1:], sin[1:])
    return float(jnp.sum(qi * kj))
  bound = tolerances.gamma(8 + 2 * tolerances.TRANSCENDENTAL_OPS) * 4 * float(jnp.abs(q).sum() * jnp.abs(k).max())
  assert abs(score(3, 1) - score(7, 5)) <= bound
  assert abs(score(3, 1) - score(3, 2)) > 1e-3  # a different offset, another score
  cos, sin = rotary_angles(np.array([[0.0, 0.0, 0.0]]), (2, 2, 4))
  np.testing.assert_array_equal(cos, 1.0)  # position 0: no rotation
  np.testing.assert_array_equal(sin, 0.0)
  with pytest.raises(ValueError, match='rotary'):
    Flux(FLUX_CONFIGS['tiny']).init(jax.random.key(0), jnp.zeros((1, 4, 16)), jnp.zeros(1), jnp.zeros((1, 3, 12)),
                                    jnp.zeros((1, 10)), rotary_for(FLUX_CONFIGS['tiny'], image_ids(1, 4),
                                                                   np.zeros((2, 3))), jnp.zeros(1))


@pytest.mark.reference
@pytest.mark.parametrize('guidance', [True, False])
def test_flux_matches_diffusers(guidance, tmp_path):
  pytest.importorskip('torch')
  diffusers = pytest.importorskip('diffusers')
  ref = jiggle(diffusers.FluxTransformer2DModel(**TINY, guidance_embeds=guidance))
  ref.save_pretrained(tmp_path / 'flux')
  m, params = load_pretrained(tmp_path / 'flux')
  assert isinstance(m, Flux) and m.config.guidance_embeds == guidance
  rng = np.random.default_rng(0)
  latents = rng.standard_normal((2, 8, 12, 4)).astype(np.float32)  # packs to 4 x 6 tokens of 16 channels
  tokens = np.asarray(pack_latents(jnp.asarray(latents)))
  img_ids, txt_ids = image_ids(4, 6), np.zeros((7, 3), np.float32)
  context = rng.standard_normal((2, 7, 12)).astype(np.float32)
  pooled = rng.standard_normal((2, 10)).astype(np.float32)
  t = np.array([0.25, 0.9], np.float32)
  scale = np.array([3.5, 1.0], np.float32) if guidance else None
  got, want = flux_outputs(ref, m, params, tokens, context, pooled, t, scale, img_ids, txt_ids)
  worst = float(np.abs(got - want).max() / np.abs(want).max())
  print(f'flux[guidance={guidance}] max abs diff / max |out| {worst:.2e}')
  # As for DiT: 2 L 3 sqrt(k) u per unit of output, k = 256 (the timestep sinusoid), 3 blocks, factor 3.
  assert worst <= 2 * 3 * 3 * math.sqrt(256) * tolerances.U32 * 3
  assert_exports_back(m, params, ref, tmp_path / 'back')
  assert init_flux(m, jax.random.key(0)).keys() == params.keys()


def test_a_checkpoint_of_another_variant_is_one_error_naming_what_differs(tmp_path):
  """A FLUX.1 [dev] file under a [schnell] config (no guidance embedder), and the reverse."""
  import json
  dev = Flux(FLUX_CONFIGS['tiny'])
  save_pretrained(dev, init_flux(dev, jax.random.key(0)), tmp_path / 'dev')
  config = json.loads((tmp_path / 'dev' / 'config.json').read_text())
  config['guidance_embeds'] = False
  (tmp_path / 'dev' / 'config.json').write_text(json.dumps(config))
  with pytest.raises(WeightMismatchError, match='4 unexpected') as e:
    load_pretrained(tmp_path / 'dev')
  assert str(tmp_path / 'dev') in str(e.value) and 'time_text_embed.guidance_embedder.linear_1.weight' in str(e.value)
  config['guidance_embeds'] = True
  config['num_single_layers'] = 3  # a file with fewer blocks than its config says
  (tmp_path / 'dev' / 'config.json').write_text(json.dumps(config))
  with pytest.raises(WeightMismatchError, match='missing') as e:
    load_pretrained(tmp_path / 'dev')
  assert 'single_transformer_blocks.2.proj_out.weight' in str(e.value)
