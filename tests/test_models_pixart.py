"""PixArt (diffjax.models.pixart): adaLN-single and masked T5 cross-attention against diffusers."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tolerances
from reference_models import assert_exports_back, jiggle

from diffjax.convert import load_pretrained
from diffjax.models.pixart import PIXART_CONFIGS, PixArt, init_pixart

TINY = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
            cross_attention_dim=16, sample_size=8, patch_size=2, caption_channels=12, norm_num_groups=4)
# Sigma-like (no size conditioning) and alpha-1024-like (resolution and aspect-ratio embedders, interpolation 2)
VARIANTS = {'sigma': dict(use_additional_conditions=False),
            'alpha_sized': dict(attention_head_dim=6, cross_attention_dim=12, use_additional_conditions=True,
                                interpolation_scale=2)}


def test_padded_caption_tokens_barely_reach_the_image():
  """A padded T5 token's logit gets -10000 added (diffusers' mask): its weight is below e^-9000, so changing
  a padded token's state moves the output by no more than float32 rounding."""
  m = PixArt(PIXART_CONFIGS['tiny'])
  params = init_pixart(m, jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (1, 8, 8, 4))
  caption = jax.random.normal(jax.random.key(2), (1, 6, 12))
  mask = jnp.array([[1, 1, 1, 1, 0, 0]])
  run = jax.jit(lambda c, mk: m.apply({'params': params}, x, jnp.array([500.0]), c, mk))
  a, b = run(caption, mask), run(caption.at[:, 4:].set(7.0), mask)
  scale = float(jnp.abs(a).max())
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=tolerances.gamma(64) * scale)
  assert float(jnp.abs(run(caption.at[:, 4:].set(7.0), None) - a).max()) > 1e-3 * scale  # unmasked: it counts
  sized = PixArt(dataclasses.replace(PIXART_CONFIGS['tiny'], use_additional_conditions=True, head_dim=6,
                                     cross_attention_dim=12))
  with pytest.raises(ValueError, match='pass resolution'):
    sized.init(jax.random.key(0), x, jnp.zeros(1), caption)


@pytest.mark.reference
@pytest.mark.parametrize('variant', list(VARIANTS))
def test_pixart_matches_diffusers(variant, tmp_path):
  torch = pytest.importorskip('torch')
  diffusers = pytest.importorskip('diffusers')
  ref = jiggle(diffusers.PixArtTransformer2DModel(**(TINY | VARIANTS[variant])))
  ref.save_pretrained(tmp_path / 'pixart')
  m, params = load_pretrained(tmp_path / 'pixart')
  assert isinstance(m, PixArt)
  rng = np.random.default_rng(0)
  t = np.array([3, 999])
  caption = rng.standard_normal((2, 6, 12)).astype(np.float32)
  mask = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
  sizes = {}
  if VARIANTS[variant]['use_additional_conditions']:
    sizes = dict(resolution=np.array([[64.0, 96.0]] * 2, np.float32), aspect_ratio=np.array([[1.5]] * 2, np.float32))
  worst = 0.0
  for height, width in ((8, 8), (8, 12)):  # the sample size and another grid (its own position table)
    x = rng.standard_normal((2, 4, height, width)).astype(np.float32)
    with torch.no_grad():
      added = {k: torch.from_numpy(v) for k, v in sizes.items()}
      want = ref(torch.from_numpy(x), encoder_hidden_states=torch.from_numpy(caption), timestep=torch.from_numpy(t),
                 added_cond_kwargs=added if added else None,
                 encoder_attention_mask=torch.from_numpy(mask)).sample.numpy()
    got = np.asarray(jax.jit(m.apply)({'params': params}, x.transpose(0, 2, 3, 1), t, caption, mask, **sizes))
    worst = max(worst, float(np.abs(got.transpose(0, 3, 1, 2) - want).max() / np.abs(want).max()))
  print(f'pixart[{variant}] max abs diff / max |out| {worst:.2e}')
  # As for DiT: 2 L 3 sqrt(k) u per unit of output, k = 256 (the timestep sinusoid), 2 blocks, factor 3.
  assert worst <= 2 * 2 * 3 * math.sqrt(256) * tolerances.U32 * 3
  assert_exports_back(m, params, ref, tmp_path / 'back')
