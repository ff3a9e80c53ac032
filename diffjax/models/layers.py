"""Shared Flax linen building blocks for the U-Net and the VAE. Images are NHWC.

Every module takes ``dtype`` (computation, e.g. ``jnp.bfloat16``) and ``param_dtype``
(storage, float32 by default). Normalisation statistics are always reduced in
float32. Parameters carry logical axis names (``flax.linen.with_logical_partitioning``)
so a trainer can map them to mesh axes with ``nn.logical_to_mesh_sharding``:

====================  ===========================================  ==================
parameter             logical axes                                 meaning
====================  ===========================================  ==================
Dense kernel          ``('embed', 'mlp')``                         (in, out) features
Conv kernel (HWIO)    ``('conv_h', 'conv_w', 'embed', 'mlp')``     out = ``mlp``
bias                  ``('mlp',)``
norm scale / bias     ``('norm',)``
embedding table       ``('vocab', 'embed')``
====================  ===========================================  ==================

Parameter names follow the diffusers / transformers module names (a list index
``blocks.3`` becomes ``blocks_3``) so that weight conversion is a mechanical renaming
(see ``diffjax.convert``).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
Array = jax.Array

DENSE_KERNEL_AXES = ('embed', 'mlp')
CONV_KERNEL_AXES = ('conv_h', 'conv_w', 'embed', 'mlp')
BIAS_AXES = ('mlp',)
NORM_AXES = ('norm',)
EMBED_AXES = ('vocab', 'embed')

_partitioned = nn.with_logical_partitioning


# -- parameterised primitives with logical axis names ------------------------------------
def dense(features: int, *, dtype: Dtype, param_dtype: Dtype, use_bias: bool = True, name: str | None = None):
  """``nn.Dense`` with logical axis names on kernel and bias."""
  return nn.Dense(
      features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
      kernel_init=_partitioned(nn.initializers.lecun_normal(), DENSE_KERNEL_AXES),
      bias_init=_partitioned(nn.initializers.zeros_init(), BIAS_AXES), name=name)


def conv(features: int, kernel: int = 3, *, stride: int = 1, padding: Any = 'SAME_TORCH', dtype: Dtype,
         param_dtype: Dtype, name: str | None = None):
  """``nn.Conv`` (HWIO kernel) with logical axis names; default padding is torch's ``kernel // 2``."""
  if padding == 'SAME_TORCH':
    padding = ((kernel // 2, kernel // 2),) * 2
  return nn.Conv(
      features, (kernel, kernel), strides=(stride, stride), padding=padding, dtype=dtype, param_dtype=param_dtype,
      kernel_init=_partitioned(nn.initializers.lecun_normal(), CONV_KERNEL_AXES),
      bias_init=_partitioned(nn.initializers.zeros_init(), BIAS_AXES), name=name)


def group_norm(groups: int, eps: float, *, dtype: Dtype, param_dtype: Dtype, name: str | None = None):
  """``nn.GroupNorm`` over (H, W, C / groups), statistics in float32 (two-pass variance)."""
  return nn.GroupNorm(
      num_groups=groups, epsilon=eps, dtype=dtype, param_dtype=param_dtype, use_fast_variance=False,
      scale_init=_partitioned(nn.initializers.ones_init(), NORM_AXES),
      bias_init=_partitioned(nn.initializers.zeros_init(), NORM_AXES), name=name)


def layer_norm(eps: float, *, dtype: Dtype, param_dtype: Dtype, name: str | None = None):
  """``nn.LayerNorm`` over the last axis, statistics in float32 (two-pass variance)."""
  return nn.LayerNorm(
      epsilon=eps, dtype=dtype, param_dtype=param_dtype, use_fast_variance=False,
      scale_init=_partitioned(nn.initializers.ones_init(), NORM_AXES),
      bias_init=_partitioned(nn.initializers.zeros_init(), NORM_AXES), name=name)


def embed(num: int, features: int, *, dtype: Dtype, param_dtype: Dtype, name: str | None = None):
  """``nn.Embed`` (table (num, features)) with logical axis names."""
  return nn.Embed(
      num, features, dtype=dtype, param_dtype=param_dtype,
      embedding_init=_partitioned(nn.initializers.normal(0.02), EMBED_AXES), name=name)


# -- attention -----------------------------------------------------------------------------
def dot_product_attention(q: Array, k: Array, v: Array, *, mask: Array | None = None, is_causal: bool = False,
                          implementation: str | None = None) -> Array:
  """Multi-head attention on (B, T, N, H) queries and (B, S, N, H) keys/values -> (B, T, N, H).

  Calls ``jax.nn.dot_product_attention``. ``implementation=None`` picks cuDNN flash
  attention on GPU for 16-bit inputs (falling back to XLA where cuDNN rejects the
  shapes at trace time) and XLA elsewhere; pass ``'xla'`` or ``'cudnn'`` to force one.
  ``mask``: boolean, broadcastable to (B, N, T, S), True = attend.
  """
  impl = implementation
  if impl is None:
    half = q.dtype in (jnp.bfloat16, jnp.float16)
    if half and jax.default_backend() == 'gpu':
      try:
        return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal, implementation='cudnn')
      except (ValueError, NotImplementedError, RuntimeError):
        pass
    impl = 'xla'
  return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal, implementation=impl)


