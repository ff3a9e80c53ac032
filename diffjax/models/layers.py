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
from jax.custom_derivatives import SymbolicZero

from diffjax.models.attention import dot_product_attention

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


class GroupNorm(nn.Module):
  """Group normalisation of (B, ..., C) over the spatial axes and each group's C / groups channels.

  Same parameters (``scale``, ``bias``: (C,)) and the same function as ``nn.GroupNorm`` with
  two-pass variance, statistics and normalisation in float32, output in ``dtype``. The group
  statistics are reduced in two stages, per channel over the spatial axes and then over the
  channels of a group, instead of one strided reduction over (H, W, C / groups): on XLA:CPU the
  forward pass of a (4, 64, 64, 64) norm runs 12x faster and its gradient 1.7x
  (benchmarks/README_models.md); the sum is the same, only its float rounding order differs.
  """

  groups: int
  eps: float
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = x.shape[-1]
    if x.ndim < 3 or c % self.groups:
      raise ValueError(f'GroupNorm: need (B, ..., C) with C divisible by {self.groups} groups, got {x.shape}')
    scale = self.param('scale', _partitioned(nn.initializers.ones_init(), NORM_AXES), (c,), self.param_dtype)
    bias = self.param('bias', _partitioned(nn.initializers.zeros_init(), NORM_AXES), (c,), self.param_dtype)
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    spatial = tuple(range(1, x.ndim - 1))

    def group_mean(v):  # (B, ..., C) -> (B, 1, ..., 1, C): each channel gets its group's mean
      per_channel = jnp.mean(v, axis=spatial).reshape(v.shape[0], self.groups, c // self.groups)
      per_group = jnp.broadcast_to(jnp.mean(per_channel, axis=2, keepdims=True), per_channel.shape)
      return per_group.reshape((v.shape[0],) + (1,) * len(spatial) + (c,))

    centred = x - group_mean(x)
    inv_std = jax.lax.rsqrt(group_mean(centred * centred) + self.eps)
    y = centred * (inv_std * scale.astype(x.dtype)) + bias.astype(x.dtype)
    return y.astype(self.dtype)


class RMSNorm(nn.Module):
  """Root-mean-square normalisation over the last axis (Zhang & Sennrich 2019), as T5's ``T5LayerNorm`` and
  diffusers' ``RMSNorm`` compute it: x / sqrt(mean(x^2) + eps) * scale, no mean subtraction, no bias;
  statistics in float32; ``scale``: (C,)."""

  eps: float
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param('scale', _partitioned(nn.initializers.ones_init(), NORM_AXES), (x.shape[-1],),
                       self.param_dtype)
    x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * scale.astype(y.dtype)).astype(self.dtype)


def group_norm(groups: int, eps: float, *, dtype: Dtype, param_dtype: Dtype, name: str | None = None):
  """``GroupNorm`` with logical axis names on its parameters."""
  return GroupNorm(groups, eps, dtype=dtype, param_dtype=param_dtype, name=name)


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


_NHWC = ('NHWC', 'HWIO', 'NHWC')


def _fold_taps(k: Array, axis: int) -> Array:
  """The 3 taps of ``k`` along ``axis`` seen from a 2x-upsampled input -> (2 phases, ..., 2 taps, ...):
  even outputs read input (i - 1, i) with taps (k0, k1 + k2), odd outputs (i, i + 1) with (k0 + k1, k2)."""
  k0, k1, k2 = (jnp.take(k, i, axis=axis) for i in range(3))
  return jnp.stack([jnp.stack([k0, k1 + k2], axis), jnp.stack([k0 + k1, k2], axis)])


@jax.custom_jvp
def _conv_valid(x: Array, kernel: Array) -> Array:
  """VALID stride-1 convolution (NHWC, HWIO) whose kernel gradient is one matmul per tap (see ``_UpsampleConv``).

  A custom JVP, not a custom VJP, so that forward mode (``jax.jvp``, ``jax.jacfwd``: the fitted sampler's
  refinement differentiates the denoiser that way) works too: the tangent in the kernel is written tap by
  tap as matmuls, and reverse mode transposes those into one matmul per tap for the kernel gradient.
  """
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), 'VALID', dimension_numbers=_NHWC)


def _conv_valid_by_taps(x: Array, kernel: Array) -> Array:
  """``_conv_valid(x, kernel)`` as a sum of one (B H W, C) x (C, D) matmul per kernel tap (linear in kernel)."""
  kh, kw, c, d = kernel.shape
  h, w = x.shape[1] - kh + 1, x.shape[2] - kw + 1
  out = 0.0
  for u in range(kh):
    for v in range(kw):
      out = out + (x[:, u:u + h, v:v + w].reshape(-1, c) @ kernel[u, v]).reshape(x.shape[0], h, w, d)
  return out


