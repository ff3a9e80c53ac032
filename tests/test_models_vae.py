"""Autoencoder: losses and shapes, and parity with diffusers' AutoencoderKL (tiny random models) and export."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tolerances

from diffjax.convert import load_pretrained, save_pretrained
from diffjax.models.vae import (
  VAE_CONFIGS,
  AutoencoderKL,
  DiagonalGaussian,
  PatchDiscriminator,
  hinge_d_loss,
  hinge_g_loss,
  init_vae,
  reconstruction_loss,
)

TINY = VAE_CONFIGS['tiny']


# -- unit tests ------------------------------------------------------------------------------------------------------
def test_shapes_dtypes_and_named_variant():
  vae = AutoencoderKL(TINY, dtype=jnp.bfloat16)
  params = jax.eval_shape(lambda: nn.meta.unbox(init_vae(vae, jax.random.key(0))))
  assert {p.dtype for p in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
  x = jnp.zeros((2, 16, 16, 3))
  post = jax.eval_shape(lambda p: vae.apply({'params': p}, x, method=vae.encode), params)
  assert post.mean.shape == (2, 8, 8, 4) and post.mean.dtype == jnp.bfloat16
  rec, _ = jax.eval_shape(lambda p: vae.apply({'params': p}, x, jax.random.key(0)), params)
  assert rec.shape == (2, 16, 16, 3)
  sd = jax.eval_shape(lambda: nn.meta.unbox(init_vae(AutoencoderKL(VAE_CONFIGS['sd']), jax.random.key(0))))
  assert sum(p.size for p in jax.tree.leaves(sd)) == 83_653_863  # diffusers' SD AutoencoderKL
  assert VAE_CONFIGS['sd'].downsample_factor == 8


def test_gaussian_kl_and_sampling():
  mean = jnp.full((1, 2, 2, 1), 0.5)
  logvar = jnp.full((1, 2, 2, 1), np.log(0.25))
  g = DiagonalGaussian(mean, logvar)
  want = 4 * 0.5 * (0.25 + 0.25 - 1 - np.log(0.25))  # 4 elements of KL(N(.5, .25) || N(0, 1))
  # 4 x (var + mean^2 - 1 - logvar) / 2 in float32: ~8 roundings and an exp (T), conditioning
  # sum|terms| / |sum| = (0.25 + 0.25 + 1 + 1.39) / 0.89 = 3.3: rtol 2.3e-6 (measured 1.9e-9 relative)
  cond = (0.25 + 0.25 + 1 - np.log(0.25)) / (0.25 + 0.25 - 1 - np.log(0.25))
  np.testing.assert_allclose(g.kl(), [want], rtol=tolerances.gamma(8 + tolerances.TRANSCENDENTAL_OPS) * cond)
  s = DiagonalGaussian(jnp.zeros((4000, 1, 1, 1)), jnp.full((4000, 1, 1, 1), np.log(4.0))).sample(jax.random.key(0))
  assert abs(float(s.std()) - 2.0) < 0.1
  assert DiagonalGaussian.from_moments(jnp.full((1, 1, 1, 2), 100.0)).logvar.max() == 20.0


def test_losses_and_discriminator():
  x = jnp.zeros((2, 4, 4, 3))
  r = x.at[0].set(0.5)
  np.testing.assert_allclose(reconstruction_loss(x, r, 'l1'), [0.5, 0.0])
  np.testing.assert_allclose(reconstruction_loss(x, r, 'l2'), [0.25, 0.0])
  with pytest.raises(ValueError):
    reconstruction_loss(x, r, 'l3')
  np.testing.assert_allclose(hinge_d_loss(jnp.array([2.0, 0.0]), jnp.array([-2.0, 0.0])), 0.5 * (0.5 + 0.5))
  np.testing.assert_allclose(hinge_g_loss(jnp.array([1.0, 3.0])), -2.0)
  d = PatchDiscriminator(channels=8, n_layers=2, groups=4)
  img = jnp.zeros((2, 32, 32, 3))
  out = jax.eval_shape(lambda: d.apply(d.init(jax.random.key(0), img), img))
  assert out.shape == (2, 6, 6, 1)  # 4x4 convs, padding 1: 32 -> 16 -> 8 (stride 2) -> 7 -> 6 (stride 1)


# -- parity with diffusers -------------------------------------------------------------------------------------------
PARITY_CONFIGS = {
    'two_levels': dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, latent_channels=4),
    # 3 levels (multipliers 1, 2, 2), 2 layers, 3 latent channels, no mid attention, 1 image channel
    'three_levels_no_attn': dict(in_channels=1, out_channels=1, block_out_channels=(8, 16, 16), layers_per_block=2,
                                 norm_num_groups=4, latent_channels=3, mid_block_add_attention=False),
}


def _torch_vae(name):
  torch = pytest.importorskip('torch')
  diffusers = pytest.importorskip('diffusers')
  torch.manual_seed(0)
  n = len(PARITY_CONFIGS[name]['block_out_channels'])
  m = diffusers.AutoencoderKL(down_block_types=('DownEncoderBlock2D',) * n, up_block_types=('UpDecoderBlock2D',) * n,
                              **PARITY_CONFIGS[name])
  with torch.no_grad():
    for p in m.parameters():
      p.add_(0.05 * torch.randn_like(p))
  return m.eval()


@pytest.mark.reference
@pytest.mark.parametrize('name', list(PARITY_CONFIGS))
def test_vae_matches_diffusers(name, tmp_path):
  import torch
  ref = _torch_vae(name)
  ref.save_pretrained(tmp_path / 'vae')
  vae, params = load_pretrained(tmp_path / 'vae')
  x = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, vae.config.in_channels)).astype(np.float32)

  @jax.jit
  def run(p, x):
    post = vae.apply({'params': p}, x, method=vae.encode)
    return post.mean, post.logvar, vae.apply({'params': p}, post.mean, method=vae.decode)

  mean, logvar, rec = run(params, x)
  with torch.no_grad():
    dist = ref.encode(torch.from_numpy(x).permute(0, 3, 1, 2)).latent_dist
    want_rec = ref.decode(dist.mean).sample
  nhwc = lambda a: a.permute(0, 2, 3, 1).numpy()
  diffs = {k: float(np.abs(np.asarray(a) - nhwc(b)).max())
           for k, a, b in (('mean', mean, dist.mean), ('logvar', logvar, dist.logvar), ('decode', rec, want_rec))}
  print(f'vae[{name}] max abs diff', {k: f'{v:.2e}' for k, v in diffs.items()})
  # tiny random VAE: per conv layer and side ~lambda sqrt(k) u = 3e-6 (k = 9 C_in <= 9 * 32, lambda = 3,
  # probabilistic bound) relative to the activation scale GroupNorm restores; as a random walk over ~20
  # layers of encode + decode and both sides, x sqrt(40): 1.9e-5 x max|activation| (a few) <= 1e-4
  # (measured <= 3.9e-6)
  assert max(diffs.values()) <= 1e-4


@pytest.mark.reference
def test_vae_export_roundtrip_to_diffusers(tmp_path):
  import torch
  from diffusers import AutoencoderKL as TorchVAE
  ref = _torch_vae('two_levels')
  ref.save_pretrained(tmp_path / 'a')
  save_pretrained(*load_pretrained(tmp_path / 'a'), tmp_path / 'b')
  back = TorchVAE.from_pretrained(tmp_path / 'b').eval()
  sa, sb = ref.state_dict(), back.state_dict()
  assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
  assert back.config.scaling_factor == ref.config.scaling_factor
  x = torch.randn(1, 3, 16, 16)
  with torch.no_grad():
    assert torch.equal(back(x).sample, ref(x).sample)
