"""The Stable Diffusion KL autoencoder (Rombach et al. 2022, diffusers' ``AutoencoderKL``), NHWC.

Images (B, H, W, in_channels) in [-1, 1] are encoded to a diagonal Gaussian over
latents (B, H/f, W/f, latent_channels), f = 2 ** (levels - 1) (SD: f = 8, 4 channels).
The diffusion model works on ``scaling_factor * (z - shift_factor)`` (SD: 0.18215, 0).

Training losses (``reconstruction_loss``, ``DiagonalGaussian.kl``, ``PatchDiscriminator``
with ``hinge_d_loss`` / ``hinge_g_loss``) follow the LDM autoencoder recipe; combining
and weighting them is the trainer's business.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from diffjax.models.layers import (
  Downsample,
  Dtype,
  ResnetBlock,
  SpatialSelfAttention,
  Upsample,
  conv,
  group_norm,
)

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """Architecture of an ``AutoencoderKL``; ``block_out_channels`` from the highest resolution down."""

  in_channels: int = 3
  out_channels: int = 3
  latent_channels: int = 4
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  norm_num_groups: int = 32
  mid_block_attention: bool = True
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  scaling_factor: float = 0.18215
  shift_factor: float = 0.0

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)


VAE_CONFIGS: dict[str, VAEConfig] = {
    'tiny': VAEConfig(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8),
    'sd': VAEConfig(),  # SD 1.x and 2.x share the autoencoder architecture
}


@struct.dataclass
class DiagonalGaussian:
  """N(mean, exp(logvar)) per latent element; arrays (B, h, w, C). ``logvar`` clipped to [-30, 20]."""

  mean: Array
  logvar: Array

  @classmethod
  def from_moments(cls, moments: Array) -> DiagonalGaussian:
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return cls(mean, jnp.clip(logvar, -30.0, 20.0))

  @property
  def std(self) -> Array:
    return jnp.exp(0.5 * self.logvar)

  def sample(self, key: Array) -> Array:
    return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)

  def mode(self) -> Array:
    return self.mean

  def kl(self) -> Array:
    """KL(q || N(0, I)) summed over the latent, (B,)."""
    m, lv = self.mean.astype(jnp.float32), self.logvar.astype(jnp.float32)
    return 0.5 * jnp.sum(m**2 + jnp.exp(lv) - 1.0 - lv, axis=(1, 2, 3))


def _res(remat: bool):
  return nn.remat(ResnetBlock, static_argnums=(3,)) if remat else ResnetBlock


class _MidBlock(nn.Module):
  channels: int
  groups: int
  attention: bool
  remat: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, h):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = _res(self.remat)(self.channels, self.groups, 1e-6, name='resnets_0', **kw)(h, None, True)
    if self.attention:
      h = SpatialSelfAttention(None, self.groups, 1e-6, name='attentions_0', **kw)(h)
    return _res(self.remat)(self.channels, self.groups, 1e-6, name='resnets_1', **kw)(h, None, True)


class _Level(nn.Module):
  """``num_layers`` ResNet blocks then an optional resampler (names ``resnets_j``, ``down/upsamplers_0``)."""

  channels: int
  num_layers: int
  groups: int
  resample: str | None  # 'down', 'up' or None
  remat: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, h):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    for j in range(self.num_layers):
      h = _res(self.remat)(self.channels, self.groups, 1e-6, name=f'resnets_{j}', **kw)(h, None, True)
    if self.resample == 'down':
      h = Downsample(self.channels, 0, name='downsamplers_0', **kw)(h)
    elif self.resample == 'up':
      h = Upsample(self.channels, name='upsamplers_0', **kw)(h)
    return h


class Encoder(nn.Module):
  """(B, H, W, in_channels) -> (B, H/f, W/f, 2 * latent_channels) moments (before ``quant_conv``)."""

  config: VAEConfig
  remat: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    n = len(c.block_out_channels)
    h = conv(c.block_out_channels[0], 3, name='conv_in', **kw)(x.astype(self.dtype))
    for i, ch in enumerate(c.block_out_channels):
      h = _Level(ch, c.layers_per_block, c.norm_num_groups, 'down' if i < n - 1 else None, self.remat,
                 name=f'down_blocks_{i}', **kw)(h)
    h = _MidBlock(c.block_out_channels[-1], c.norm_num_groups, c.mid_block_attention, self.remat, name='mid_block',
                  **kw)(h)
    self.sow('intermediates', 'features', h)  # (B, H/f, W/f, last channels): REPA's targets (train/repa.py)
    h = nn.silu(group_norm(c.norm_num_groups, 1e-6, name='conv_norm_out', **kw)(h))
    return conv(2 * c.latent_channels, 3, name='conv_out', **kw)(h)


class Decoder(nn.Module):
  """(B, h, w, latent_channels) -> (B, h*f, w*f, out_channels) (after ``post_quant_conv``)."""

  config: VAEConfig
  remat: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    chans = c.block_out_channels[::-1]
    h = conv(chans[0], 3, name='conv_in', **kw)(z.astype(self.dtype))
    h = _MidBlock(chans[0], c.norm_num_groups, c.mid_block_attention, self.remat, name='mid_block', **kw)(h)
    for i, ch in enumerate(chans):
      h = _Level(ch, c.layers_per_block + 1, c.norm_num_groups, 'up' if i < len(chans) - 1 else None, self.remat,
                 name=f'up_blocks_{i}', **kw)(h)
    h = nn.silu(group_norm(c.norm_num_groups, 1e-6, name='conv_norm_out', **kw)(h))
    return conv(c.out_channels, 3, name='conv_out', **kw)(h)


class AutoencoderKL(nn.Module):
  """KL-regularised autoencoder.

  Methods (use with ``module.apply(variables, ..., method=...)``):
    ``encode(x)``: x (B, H, W, in_channels) in [-1, 1] -> ``DiagonalGaussian`` over (B, H/f, W/f, latent).
    ``decode(z)``: z (B, h, w, latent) (unscaled) -> (B, h*f, w*f, out_channels).
    ``__call__(x, key=None)``: reconstruction from a posterior sample (or its mean when key
      is None) and the posterior.
  Divide/multiply by ``config.scaling_factor`` (after subtracting ``shift_factor``) to
  go between VAE latents and diffusion latents.
  """

  config: VAEConfig
  remat: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.encoder = Encoder(c, self.remat, **kw)
    self.decoder = Decoder(c, self.remat, **kw)
    if c.use_quant_conv:
      self.quant_conv = conv(2 * c.latent_channels, 1, **kw)
    if c.use_post_quant_conv:
      self.post_quant_conv = conv(c.latent_channels, 1, **kw)

  def encode(self, x: Array) -> DiagonalGaussian:
    h = self.encoder(x)
    if self.config.use_quant_conv:
      h = self.quant_conv(h)
    return DiagonalGaussian.from_moments(h)

  def decode(self, z: Array) -> Array:
    z = z.astype(self.dtype)
    if self.config.use_post_quant_conv:
      z = self.post_quant_conv(z)
    return self.decoder(z)

  def __call__(self, x: Array, key: Array | None = None) -> tuple[Array, DiagonalGaussian]:
    posterior = self.encode(x)
    z = posterior.mode() if key is None else posterior.sample(key)
    return self.decode(z), posterior


def init_vae(vae: AutoencoderKL, key: Array, size: int = 8) -> dict:
  """Initialises ``vae`` on a dummy (1, size, size, in_channels) image; returns the (boxed) params."""
  return jax.jit(vae.init)(key, jnp.zeros((1, size, size, vae.config.in_channels)))['params']


# -- training losses -----------------------------------------------------------------------------------
def reconstruction_loss(x: Array, recon: Array, kind: str = 'l1') -> Array:
  """Per-example pixel reconstruction loss, mean over (H, W, C): 'l1' |x - x'| or 'l2' (x - x')^2. -> (B,)."""
  d = recon.astype(jnp.float32) - x.astype(jnp.float32)
  if kind == 'l1':
    d = jnp.abs(d)
  elif kind == 'l2':
    d = jnp.square(d)
  else:
    raise ValueError(f"kind must be 'l1' or 'l2', got {kind!r}")
  return jnp.mean(d, axis=tuple(range(1, d.ndim)))


class PatchDiscriminator(nn.Module):
  """PatchGAN discriminator (Isola et al. 2017): (B, H, W, C) -> (B, H', W', 1) real/fake logits per patch.

  4x4 convolutions: ``channels`` then ``n_layers`` stride-2 layers doubling width (capped at
  8x), one stride-1 layer, and a 1-channel head; LeakyReLU(0.2). GroupNorm replaces the
  original BatchNorm so the model has no batch statistics (pure, shardable).
  """

  channels: int = 64
  n_layers: int = 3
  groups: int = 32
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    pad = ((1, 1), (1, 1))
    h = nn.leaky_relu(conv(self.channels, 4, stride=2, padding=pad, **kw)(x.astype(self.dtype)), 0.2)
    for i in range(1, self.n_layers + 1):
      width = self.channels * min(2**i, 8)
      stride = 2 if i < self.n_layers else 1
      h = conv(width, 4, stride=stride, padding=pad, **kw)(h)
      h = nn.leaky_relu(group_norm(min(self.groups, width), 1e-5, **kw)(h), 0.2)
    return conv(1, 4, padding=pad, **kw)(h)


def hinge_d_loss(logits_real: Array, logits_fake: Array) -> Array:
  """Discriminator hinge loss 0.5 (E relu(1 - D(x)) + E relu(1 + D(x'))), scalar."""
  return 0.5 * (jnp.mean(nn.relu(1.0 - logits_real)) + jnp.mean(nn.relu(1.0 + logits_fake)))


def hinge_g_loss(logits_fake: Array) -> Array:
  """Generator (autoencoder) adversarial loss -E D(x'), scalar."""
  return -jnp.mean(logits_fake)