def split_heads(x: Array, heads: int) -> Array:
  """(B, T, N * H) -> (B, T, N, H)."""
  return x.reshape(*x.shape[:-1], heads, x.shape[-1] // heads)


# -- timestep embedding ------------------------------------------------------------------------
def timestep_embedding(t: Array, dim: int, *, flip_sin_to_cos: bool = True, downscale_freq_shift: float = 0.0,
                       max_period: float = 10000.0, scale: float = 1.0) -> Array:
  """Sinusoidal embedding of (B,) times (any units, e.g. 0..999 steps) -> (B, dim) float32.

  Frequencies ``exp(-log(max_period) * i / (dim / 2 - downscale_freq_shift))``, i = 0..dim/2-1
  (Vaswani et al. 2017; the DDPM / Stable Diffusion convention). The output is
  ``[sin, cos]``, or ``[cos, sin]`` with ``flip_sin_to_cos`` (Stable Diffusion: True, shift 0).
  An odd ``dim`` is zero-padded.
  """
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - downscale_freq_shift)
  args = scale * jnp.asarray(t, jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
  if flip_sin_to_cos:
    emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class TimestepMLP(nn.Module):
  """Two-layer SiLU MLP: (B, D_in) -> (B, features). Used for time and projected class embeddings."""

  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = dense(self.features, name='linear_1', **kw)(x)
    return dense(self.features, name='linear_2', **kw)(nn.silu(x))


# -- convolutional blocks ------------------------------------------------------------------------
class ResnetBlock(nn.Module):
  """GroupNorm-SiLU-Conv residual block with optional timestep embedding.

  ``x`` (B, H, W, C_in), ``temb`` (B, D) or None -> (B, H, W, out_channels). With
  ``scale_shift`` the embedding gives (scale, shift) applied after the second norm,
  ``h * (1 + scale) + shift`` (Dhariwal & Nichol 2021, "AdaGN"); otherwise it is added
  after the first convolution (Ho et al. 2020). A 1x1 ``conv_shortcut`` matches channels.
  """

  out_channels: int
  groups: int = 32
  eps: float = 1e-5
  scale_shift: bool = False
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, temb: Array | None = None, deterministic: bool = True) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = nn.silu(group_norm(self.groups, self.eps, name='norm1', **kw)(x))
    h = conv(self.out_channels, 3, name='conv1', **kw)(h)
    e = None
    if temb is not None:
      width = self.out_channels * (2 if self.scale_shift else 1)
      e = dense(width, name='time_emb_proj', **kw)(nn.silu(temb))[:, None, None, :]
      if not self.scale_shift:
        h = h + e
    h = group_norm(self.groups, self.eps, name='norm2', **kw)(h)
    if e is not None and self.scale_shift:
      scale, shift = jnp.split(e, 2, axis=-1)
      h = h * (1 + scale) + shift
    h = nn.Dropout(self.dropout)(nn.silu(h), deterministic=deterministic)
    h = conv(self.out_channels, 3, name='conv2', **kw)(h)
    if x.shape[-1] != self.out_channels:
      x = conv(self.out_channels, 1, name='conv_shortcut', **kw)(x)
    return (x + h).astype(self.dtype)


class Downsample(nn.Module):
  """Stride-2 3x3 convolution: (B, H, W, C) -> (B, H/2, W/2, C).

  ``padding=1`` pads one pixel on every side (U-Net); ``padding=0`` pads only bottom
  and right (the SD autoencoder's asymmetric padding).
  """

  channels: int
  padding: int = 1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    if self.padding == 0:
      x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    pad = ((self.padding, self.padding),) * 2
    return conv(self.channels, 3, stride=2, padding=pad, dtype=self.dtype, param_dtype=self.param_dtype,
                name='conv')(x)


class Upsample(nn.Module):
  """Nearest-neighbour 2x upsampling then a 3x3 convolution: (B, H, W, C) -> (B, 2H, 2W, C)."""

  channels: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return conv(self.channels, 3, dtype=self.dtype, param_dtype=self.param_dtype, name='conv')(x)


# -- attention blocks -------------------------------------------------------------------------------
class Attention(nn.Module):
  """Multi-head (self- or cross-) attention on tokens: x (B, T, C), context (B, S, D) -> (B, T, C).

  Projections ``to_q``, ``to_k``, ``to_v`` (bias only with ``qkv_bias``) and ``to_out_0``;
  scale 1/sqrt(head_dim). ``context=None`` is self-attention.
  """

  heads: int
  head_dim: int
  qkv_bias: bool = False
  implementation: str | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, context: Array | None = None) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    context = x if context is None else context
    inner = self.heads * self.head_dim
    q = dense(inner, use_bias=self.qkv_bias, name='to_q', **kw)(x)
    k = dense(inner, use_bias=self.qkv_bias, name='to_k', **kw)(context)
    v = dense(inner, use_bias=self.qkv_bias, name='to_v', **kw)(context)
    o = dot_product_attention(split_heads(q, self.heads), split_heads(k, self.heads), split_heads(v, self.heads),
                              implementation=self.implementation)
    return dense(x.shape[-1], name='to_out_0', **kw)(o.reshape(*x.shape[:-1], inner))


