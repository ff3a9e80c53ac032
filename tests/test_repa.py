"""Representation alignment's pieces (diffjax/train/repa.py) against their definitions; the training step with it
is tested on a trained tiny VAE in test_latent.py."""

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffjax.models import layers
from diffjax.models import vae as vae_lib
from diffjax.models.mmdit import MMDiT, MMDiTConfig
from diffjax.pipelines import vae as vae_codec
from diffjax.train import repa


def test_alignment_is_the_negative_mean_cosine_similarity():
  a = jax.random.normal(jax.random.key(0), (3, 5, 8))
  b = jax.random.normal(jax.random.key(1), (3, 5, 8))
  assert np.allclose(repa.alignment(a, 2.5 * a), -1.0, atol=1e-6)  # same direction, any scale
  assert np.allclose(repa.alignment(a, -a), 1.0, atol=1e-6)
  e0, e1 = jnp.eye(8)[0], jnp.eye(8)[1]
  assert np.allclose(repa.alignment(jnp.broadcast_to(e0, (2, 4, 8)), jnp.broadcast_to(e1, (2, 4, 8))), 0.0)
  an, bn = np.asarray(a, np.float64), np.asarray(b, np.float64)
  cos = (an * bn).sum(-1) / np.linalg.norm(an, axis=-1) / np.linalg.norm(bn, axis=-1)
  # float32 dot products of 8 terms and two norms: a few ulps of 1
  np.testing.assert_allclose(repa.alignment(a, b), -cos.mean(-1), atol=1e-6)


def test_pooled_tokens_are_patch_means_in_the_transformers_token_order():
  """Token k of an MMDiT with patch p covers latent rows (k // (w/p)) * p ... and columns (k % (w/p)) * p ...
  (models.mmdit's patch embedding); the pooled target of token k is that patch's mean feature."""
  f = np.asarray(jax.random.normal(jax.random.key(2), (2, 8, 6, 3)))
  p = 2
  pooled = np.asarray(repa.pooled_tokens(jnp.asarray(f), p))
  assert pooled.shape == (2, 12, 3)
  for k, (r, c) in enumerate(itertools.product(range(4), range(3))):
    np.testing.assert_allclose(pooled[:, k], f[:, r * p:(r + 1) * p, c * p:(c + 1) * p].mean(axis=(1, 2)), atol=1e-6)
  np.testing.assert_array_equal(repa.pooled_tokens(jnp.asarray(f), 1), f.reshape(2, 48, 3))
  # the same order as the transformer's: a feature map that is a patch's index everywhere in it pools to 0, 1, ...
  index = np.repeat(np.repeat(np.arange(12.0).reshape(4, 3), p, 0), p, 1)[None, :, :, None]
  np.testing.assert_array_equal(repa.pooled_tokens(jnp.asarray(index), p)[0, :, 0], np.arange(12.0))
  net = MMDiT(MMDiTConfig(sample_size=8, patch_size=p, in_channels=1, out_channels=1, num_layers=1, head_dim=8,
                          num_heads=1, joint_attention_dim=8, caption_projection_dim=8, pooled_projection_dim=8,
                          pos_embed_max_size=4))
  x = jnp.asarray(np.arange(64.0).reshape(1, 8, 8, 1) ** 1.5)  # every patch has another mean
  context, pooled_text = jnp.zeros((1, 2, 8)), jnp.zeros((1, 8))
  params = nn.meta.unbox(net.init(jax.random.key(0), x, jnp.zeros((1,)), context, pooled_text)["params"])
  # the patch embedding with a kernel that sums the patch and no position table: its token k is patch k's sum
  embed = params["pos_embed"]
  summing = {**params, "pos_embed": {"proj": {"kernel": jnp.ones_like(embed["proj"]["kernel"]),
                                              "bias": jnp.zeros_like(embed["proj"]["bias"])},
                                     "pos_embed": jnp.zeros_like(embed["pos_embed"])}}
  _, state = net.apply({"params": summing}, x, jnp.zeros((1,)), context, pooled_text, mutable=["intermediates"],
                       capture_intermediates=lambda m, _: m.name == "pos_embed")
  (tokens,) = state["intermediates"]["pos_embed"]["__call__"]  # (1, N, width), the module's own token order
  np.testing.assert_allclose(tokens[0, :, 0] / p**2, repa.pooled_tokens(x, p)[0, :, 0], rtol=1e-6)


def test_vae_features_are_what_the_encoder_turns_into_its_moments():
  """The sown features h give the encoder's output: conv_out(silu(conv_norm_out(h))) = the moments before
  quant_conv (one more evaluation of the same layers: float32 rounding of a 3 x 3 x 32 convolution); the pass that
  returns them returns the same posterior as the plain one."""
  config = vae_lib.VAE_CONFIGS["tiny"]
  vae = vae_lib.AutoencoderKL(config)
  x = jax.random.uniform(jax.random.key(3), (2, 16, 16, 3), minval=-1, maxval=1)
  params = vae.init(jax.random.key(4), x)["params"]
  mean, std, features = vae_codec.posterior(vae, params, x, features=True)
  assert features.shape == (2, 8, 8, config.block_out_channels[-1])
  for a, b in zip((mean, std), vae_codec.posterior(vae, params, x), strict=True):
    np.testing.assert_array_equal(a, b)
  enc = params["encoder"]
  kw = dict(dtype=jnp.float32, param_dtype=jnp.float32)
  h = jax.nn.silu(layers.group_norm(config.norm_num_groups, 1e-6, **kw).apply({"params": enc["conv_norm_out"]},
                                                                             features))
  moments = layers.conv(2 * config.latent_channels, 3, **kw).apply({"params": enc["conv_out"]}, h)
  direct = vae_lib.Encoder(config).apply({"params": enc}, x)
  np.testing.assert_allclose(moments, direct, atol=1e-5 * float(jnp.max(jnp.abs(direct))))