def _conv_valid_jvp(primals, tangents):
  (x, kernel), (dx, dkernel) = primals, tangents
  y = _conv_valid(x, kernel)
  dy = jnp.zeros_like(y)  # the symbolic zeros (a tangent that is not being followed) cost nothing
  if not isinstance(dx, SymbolicZero):
    dy = dy + jax.lax.conv_general_dilated(dx, kernel, (1, 1), 'VALID', dimension_numbers=_NHWC)
  if not isinstance(dkernel, SymbolicZero):
    dy = dy + _conv_valid_by_taps(x, dkernel).astype(y.dtype)
  return y, dy


_conv_valid.defjvp(_conv_valid_jvp, symbolic_zeros=True)


def upsample_conv_subpixel(x: Array, kernel: Array) -> Array:
  """``conv3x3(nearest_upsample_2x(x), kernel)`` (padding 1, no bias) without forming the upsampled image.

  x (B, H, W, C), kernel (3, 3, C, D) -> (B, 2H, 2W, D). Each of the four output phases
  (row parity a, column parity b) is a 2x2 convolution of x with taps of the kernel summed
  (``_fold_taps``); all four run as one 2x2 convolution with 4D outputs on x padded by 1
  (phase (a, b) is its output shifted by (a, b)), then interleave. 2.25x fewer FLOPs than the
  direct form and the same function (only the float rounding order differs).
  """
  b, h, w, c = x.shape
  d = kernel.shape[-1]
  folded = jnp.stack([_fold_taps(kr, 1) for kr in _fold_taps(kernel, 0)])  # (a, b, 2, 2, C, D)
  kernel4 = jnp.transpose(folded, (2, 3, 4, 0, 1, 5)).reshape(2, 2, c, 4 * d)
  out = _conv_valid(jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))), kernel4).reshape(b, h + 1, w + 1, 2, 2, d)
  phases = [jnp.stack([out[:, a:a + h, p:p + w, a, p] for p in range(2)], axis=3) for a in range(2)]
  return jnp.stack(phases, axis=2).reshape(b, 2 * h, 2 * w, d)  # (B, H, 2, W, 2, D) -> (B, 2H, 2W, D)


class _UpsampleConv(nn.Module):
  """The 3x3 convolution of ``Upsample`` applied to the 2x nearest-upsampled input; parameters as ``conv``'s.

  ``subpixel`` (None: on CPU only) computes it with ``upsample_conv_subpixel``: on a 2-core CPU its
  forward pass is 1.4-2x faster and its gradient 1.6-2.1x (benchmarks/README_models.md). There the
  kernel gradient of the 2x2 convolution is computed tap by tap as matmuls, because XLA:CPU's own
  (an Eigen convolution) is 100x slower than the forward pass for this shape. Other backends
  were not measured with it, so they keep the direct form.
  """

  features: int
  subpixel: bool | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel = self.param('kernel', _partitioned(nn.initializers.lecun_normal(), CONV_KERNEL_AXES),
                        (3, 3, x.shape[-1], self.features), self.param_dtype)
    bias = self.param('bias', _partitioned(nn.initializers.zeros_init(), BIAS_AXES), (self.features,),
                      self.param_dtype)
    x, kernel, bias = (a.astype(self.dtype) for a in (x, kernel, bias))
    subpixel = jax.default_backend() == 'cpu' if self.subpixel is None else self.subpixel
    if subpixel:
      y = upsample_conv_subpixel(x, kernel)
    else:
      up = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
      y = jax.lax.conv_general_dilated(up, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=_NHWC)
    return y + bias


class Upsample(nn.Module):
  """Nearest-neighbour 2x upsampling then a 3x3 convolution: (B, H, W, C) -> (B, 2H, 2W, C).

  Parameters ``conv/kernel`` (3, 3, C, C) and ``conv/bias`` as diffusers' ``Upsample2D``;
  ``subpixel`` chooses the computation (see ``_UpsampleConv``).
  """

  channels: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  subpixel: bool | None = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    return _UpsampleConv(self.channels, self.subpixel, self.dtype, self.param_dtype, name='conv')(x)