class SpatialSelfAttention(nn.Module):
  """GroupNorm + single-head-per-``head_dim`` self-attention over pixels, residual (the VAE mid block).

  (B, H, W, C) -> (B, H, W, C). Parameter names: ``group_norm``, ``to_q/k/v`` (with bias), ``to_out_0``.
  """

  head_dim: int | None = None  # None: one head of width C
  groups: int = 32
  eps: float = 1e-6
  implementation: str | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    B, H, W, C = x.shape
    heads = C // (self.head_dim or C)
    h = group_norm(self.groups, self.eps, name='group_norm', **kw)(x).reshape(B, H * W, C)
    q, k, v = (split_heads(dense(C, name=n, **kw)(h), heads) for n in ('to_q', 'to_k', 'to_v'))
    o = dot_product_attention(q, k, v, implementation=self.implementation).reshape(B, H * W, C)
    return x + dense(C, name='to_out_0', **kw)(o).reshape(B, H, W, C)


class GEGLU(nn.Module):
  """Gated GELU projection (Shazeer 2020): (…, C) -> (…, features); ``proj`` outputs 2*features."""

  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    h = dense(2 * self.features, name='proj', dtype=self.dtype, param_dtype=self.param_dtype)(x)
    h, gate = jnp.split(h, 2, axis=-1)
    return h * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
  """GEGLU feed-forward: (…, C) -> (…, C) with inner width ``mult * C`` (``net_0``: GEGLU, ``net_2``: out)."""

  mult: int = 4
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, deterministic: bool = True) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = GEGLU(self.mult * x.shape[-1], name='net_0', **kw)(x)
    h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
    return dense(x.shape[-1], name='net_2', **kw)(h)


class TransformerBlock(nn.Module):
  """Pre-LN transformer block: self-attention, cross-attention (if ``cross_attention``), GEGLU MLP.

  x (B, T, C), context (B, S, D) -> (B, T, C). Names: ``norm1/attn1``, ``norm2/attn2``, ``norm3/ff``.
  """

  heads: int
  head_dim: int
  cross_attention: bool = True
  dropout: float = 0.0
  eps: float = 1e-5
  implementation: str | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, context: Array | None = None, deterministic: bool = True) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    akw = dict(implementation=self.implementation, **kw)
    x = x + Attention(self.heads, self.head_dim, name='attn1', **akw)(layer_norm(self.eps, name='norm1', **kw)(x))
    if self.cross_attention:
      if context is None:
        raise ValueError('this transformer block has cross-attention: pass context (B, L, D)')
      h = layer_norm(self.eps, name='norm2', **kw)(x)
      x = x + Attention(self.heads, self.head_dim, name='attn2', **akw)(h, context.astype(self.dtype))
    h = layer_norm(self.eps, name='norm3', **kw)(x)
    return x + FeedForward(dropout=self.dropout, name='ff', **kw)(h, deterministic)


class SpatialTransformer(nn.Module):
  """Transformer over the pixels of a feature map (Rombach et al. 2022), residual.

  x (B, H, W, C), context (B, L, D) or None -> (B, H, W, C). ``GroupNorm(eps=1e-6)``,
  ``proj_in`` (1x1 conv, or a linear layer with ``linear_projection``) to ``heads *
  head_dim`` channels, ``depth`` ``TransformerBlock``s, ``proj_out`` back to C.
  ``remat`` checkpoints each transformer block.
  """

  heads: int
  head_dim: int
  depth: int = 1
  linear_projection: bool = False
  cross_attention: bool = True
  groups: int = 32
  dropout: float = 0.0
  remat: bool = False
  implementation: str | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, context: Array | None = None, deterministic: bool = True) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    B, H, W, C = x.shape
    inner = self.heads * self.head_dim
    h = group_norm(self.groups, 1e-6, name='norm', **kw)(x)
    if self.linear_projection:
      h = dense(inner, name='proj_in', **kw)(h.reshape(B, H * W, C))
    else:
      h = conv(inner, 1, name='proj_in', **kw)(h).reshape(B, H * W, inner)
    block = nn.remat(TransformerBlock, static_argnums=(3,)) if self.remat else TransformerBlock
    for i in range(self.depth):
      h = block(self.heads, self.head_dim, cross_attention=self.cross_attention, dropout=self.dropout,
                implementation=self.implementation, name=f'transformer_blocks_{i}', **kw)(h, context, deterministic)
    if self.linear_projection:
      h = dense(C, name='proj_out', **kw)(h).reshape(B, H, W, C)
    else:
      h = conv(C, 1, name='proj_out', **kw)(h.reshape(B, H, W, inner))
    return h + x
