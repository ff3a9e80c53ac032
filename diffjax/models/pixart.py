"""PixArt-alpha / PixArt-Sigma (Chen et al. 2023, 2024): a DiT with adaLN-single and T5 cross-attention, as
diffusers' ``PixArtTransformer2DModel`` computes it.

* ``pos_embed``: p x p patches plus the 2-D sin-cos table of the token grid (``dit.sincos_position_table``;
  base ``sample_size / p``, ``interpolation_scale`` default max(sample_size // 64, 1)).
* ``adaln_single``: one timestep MLP for the whole network (``emb``; at 1024 px also sinusoid MLPs of
  the image's (height, width) and aspect ratio, ``use_additional_conditions``), ``linear`` of its
  SiLU -> 6 D; each block adds its own learned ``scale_shift_table`` (6, D) to get shift, scale and
  gate for self-attention and the MLP.
* Blocks: self-attention on the modulated norm, cross-attention to the T5 tokens (no norm before
  it; padded tokens get -10000 added to their logits, as diffusers' mask), tanh-GELU MLP.
* ``caption_projection``: a tanh-GELU MLP from T5's width to D. Output: the network's
  ``scale_shift_table`` (2, D) plus the timestep embedding give the final shift and scale.

Images are NHWC: ``__call__(x (B, H, W, C), t (B,) in [0, 1000), caption (B, L, caption_channels),
caption_mask (B, L) 1/0 or None, resolution (B, 2) and aspect_ratio (B, 1) with additional
conditions)`` -> (B, H, W, out_channels) (learned variance: out = 2 C, the first C the noise).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffjax.models.dit import PatchEmbed, modulate, unpatchify
from diffjax.models.layers import (
    Attention,
    Dtype,
    FeedForward,
    TimestepMLP,
    dense,
    timestep_embedding,
)

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class PixArtConfig:
  """Sizes of a PixArt transformer; the defaults are PixArt-Sigma at 1024 px (``PixArt-Sigma-XL-2-1024-MS``)."""

  num_heads: int = 16
  head_dim: int = 72
  in_channels: int = 4
  out_channels: int | None = 8  # None: in_channels
  num_layers: int = 28
  cross_attention_dim: int = 1152
  sample_size: int = 128
  patch_size: int = 2
  caption_channels: int = 4096  # T5 v1.1 XXL's width
  interpolation_scale: float | None = None  # None: max(sample_size // 64, 1)
  use_additional_conditions: bool | None = None  # None: sample_size == 128 (PixArt-alpha 1024's)
  norm_eps: float = 1e-6
  attention_bias: bool = True

  @property
  def width(self) -> int:
    return self.num_heads * self.head_dim

  @property
  def outputs(self) -> int:
    return self.in_channels if self.out_channels is None else self.out_channels

  @property
  def position_scale(self) -> float:
    return self.interpolation_scale if self.interpolation_scale is not None else max(self.sample_size // 64, 1)

  @property
  def size_conditioned(self) -> bool:
    return self.sample_size == 128 if self.use_additional_conditions is None else self.use_additional_conditions


PIXART_CONFIGS: dict[str, PixArtConfig] = {
    'tiny': PixArtConfig(num_heads=2, head_dim=8, num_layers=2, cross_attention_dim=16, sample_size=8,
                         caption_channels=12),
    'pixart_sigma_1024': PixArtConfig(use_additional_conditions=False),
    'pixart_alpha_1024': PixArtConfig(),
    'pixart_alpha_512': PixArtConfig(sample_size=64),
}


class _TimestepSizeEmbedding(nn.Module):  # diffusers' PixArtAlphaCombinedTimestepSizeEmbeddings
  config: PixArtConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, t: Array, resolution: Array | None, aspect_ratio: Array | None) -> Array:
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    sinusoid = lambda v: timestep_embedding(v, 256, flip_sin_to_cos=True).astype(self.dtype)
    emb = TimestepMLP(c.width, name='timestep_embedder', **kw)(sinusoid(t))
    if not c.size_conditioned:
      return emb
    if resolution is None or aspect_ratio is None:
      raise ValueError('this PixArt is conditioned on the image size: pass resolution (B, 2) and aspect_ratio (B, 1)')
    b = t.shape[0]
    size = TimestepMLP(c.width // 3, name='resolution_embedder', **kw)(sinusoid(resolution.reshape(-1)))
    ratio = TimestepMLP(c.width // 3, name='aspect_ratio_embedder', **kw)(sinusoid(aspect_ratio.reshape(-1)))
    return emb + jnp.concatenate([size.reshape(b, -1), ratio.reshape(b, -1)], axis=1)


class _AdaLayerNormSingle(nn.Module):
  """(t, sizes) -> (the 6 D modulation every block offsets, the timestep embedding (B, D))."""

  config: PixArtConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, t, resolution, aspect_ratio):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    emb = _TimestepSizeEmbedding(self.config, name='emb', **kw)(t, resolution, aspect_ratio)
    return dense(6 * self.config.width, name='linear', **kw)(nn.silu(emb)), emb


class _CaptionProjection(nn.Module):  # diffusers' PixArtAlphaTextProjection with tanh GELU
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    return dense(self.features, name='linear_2', **kw)(
        nn.gelu(dense(self.features, name='linear_1', **kw)(x), approximate=True))


class PixArtBlock(nn.Module):
  """(x (B, N, D), caption (B, L, D), its logit bias, the 6 D modulation (B, 6 D)) -> x."""

  config: PixArtConfig
  attention_impl: str | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, caption, caption_bias, modulation):
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    table = self.param('scale_shift_table', lambda key, shape, dtype: jax.random.normal(key, shape, dtype)
                       / c.width ** 0.5, (6, c.width), self.param_dtype)
    mods = table[None].astype(modulation.dtype) + modulation.reshape(-1, 6, c.width)
    shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = (mods[:, i:i + 1] for i in range(6))
    h = modulate(x, shift, scale, c.norm_eps)
    x = x + gate * Attention(c.num_heads, c.head_dim, qkv_bias=c.attention_bias, implementation=self.attention_impl,
                             name='attn1', **kw)(h)
    x = x + Attention(c.num_heads, c.head_dim, qkv_bias=c.attention_bias, implementation=self.attention_impl,
                      name='attn2', **kw)(x, caption, caption_bias)  # no norm before it, as diffusers
    h = modulate(x, shift_mlp, scale_mlp, c.norm_eps)
    return x + gate_mlp * FeedForward(activation='gelu-approximate', name='ff', **kw)(h)


class PixArt(nn.Module):
  """PixArt on NHWC latents (module docstring).

  ``remat``: gradient checkpointing of every block; ``attention_impl``: a ``models.attention``
  implementation name (None: 'auto').
  """

  config: PixArtConfig
  remat: bool = False
  attention_impl: str | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, t: Array, caption: Array, caption_mask: Array | None = None,
               resolution: Array | None = None, aspect_ratio: Array | None = None) -> Array:
    c = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, height, width, channels = x.shape
    p = c.patch_size
    if channels != c.in_channels or height % p or width % p:
      raise ValueError(f'PixArt takes (B, H, W, {c.in_channels}) with H and W multiples of {p}, got {x.shape}')
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (b,))
    h = PatchEmbed(c.width, p, c.sample_size // p, c.position_scale, name='pos_embed', **kw)(x)
    modulation, emb = _AdaLayerNormSingle(c, name='adaln_single', **kw)(t, resolution, aspect_ratio)
    caption = _CaptionProjection(c.width, name='caption_projection', **kw)(caption.astype(self.dtype))
    bias = None
    if caption_mask is not None:  # as diffusers: (1 - mask) * -10000 on the padded tokens' logits
      bias = ((1.0 - caption_mask.astype(jnp.float32)) * -10000.0)[:, None, None, :]
    block = nn.remat(PixArtBlock) if self.remat else PixArtBlock
    for i in range(c.num_layers):
      h = block(c, self.attention_impl, name=f'transformer_blocks_{i}', **kw)(h, caption, bias, modulation)
    table = self.param('scale_shift_table', lambda key, shape, dtype: jax.random.normal(key, shape, dtype)
                       / c.width ** 0.5, (2, c.width), self.param_dtype)
    mods = table[None].astype(emb.dtype) + emb[:, None]  # (B, 2, D): shift, then scale
    shift, scale = mods[:, 0:1], mods[:, 1:2]
    h = modulate(h, shift, scale)
    return unpatchify(dense(p * p * c.outputs, name='proj_out', **kw)(h), height // p, width // p, p)


def init_pixart(net: PixArt, key: Array, caption_len: int = 8) -> dict:
  """(Boxed) parameters of ``net`` from a (1, sample_size, sample_size, C) input and ``caption_len`` T5 tokens."""
  c = net.config
  x = jnp.zeros((1, c.sample_size, c.sample_size, c.in_channels), net.dtype)
  sizes = dict(resolution=jnp.ones((1, 2)), aspect_ratio=jnp.ones((1, 1))) if c.size_conditioned else {}
  return net.init(key, x, jnp.zeros((1,)), jnp.zeros((1, caption_len, c.caption_channels)), **sizes)['params']