# -- attention blocks -------------------------------------------------------------------------------
class Attention(nn.Module):
  """Multi-head (self- or cross-) attention on tokens: x (B, T, C), context (B, S, D) -> (B, T, C).

  Projections ``to_q``, ``to_k``, ``to_v`` (bias only with ``qkv_bias``) and ``to_out_0``;
  scale 1/sqrt(head_dim). ``context=None`` is self-attention; ``bias``: added to the logits,
  broadcastable to (B, heads, T, S) (e.g. a padding mask as -10000 on padded keys, as PixArt).
  """

  heads: int
  head_dim: int
  qkv_bias: bool = False
  implementation: str | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, context: Array | None = None, bias: Array | None = None) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    context = x if context is None else context
    inner = self.heads * self.head_dim
    q = dense(inner, use_bias=self.qkv_bias, name='to_q', **kw)(x)
    k = dense(inner, use_bias=self.qkv_bias, name='to_k', **kw)(context)
    v = dense(inner, use_bias=self.qkv_bias, name='to_v', **kw)(context)
    o = dot_product_attention(split_heads(q, self.heads), split_heads(k, self.heads), split_heads(v, self.heads),
                              bias=None if bias is None else bias.astype(q.dtype), implementation=self.implementation)
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


class GELU(nn.Module):
  """A projection then GELU: (…, C) -> (…, features); ``proj``; tanh approximation with ``approximate``."""

  features: int
  approximate: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    h = dense(self.features, name='proj', dtype=self.dtype, param_dtype=self.param_dtype)(x)
    return nn.gelu(h, approximate=self.approximate)


FEED_FORWARD_ACTIVATIONS = ('geglu', 'gelu', 'gelu-approximate')  # diffusers' activation_fn names


class FeedForward(nn.Module):
  """Feed-forward (…, C) -> (…, C) with inner width ``mult * C``: ``net_0`` (GEGLU, or a projection and GELU,
  exact or tanh-approximate: diffusers' ``activation_fn``), ``net_2``: out."""

  mult: int = 4
  dropout: float = 0.0
  activation: str = 'geglu'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, deterministic: bool = True) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    inner = self.mult * x.shape[-1]
    if self.activation == 'geglu':
      h = GEGLU(inner, name='net_0', **kw)(x)
    elif self.activation in ('gelu', 'gelu-approximate'):
      h = GELU(inner, self.activation == 'gelu-approximate', name='net_0', **kw)(x)
    else:
      raise ValueError(f'FeedForward activation {self.activation!r} is not one of {FEED_FORWARD_ACTIVATIONS}')
    h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
    return dense(x.shape[-1], name='net_2', **kw)(h)


class TransformerBlock(nn.Module):
  """Pre-LN transformer block: self-attention, cross-attention (if ``cross_attention``), GEGLU MLP.

  x (B, T, C), context (B, S, D) -> (B, T, C). Names: ``norm1/attn1``, ``norm2/attn2``, ``norm3/ff``.
  With ``only_cross_attention`` the first attention also attends to the context instead of x
  (diffusers' option of that name; the x4 upscaler's U-Net), so the block has no self-attention.
  """

  heads: int
  head_dim: int
  cross_attention: bool = True
  dropout: float = 0.0
  eps: float = 1e-5
  implementation: str | None = None
  only_cross_attention: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, context: Array | None = None, deterministic: bool = True) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    akw = dict(implementation=self.implementation, **kw)
    if (self.cross_attention or self.only_cross_attention) and context is None:
      raise ValueError('this transformer block has cross-attention: pass context (B, L, D)')
    first = context.astype(self.dtype) if self.only_cross_attention else None
    h = layer_norm(self.eps, name='norm1', **kw)(x)
    x = x + Attention(self.heads, self.head_dim, name='attn1', **akw)(h, first)
    if self.cross_attention:
      h = layer_norm(self.eps, name='norm2', **kw)(x)
      x = x + Attention(self.heads, self.head_dim, name='attn2', **akw)(h, context.astype(self.dtype))
    h = layer_norm(self.eps, name='norm3', **kw)(x)
    return x + FeedForward(dropout=self.dropout, name='ff', **kw)(h, deterministic)


class SpatialTransformer(nn.Module):
  """Transformer over the pixels of a feature map (Rombach et al. 2022), residual.

  x (B, H, W, C), context (B, L, D) or None -> (B, H, W, C). ``GroupNorm(eps=1e-6)``,
  ``proj_in`` (1x1 conv, or a linear layer with ``linear_projection``) to ``heads *
  head_dim`` channels, ``depth`` ``TransformerBlock``s, ``proj_out`` back to C.
  ``remat`` checkpoints each transformer block; ``only_cross_attention``: see ``TransformerBlock``.
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
  only_cross_attention: bool = False
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
      h = block(self.heads, self.head_dim, cross_attention=self.cross_attention,
                only_cross_attention=self.only_cross_attention, dropout=self.dropout,
                implementation=self.implementation, name=f'transformer_blocks_{i}', **kw)(h, context, deterministic)
    if self.linear_projection:
      h = dense(C, name='proj_out', **kw)(h).reshape(B, H, W, C)
    else:
      h = conv(C, 1, name='proj_out', **kw)(h.reshape(B, H, W, inner))
    return h + x
